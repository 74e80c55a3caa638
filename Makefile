# The README's two commands: `make quickstart` and `make test`. Both create .venv on first use.
# GPU users: make ... CONSTRAINTS=   (drops the CPU torch pin; pip then picks the CUDA build)
VENV ?= .venv
PYTHON ?= python3
CONSTRAINTS ?= constraints/cpu.txt
EXTRAS ?= test,notebooks
PIP := $(VENV)/bin/pip
NEAT := $(VENV)/bin/neat
PYTEST_ARGS ?=
FIT_ARGS ?=
CONSTRAINT_FLAG := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

.PHONY: venv quickstart test test-fast bench clean

STAMP := $(VENV)/.installed

venv: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(CONSTRAINT_FLAG) -e ".[$(EXTRAS)]"
	touch $@

# train the quickstart ByteLM, then report it on held-out documents and on docs/*.md (text it never saw), static and
# adaptive (neat score --adapt) and with the byte-context cache (--cache), each beside gzip -9, bz2 -9 and xz -9e.
# FIT_ARGS adds options to the fit, e.g.
# make quickstart FIT_ARGS='--trainer.max_time null'   (no 7-minute guard on a slow or busy machine)
quickstart: venv
	$(NEAT) fit --config configs/byte_lm_quickstart.yaml $(FIT_ARGS)
	$(NEAT) report --config configs/byte_lm_quickstart.yaml --ckpt runs/quickstart/checkpoints/last.ckpt \
		--ood 'docs/*.md' --adapt --cache

test: venv
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(VENV)/bin/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: venv
	for b in benchmarks/*.py; do $(VENV)/bin/python $$b || exit 1; done

clean:
	rm -rf runs build dist *.egg-info
