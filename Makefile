# easyppo: `make test` and `make demo` work on a fresh machine (they create .venv first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup lint test test-fast demo clean

$(VENV)/.installed: setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup lint
	$(PY) -m pytest -n 2 --dist loadfile $(PYTEST_ARGS) tests

test-fast: setup
	$(PY) -m pytest -n 2 --dist loadfile -m "not slow" $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) .jax_cache .pytest_cache build *.egg-info

demo: setup
	$(PY) demo/run.py
