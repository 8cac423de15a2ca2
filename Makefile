# `make test` and `make demo` do all the set-up: a virtualenv at .venv (reused), the
# project installed into it, and the patched llama.cpp built into a user cache keyed by
# its inputs (`orthrus-gguf build`; a second run does nothing).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.orthrus-installed
BUILD_FLAGS ?=

.PHONY: venv build test demo clean

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

clean:
	rm -rf $(VENV) build *.egg-info
