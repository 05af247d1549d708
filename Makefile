# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The Triton Python backend stub links the system libpython, so the venv is made from
# Debian's own python3.11 (see docs/TOOLCHAIN notes in README).
BASE_PYTHON ?= $(shell test -x /usr/bin/python3.11 && echo /usr/bin/python3.11 || echo python3)
STAMP := $(VENV)/.installed

.PHONY: serve test venv clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(BASE_PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU-only machines take the CPU torch build; a plain `torch` would pull several GB of CUDA.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q "numpy<2" -e ".[serve,test]"
	touch $(STAMP)

venv: $(STAMP)

serve: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m engine.demo

test: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
