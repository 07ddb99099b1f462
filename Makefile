# Two commands on a fresh machine: `make run` and `make test`.
# Everything else they need is installed from here: Python packages into
# .venv (PyPI), buf into node_modules (npm), Debian tools with apt-get.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
BUF    := node_modules/.bin/buf
# buf runs the local plugins (protoc-gen-connect-python, python -m grpc_tools.protoc) from the venv.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

# A second interpreter the tests run the snapshot path under (Python 3.13 warns when a
# threaded process forks; kvservice must not). pyenv installs it on these machines.
PY313    ?= $(wildcard $(HOME)/.pyenv/versions/3.13.*/bin/python)
VENV313  := .venv-py3.13

# Directories of generated code (committed, never edited by hand).
GENERATED := kvservice/v1 kvservice/health/v1

HOST     ?= 127.0.0.1
PORT     ?= 8080
DATA_DIR ?= ./data

.PHONY: run test lint typecheck generate check-generate bench bench-smoke setup tools clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

$(BUF): package.json
	npm install --no-audit --no-fund --loglevel=error
	touch $@

$(VENV313)/.installed: pyproject.toml
	$(firstword $(PY313)) -m venv $(VENV313)
	$(VENV313)/bin/python -m pip install --quiet --upgrade pip
	$(VENV313)/bin/python -m pip install --quiet -e .
	touch $@

setup: $(VENV)/.installed $(BUF) $(if $(PY313),$(VENV313)/.installed)

## Debian tools the tests use: promtool (alert rules) and a C compiler (fault-injection shim).
tools:
	@command -v promtool >/dev/null && command -v cc >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus gcc libc6-dev >/dev/null; }

run: $(VENV)/.installed
	$(VENV)/bin/kvservice serve --host $(HOST) --port $(PORT) --data-dir $(DATA_DIR)

test: setup tools
	$(MAKE) --no-print-directory lint typecheck check-generate
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check kvservice tests bench
	$(VENV)/bin/ruff format --check kvservice tests bench
	$(BUF) lint

typecheck: setup
	$(VENV)/bin/mypy

generate: setup
	$(BUF) generate

## Regenerate into a scratch dir and fail on any difference from the committed code.
check-generate: setup
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  $(BUF) generate -o "$$tmp" && \
	  stale=0 && for d in $(GENERATED); do \
	    diff -r -x __pycache__ -x __init__.py "$$tmp/$$d" "$$d" || stale=1; done && \
	  if [ $$stale = 1 ]; then echo "generated code is stale: run 'make generate' and commit"; exit 1; fi && \
	  echo "generated code is up to date"

bench: setup
	$(PY) -m bench.run

bench-smoke: setup
	$(PY) -m bench.run --smoke

clean:
	rm -rf $(VENV) $(VENV313) node_modules .pytest_cache .mypy_cache .ruff_cache .hypothesis
