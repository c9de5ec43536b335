# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates .venv in the repo and installs what it needs; torch first, from the exact CPU
# build, so that the project's `torch>=` range is already satisfied and no CUDA build is pulled.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
PIP := $(BIN)/python -m pip --quiet --disable-pip-version-check

.PHONY: demo test lint install clean bench components

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

# Real components the tests drive: Chromium, PostgreSQL, Prometheus, Alertmanager, node/npm (Debian
# packages, each installed on its own and only where missing) and helm, tsc (tests/node, `npm ci`).
# It reports what it could not install; the tests that need a missing component then fail and name
# it, unless COTMON_TEST_WITHOUT lists it (see README, "Tests").
components:
	@$(PYTHON) tests/components.py install

test: lint components
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) tests/node/node_modules .cotmon .pytest_cache .mypy_cache .ruff_cache
