# One command per habit, the same locally and in CI.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch first, pinned: a bare `torch` would pull the multi-GB CUDA build.
TORCH   ?= torch==2.13.0

PACKAGES := model service cli demo loadtest

.PHONY: install test test-fast lint bench demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[train,serve,dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check $(PACKAGES) tests bench
	$(BIN)/ruff format --check $(PACKAGES) tests bench
	$(BIN)/mypy $(PACKAGES)

test: lint
	$(BIN)/pytest -q

# The edit-test loop: everything but the tests marked slow (end to end, the demo, the image replay).
test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

# The serving graph alone, the whole service against the seed-style baseline, then the service at
# 1x, 2x and 5x its capacity, and what `explain` costs (JSON in bench/results).
bench: $(STAMP)
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/e2e.py
	$(BIN)/python bench/overload.py
	$(BIN)/python bench/explain.py

demo: $(STAMP)
	$(BIN)/din demo

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
