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

.PHONY: setup demo test test-fast lint format lock clean

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

demo: setup ## run the pipeline end to end on the embedded default (CPU, local MLflow store)
	$(PY) -m stages.demo

test: setup ## every test, integration tests included
	$(PY) -m pytest

test-fast: setup ## unit tests only
	$(PY) -m pytest -m "not integration"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

lock: ## record exactly what the venv holds, so a fresh machine gets what CI tested
	$(PIP) freeze --exclude-editable | grep -v '^-e' > constraints.txt

clean:
	rm -rf $(VENV) data .pytest_cache
