# `make test` and `make demo` do all the set-up: a virtualenv at .venv (reused), the
# project installed into it, and the patched llama.cpp built into a user cache keyed by
# its inputs (`orthrus-gguf build`; a second run does nothing).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.orthrus-installed
BUILD_FLAGS ?=

.PHONY: venv build test demo gpu-carry gpu-check clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# llama-cpp-python without its own compiled llama.cpp: we load our patched build.
	CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

build: venv
	$(VENV)/bin/orthrus-gguf build $(BUILD_FLAGS)

test: build
	$(PY) -m pytest -q

demo: build
	$(VENV)/bin/orthrus-gguf demo

# The device check (orthrus_gguf/gpu_check.py). On a machine with a GPU and no package
# registry: carry .carry (made here by `make gpu-carry`: the Python packages that machine's
# python3 lacks, and the llama.cpp source) and run `make gpu-check`, or, without make,
# `PYTHONPATH=.carry/site:. python3 -m orthrus_gguf.gpu_check`; results land in $OUT
# (default out/gpu-check). Here, with the virtualenv, the same target runs the CPU path.
# `make gpu-carry PREBUILT=cuda:90` also builds here what an H100/H200 would build and
# carries it, so that the device compiles nothing (README, "make gpu-check").
GPU_CHECK_FLAGS ?=
gpu-carry: build
	$(PY) -m orthrus_gguf.gpu_check --make-carry .carry $(if $(PREBUILT),--prebuilt $(PREBUILT))

gpu-check:
	@if [ -x $(PY) ]; then $(PY) -m orthrus_gguf.gpu_check --out "$${OUT:-out/gpu-check}" $(GPU_CHECK_FLAGS); else \
	  PYTHONPATH=$(CURDIR)/.carry/site:$(CURDIR) python3 -m orthrus_gguf.gpu_check --out "$${OUT:-out/gpu-check}" $(GPU_CHECK_FLAGS); fi

clean:
	rm -rf $(VENV) build *.egg-info
