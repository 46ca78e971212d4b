# Two commands on a fresh machine with nothing but Python:
#   make reproduce   -- the paper's two experiments, written to results/
#   make test        -- lint and the test suite
# TORCH_SPEC picks the torch build, e.g. TORCH_SPEC="torch==2.13.0 --index-url <cuda index>".
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.ttr-installed

.PHONY: reproduce test setup clean

setup: $(STAMP)

# Torch first and pinned, so that pip never resolves an unpinned torch (and its CUDA wheels).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev,hf]"
	touch $(STAMP)

reproduce: $(STAMP)
	$(VENV)/bin/ttr reproduce $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) results .pytest_cache .ruff_cache
