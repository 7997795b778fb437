# Two commands do everything on a fresh machine:
#   make run    set up .venv, then run the main job
#   make test   set up .venv, then run ruff and the full test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test setup clean

run: $(STAMP)
	$(BIN)/hw2jax theory

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

setup: $(STAMP)

# Reinstalls whenever pyproject.toml changes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
