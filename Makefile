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

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m sparse_rl_optim.demo $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: $(STAMP)
	$(PY) bench/bench_step.py $(ARGS)

clean:
	rm -rf $(VENV) demo_output .pytest_cache .hypothesis
