# Two commands for a newcomer:  `make repro` (set up, run the pipeline) and
# `make test` (set up, run the tests). Everything lives in .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Real CIFAR-10 as image folders, for tests and local runs (skipped where absent).
SIPA_CIFAR10_JPEG ?= $(abspath ../shared/data/cifar10-jpeg)
export SIPA_CIFAR10_JPEG

.PHONY: install repro test clean

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

# Stage commands say `python`: the venv's, first on PATH.
repro: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" dvc repro $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
