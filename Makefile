# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates .venv in the repo and installs what it needs; torch first, from the exact CPU
# build, so that the project's `torch>=` range is already satisfied and no CUDA build is pulled.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
PIP := $(BIN)/python -m pip --quiet --disable-pip-version-check

.PHONY: demo test lint install clean bench system-deps

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

# Real components the tests drive: Debian's Chromium (the viewer's browser test) and PostgreSQL
# (the store's tests run against a throwaway cluster too). Installed where this machine allows
# (root with apt); elsewhere those tests skip and say why.
SYSTEM_PACKAGES := chromium postgresql
system-deps:
	@if [ -x /usr/bin/chromium ] && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing $(SYSTEM_PACKAGES) with apt-get"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null \
		|| { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; } \
		|| echo "could not install $(SYSTEM_PACKAGES): their tests will be skipped"; \
	else echo "not root or no apt-get: tests needing $(SYSTEM_PACKAGES) skip unless these are installed"; fi

test: lint system-deps
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) .cotmon .pytest_cache .mypy_cache .ruff_cache
