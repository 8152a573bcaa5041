# olaf: the two commands a newcomer runs on a fresh machine.
#   make test   set up .venv (torch first, then olaf[dev]) and run the test suite
#   make demo   same set-up, then the main job end to end on the bundled sample
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build on a machine without CUDA wheels in reach; the same pin gives the CUDA build on a GPU box.
TORCH_SPEC ?= torch==2.13.0
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: help setup test demo lint
help:
	@echo "make test   set up $(VENV) and run the test suite"
	@echo "make demo   set up $(VENV) and run extraction + training end to end on the bundled sample"

$(PY):
	@echo "== creating $(VENV)"
	$(PYTHON) -m venv $(VENV)

# Stamp files: a re-run finds them and installs nothing.
$(VENV)/.torch-installed: | $(PY)
	@echo "== installing $(TORCH_SPEC)"
	$(PIP) install "$(TORCH_SPEC)"
	@touch $@

$(VENV)/.olaf-installed: pyproject.toml $(VENV)/.torch-installed
	@echo "== installing olaf[dev] (editable)"
	$(PIP) install -e '.[dev]'
	@touch $@

setup: $(VENV)/.olaf-installed

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check pipeline teachers trainer tests benchmarks

demo: setup
	@echo "make demo: the extraction job (pipeline.extract_teachers) and the trainer (trainer.pt) do not exist yet;" >&2
	@echo "           see the open issues 'extract_teachers' and 'trainer.pt'." >&2
	@exit 1
