# Two commands on a fresh machine: `make run` (the whole DAG on the embedded default config)
# and `make test` (the test suite). Both bootstrap .venv from pyproject.toml first.
#
# torch is installed before the project so that pip keeps it: here the machine's local CPU wheel
# (torch==2.13.0); on a GPU cluster pick a CUDA build, e.g.
#   make venv TORCH_SPEC='torch==2.8.0' TORCH_INDEX='--index-url https://download.pytorch.org/whl/cu128'
# or install any torch into .venv yourself before `make venv` (a satisfying torch is kept).

PYTHON     ?= $(shell command -v python3.11 || command -v python3)
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
CORES      ?= all
CONFIG     ?=
SNAKE_ARGS ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.zipasr-installed
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: venv run test lint dry-run report clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(BIN)/python -m pip install --quiet -e '.[dev,deploy]'
	$(BIN)/python -c "import torch, lhotse, sherpa_onnx, zipasr; print('zipasr venv ready: torch', torch.__version__)"
	touch $@

run: venv
	$(BIN)/snakemake --cores $(CORES) $(if $(CONFIG),--configfile $(CONFIG)) $(SNAKE_ARGS)

dry-run: venv
	$(BIN)/snakemake --cores $(CORES) -n $(if $(CONFIG),--configfile $(CONFIG)) $(SNAKE_ARGS)

report: venv
	$(BIN)/snakemake --report report.html $(if $(CONFIG),--configfile $(CONFIG))

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check src tests benchmarks

clean-venv:
	rm -rf $(VENV)
