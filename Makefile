# Two commands for a newcomer: `make demo` and `make test`. Both set everything up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
INSTALLED := $(VENV)/.installed
EXTRAS := stages,train,airflow,dev
CJK_FONT := /usr/share/fonts/truetype/wqy/wqy-microhei.ttc
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup containers train-wheels label-studio demo airflow preflight test test-compose test-fast lint format docs lock clean

setup: $(INSTALLED) $(CJK_FONT) ## venv with the whole stack (torch CPU first) and the CJK font

# torch goes first and pinned: with no torch present, pip would pull a multi-GB CUDA build.
$(INSTALLED): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[$(EXTRAS)]"
	$(PIP) check
	touch $@

$(CJK_FONT):
	$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q fonts-wqy-microhei

# No Docker engine here: podman serves the Docker API, and a base image is made from Debian's
# packages because nothing can be pulled (docker/local-base.sh says more).
containers: train-wheels ## podman and the local base image the container tests build on
	@command -v podman >/dev/null && command -v docker-registry >/dev/null && command -v docker-compose >/dev/null || \
	    ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q podman runc debootstrap uidmap docker-registry docker-compose)
	$(SUDO) env CONTAINERS_CONF=$(CURDIR)/docker/podman/containers.conf docker/local-base.sh

# The training image's torch, from the CPU wheel on this machine's disk (docker/wheels/README.md).
train-wheels: setup ## the CPU torch wheel for local builds of docker/train.Dockerfile
	@ls docker/wheels/torch-2.13.0*.whl >/dev/null 2>&1 || $(PIP) download -q --no-deps -d docker/wheels torch==2.13.0

# Label Studio's server in its own venv: it pins packages below the stack's
# (docker/label-studio/constraints.txt). The labelling loop's test starts it on 127.0.0.1.
LABEL_STUDIO_VENV ?= .venv-label-studio
$(LABEL_STUDIO_VENV)/.installed: docker/label-studio/constraints.txt
	$(PYTHON) -m venv $(LABEL_STUDIO_VENV)
	$(LABEL_STUDIO_VENV)/bin/pip install -q -c docker/label-studio/constraints.txt label-studio==1.23.2
	touch $@

label-studio: $(LABEL_STUDIO_VENV)/.installed ## Label Studio's server, in its own venv (.venv-label-studio)

demo: setup ## run the pipeline end to end on the embedded default (CPU, local MLflow store)
	$(PY) -m toolkit.demo

airflow: setup ## the demo's Airflow running on 127.0.0.1:8080 (UI, REST API, scheduler); Ctrl-C stops it
	$(PY) -m toolkit.local_airflow

# A base model you supply, before a GPU is booked: environment, its code's imports, then one training
# step on two documents, patch and one answer (toolkit/preflight.py). CONFIG adds overlays.
BASE ?=
CONFIG ?= configs/pipeline.yaml
PREFLIGHT_OUT ?= data/preflight/$(shell date -u +%Y%m%dT%H%M%SZ)
preflight: setup ## BASE=<folder or s3:// URI> [CONFIG="a.yaml b.yaml"]: check a base model end to end in minutes
	@test -n "$(BASE)" || (echo "usage: make preflight BASE=<folder or s3:// URI> [CONFIG=...]" >&2; exit 2)
	$(PY) -m toolkit.preflight $(foreach c,$(CONFIG),--config $(c)) --base $(BASE) --output $(PREFLIGHT_OUT)

test: setup containers label-studio ## every test: unit, integration and container tests (the 25 slowest listed)
	$(PY) -m pytest --durations=25

# The compose stack itself runs in `make test` (docker-compose, Debian's 1.29, drives podman's Docker
# API; stand-ins for the public images are built by docker/local/compose.yml). This target adds the
# images too slow to build in CI (Label Studio's) and the stack's test, with their output shown.
test-compose: setup containers ## the docker-compose stack end to end, with the Label Studio service's image
	$(PY) -m pytest -m "compose or container" -s tests/system/test_compose.py tests/system/test_compose_stack.py

test-fast: setup ## skip the tests marked integration (stage processes, servers, containers)
	$(PY) -m pytest -m "not integration"

lint: setup ## ruff (lint and format), the import layers (pyproject's importlinter contracts)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

docs: setup ## docs/configuration-reference.md, generated from the configuration's pydantic models
	$(PY) -m toolkit.config_reference

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

.env: ## secrets for docker-compose, random, never committed (toolkit/env_file.py)
	$(PY) -m toolkit.env_file --output $@

lock: ## record exactly what the venv holds, so a fresh machine gets what CI tested
	$(PIP) freeze --exclude-editable | grep -v '^-e' > constraints.txt

clean:
	rm -rf $(VENV) data .pytest_cache
