# `make demo` and `make test` work on a fresh clone: each creates .venv if missing and installs the
# project (editable) with what the demo and the tests need, pinned by constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Pinned first: on this project's machines pip takes torch 2.13.0 from a CPU wheel on disk, whereas
# a bare `torch` requirement would resolve to a newer multi-GB CUDA build. Override for a GPU box.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

# The GPU check runs on a machine that already has CUDA torch and triton (GPU_PYTHON): it installs
# only this project there, without dependencies and without the network.
GPU_PYTHON ?= python3

.PHONY: install demo test lint bench bench-rl bench-step gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

# The demo: warm start, then 150 GRPO steps with RLSGD (about a minute on 2 cores; ARGS=--help for the flags).
# Entry-point scripts rather than `python -m`: `-m` puts the repository root first on sys.path, where
# the source folder kernels/ would shadow the Hugging Face `kernels` package that bitsandbytes imports.
demo: $(STAMP)
	$(VENV)/bin/sparse-rl-optim-demo $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The benchmark suite: step time, state bytes, memory and bandwidth against torch/bitsandbytes peers on
# real LLM layer shapes (CPU default: 1.8M to 18.6M-parameter sets, ~15 s; --device cuda adds the full 0.5B and 1.5B models).
bench: $(STAMP)
	$(PY) bench/suite.py $(ARGS)

# RL quality: GRPO on the demo task with five optimizers (AdamW, RLSGD nearest/stochastic, SGD momentum
# with fp32 master weights, DenseBlockAdamW), 3 lrs x 5 seeds each, two runs at a time (16-20 min on 2 cores).
bench-rl: $(STAMP)
	$(PY) bench/rl_quality.py $(ARGS)

bench-step: $(STAMP)
	$(PY) bench/bench_step.py $(ARGS)

gpu-check:
	$(GPU_PYTHON) -m pip install --quiet --no-deps --no-build-isolation --no-index -e .
	$(GPU_PYTHON) bench/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) demo_output .pytest_cache .hypothesis
