# easyppo: `make test` and `make demo` work on a fresh machine (they create .venv first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup lint test test-fast demo clean

# Two install sets: the demo needs the library and matplotlib (its pictures); the tests also need
# torch, transformers, pytest and the linters.
$(VENV)/.installed-demo: setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[plot]'
	touch $@

$(VENV)/.installed: setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed-demo

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

demo: $(VENV)/.installed-demo
	$(PY) demo/run.py
