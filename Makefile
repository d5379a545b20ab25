# The two commands the README quotes: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.trainops-installed

.PHONY: setup machine demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# Install the CPU torch wheel first when no torch is present, so the project's
	# `torch>=2.6` range does not pull a multi-GB CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/trainops demo

# PostgreSQL, Redis, Prometheus, Alertmanager, docker-compose, Slurm: started or installed when missing.
machine:
	bash .ci/prepare-machine

test: setup machine
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) .trainops
