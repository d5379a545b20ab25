# The two commands the README quotes: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.trainops-installed

LOCK := requirements.lock
# pip-compile's header names this command instead of its own arguments, so the file is the same wherever
# it was generated (and the check below can diff it).
LOCK_COMPILE := CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet pyproject.toml
# The lock pins torch's release, not its build: the local CPU wheel here (`torch==2.13.0+cpu`), the CUDA build
# of the same release on a GPU image. An installed 2.13.0+cpu satisfies `torch==2.13.0`.
LOCK_STRIP_BUILD := sed -i -E 's/^(torch==[0-9.]+)\+[a-z0-9.]+$$/\1/'

.PHONY: setup machine demo test lint lock lock-check bench clean

# `make demo` and `make test` install requirements.lock, the versions CI tested (every extra: the suite
# exercises every part), then the project itself without resolving again. Hosts install only the extra
# their role needs (docs/deployment.md).
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# Install the CPU torch wheel first when no torch is present, so the lock's `torch==2.13.0` does not
	# pull a multi-GB CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r $(LOCK)
	$(BIN)/pip install -q --no-deps -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# Regenerate requirements.lock after changing dependencies in pyproject.toml (or requirements-pins.txt):
# pins that still satisfy the ranges are kept; `make lock UPGRADE=1` moves every pin to the newest release.
lock: setup
	$(LOCK_COMPILE) $(if $(UPGRADE),--upgrade) --output-file $(LOCK)
	$(LOCK_STRIP_BUILD) $(LOCK)

# Fails when requirements.lock is not what `make lock` would write: a dependency or range changed in
# pyproject.toml without regenerating it. Needs the package registry, not the internet.
lock-check: setup
	tmp=$$(mktemp -d) && cp $(LOCK) $$tmp/$(LOCK) && \
	$(LOCK_COMPILE) --output-file $$tmp/$(LOCK) && $(LOCK_STRIP_BUILD) $$tmp/$(LOCK) && \
	{ diff -u $(LOCK) $$tmp/$(LOCK) || { echo "requirements.lock is stale: run make lock"; rm -rf $$tmp; exit 1; }; } && \
	rm -rf $$tmp

demo: setup
	$(BIN)/trainops demo

# PostgreSQL, Redis, Prometheus, Alertmanager, docker-compose, Slurm: started or installed when missing.
machine:
	bash .ci/prepare-machine

# Two passes: everything but the `serial` tests on two pytest-xdist workers (a test module stays on one
# worker: module fixtures such as a Slurm cluster start once), then the `serial` ones alone, since they load
# the machine or measure it. `pytest -k ...` or a path runs any subset in one process as usual.
test: setup machine
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile -m "not serial"
	$(BIN)/python -m pytest -q -p no:cacheprovider -m serial

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) .trainops
