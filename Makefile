# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The Triton Python backend stub links the system libpython, so the venv is made from
# Debian's own python3.11 when it is there.
BASE_PYTHON ?= $(shell test -x /usr/bin/python3.11 && echo /usr/bin/python3.11 || echo python3)
STAMP := $(VENV)/.installed

.PHONY: serve test plots venv clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(BASE_PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU-only machines take the CPU torch build; a plain `torch` would pull several GB of CUDA.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q "numpy<2" -e ".[serve,test]"
	touch $(STAMP)

venv: $(STAMP)

# OMP_NUM_THREADS=1: on a small CPU machine torch's thread pool spins against tritonserver's threads.
serve: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m multilora_serve $(ARGS)

test: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" OMP_NUM_THREADS=1 $(PY) -m pytest -q tests $(ARGS)

# Draws docs/*.json benchmark results as docs/plot_*.png; matplotlib stays out of the test extra.
plots: $(STAMP)
	$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q "numpy<2" -e ".[bench]"
	PYTHONPATH=. $(PY) bench/plots.py

clean:
	rm -rf $(VENV)
