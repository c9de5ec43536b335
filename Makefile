# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates .venv in the repo and installs what it needs; torch first, from the exact CPU
# build, so that the project's `torch>=` range is already satisfied and no CUDA build is pulled.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
PIP := $(BIN)/python -m pip --quiet --disable-pip-version-check

.PHONY: demo test lint install clean bench system-deps node-deps

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

# Real components the tests drive: Debian's Chromium (the viewer's browser test), PostgreSQL (the
# store's tests run against a throwaway cluster too), Prometheus and Alertmanager (alert rules,
# the alerting end-to-end test) and node/npm (for the tools below). Installed where this machine
# allows (root with apt); elsewhere those tests skip and say why.
SYSTEM_PACKAGES := chromium postgresql prometheus prometheus-alertmanager nodejs npm
system-deps:
	@if [ -x /usr/bin/chromium ] && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
		&& command -v promtool >/dev/null && command -v prometheus-alertmanager >/dev/null && command -v npm >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing $(SYSTEM_PACKAGES) with apt-get"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null \
		|| { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; } \
		|| echo "could not install $(SYSTEM_PACKAGES): their tests will be skipped"; \
	else echo "not root or no apt-get: tests needing $(SYSTEM_PACKAGES) skip unless these are installed"; fi

# Node tools pinned in tests/node/package-lock.json: a real helm binary (chart lint and template),
# @grafana/schema and tsc (the dashboard's typed check). --ignore-scripts: nothing runs at install.
NODE_TOOLS := tests/node/node_modules/.installed
$(NODE_TOOLS): tests/node/package-lock.json
	@if command -v npm >/dev/null; then \
		npm ci --prefix tests/node --ignore-scripts --no-audit --no-fund --loglevel=error && touch $@; \
	else echo "no npm: the chart and dashboard tests will be skipped"; fi
node-deps: system-deps $(NODE_TOOLS)

test: lint node-deps
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) tests/node/node_modules .cotmon .pytest_cache .mypy_cache .ruff_cache
