# VLM Lab: two commands do all the set-up on a fresh machine (Python 3.11, no GPU, package registries only).
#
#   make lab    create .venv, install the package with its notebook extras, start JupyterLab on notebooks/
#   make test   same install, then every unit test and every notebook (nbval), offline
#
# Other targets: make install (only the install), make clean (caches, build files, the install stamp),
# make distclean (also removes .venv).

SHELL := /bin/bash
.DEFAULT_GOAL := help

# python3.11 when present, else python3 (must be 3.11 or newer; pyproject says so and pip checks it).
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PORT   ?= 8888

# The exact torch pair the course is tested with. Installed FIRST and repeated in the package install, because
# an unpinned torch lets pip pull the newest multi-GB build. The CUDA build of 2.14.1 runs fine on CPU.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

# Offline-first: no test and no notebook touches the network.
TEST_ENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1 GRADIO_ANALYTICS_ENABLED=False \
            MPLBACKEND=Agg VLM_LAB_SCALE=toy
# Seconds one notebook cell may run before nbval fails it (the toy path of a whole notebook takes < 2 min).
CELL_TIMEOUT ?= 600

# The install is redone only when pyproject.toml or this Makefile changes (or .venv is deleted).
STAMP := $(VENV)/.vlm-lab-installed

.PHONY: help lab test test-unit test-notebooks install clean distclean

help:
	@echo "make lab     install (first time ~4 min) and open the course in JupyterLab"
	@echo "make test    install, then run every unit test and every notebook offline"
	@echo "make install | make clean | make distclean"

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || { \
	    $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	        || { echo "VLM Lab needs Python >= 3.11; run it again with PYTHON=/path/to/python3.11" >&2; exit 1; }; \
	    echo "Creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	$(PIP) install $(TORCH_PINS)
	$(PIP) install -e '.[notebooks,test]' $(TORCH_PINS)
	@touch $(STAMP)
	@echo "Installed vlm_lab into $(VENV). Check it with: $(VENV)/bin/vlm-lab doctor"

lab: $(STAMP)
	HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False $(VENV)/bin/vlm-lab lab --port $(PORT)

test: $(STAMP)
	$(MAKE) --no-print-directory --keep-going test-unit test-notebooks

test-unit: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest tests

test-notebooks: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest --nbval-lax --nbval-current-env --nbval-cell-timeout=$(CELL_TIMEOUT) \
	    -p no:python -p no:cacheprovider notebooks/

clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis $(STAMP)
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -o -name .ipynb_checkpoints \) -type d -print0 \
	    | xargs -0 rm -rf

distclean: clean
	rm -rf $(VENV)
