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
# registry: carry .carry (made here by `make gpu-carry`: the pure-Python dependencies and the
# llama.cpp source) and run `make gpu-check`; results land in $OUT (default out/gpu-check).
# Here, with the virtualenv, the same target runs the CPU path.
CARRY_PKGS := gguf llama_cpp diskcache
gpu-carry: build
	rm -rf .carry && mkdir -p .carry/site
	for p in $(CARRY_PKGS); do cp -r $$($(PY) -c "import importlib.util as u, os; print(os.path.dirname(u.find_spec('$$p').origin))") .carry/site/; done
	$(PY) -c "from orthrus_gguf.build import write_source_tarball; write_source_tarball('.carry/llama.cpp-src.tar.gz')"
	du -sh .carry

gpu-check:
	@if [ -x $(PY) ]; then $(PY) -m orthrus_gguf.gpu_check --out "$${OUT:-out/gpu-check}"; else \
	  ln -sfn ../convert orthrus_gguf/convert && \
	  PYTHONPATH=$(CURDIR)/.carry/site:$(CURDIR) python3 -m orthrus_gguf.gpu_check --out "$${OUT:-out/gpu-check}"; fi

clean:
	rm -rf $(VENV) build *.egg-info
