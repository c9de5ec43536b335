# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates .venv in the repo and installs what it needs; torch first, from the exact CPU
# build, so that the project's `torch>=` range is already satisfied and no CUDA build is pulled.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
PIP := $(BIN)/python -m pip --quiet --disable-pip-version-check

.PHONY: demo test lint install clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install "torch==$(TORCH_VERSION)"
	$(PIP) install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/cotmon demo

lint: $(VENV)/.installed
	$(BIN)/ruff check monitor probes detectors policies tests bench
	$(BIN)/mypy monitor
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) .cotmon .pytest_cache .mypy_cache .ruff_cache
