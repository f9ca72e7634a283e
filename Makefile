# dicomnode: `make run` starts a node with the embedded default; `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ./dicomnode-data
PORT ?= 11112
DEBIAN_PACKAGES := dcmtk dicom3tools redis-server orthanc rabbitmq-server

.PHONY: run test venv test-deps system-deps lint typecheck pytest bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, from the CPU build; the dependency ranges admit it.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

venv: $(VENV)/.installed

run: venv
	$(VENV)/bin/dicomnode serve --data $(DATA) --port $(PORT)

system-deps:
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy

test: system-deps venv lint typecheck
	$(VENV)/bin/python -m pytest

bench: venv system-deps
	$(VENV)/bin/python -m benchmarks.ingest

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
