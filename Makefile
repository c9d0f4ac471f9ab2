# One command per habit, the same locally and in CI.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch first, pinned: a bare `torch` would pull the multi-GB CUDA build.
TORCH   ?= torch==2.13.0

.PHONY: install test lint typecheck bench demo results clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[train,serve,dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check model service tests loadtest bench
	$(BIN)/ruff format --check model service tests loadtest bench
	$(BIN)/mypy service

test: lint
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python bench/inference.py

demo: $(STAMP)
	$(BIN)/din demo

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
