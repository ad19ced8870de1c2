# Two commands for a newcomer:  `make repro` (set up, run the pipeline) and
# `make test` (set up, run the tests). Everything lives in .venv.
# While editing: `make test-fast` (the tests not marked slow, a few minutes) and `make lint`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Real CIFAR-10 as image folders, for tests and local runs (skipped where absent).
SIPA_CIFAR10_JPEG ?= $(abspath ../shared/data/cifar10-jpeg)
export SIPA_CIFAR10_JPEG
# The official CIFAR-100 binary files, for the tests that read the real data set (skipped where absent).
SIPA_CIFAR100_BINARY ?= $(abspath ../shared/data/cifar-100-binary)
export SIPA_CIFAR100_BINARY

.PHONY: install repro test test-fast lint clean profile-paper profile-cpu profile-cifar100-cpu profile-gpu-cifar100

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

# Stage commands say `python`: the venv's, first on PATH.
repro: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" dvc repro $(ARGS)

# The whole suite: what CI runs. Two pytest-xdist workers, a test file each at a time (its
# module fixtures computed once): most tests wait on stage subprocesses and imports, so two
# workers on two cores take about half the time of one. WORKERS=0: one process.
WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile $(ARGS)

# The edit-test loop: everything but the end-to-end, fault-injection, distributed and
# subprocess tests (marked slow in tests/).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile -m "not slow" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# The paper's full recipe (GPU machines): replaces params.yaml; `git checkout params.yaml` undoes it.
profile-paper: $(STAMP)
	$(BIN)/python -m sipa_core.cli check-params profiles/paper.yaml
	cp profiles/paper.yaml params.yaml

# About 100 minutes on 2 CPU cores, on the CIFAR-10 image folder: replaces params.yaml.
profile-cpu: $(STAMP)
	$(BIN)/python -m sipa_core.cli check-params profiles/cpu.yaml
	cp profiles/cpu.yaml params.yaml

# About two hours on 2 CPU cores, on the official CIFAR-100 binary files: replaces params.yaml.
profile-cifar100-cpu: $(STAMP)
	$(BIN)/python -m sipa_core.cli check-params profiles/cifar100-cpu.yaml
	cp profiles/cifar100-cpu.yaml params.yaml

# The method at the paper's scale on one GPU in minutes (full CIFAR-100, 63 px): replaces params.yaml.
profile-gpu-cifar100: $(STAMP)
	$(BIN)/python -m sipa_core.cli check-params profiles/gpu-cifar100.yaml
	cp profiles/gpu-cifar100.yaml params.yaml

clean:
	rm -rf $(VENV) .pytest_cache
