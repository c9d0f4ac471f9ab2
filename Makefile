# One command per habit, the same locally and in CI.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Where pip finds torch's CPU build (the lock pins torch==2.13.0+cpu by hash; PyPI serves only the
# CUDA build). A mirror of PyTorch's CPU index, or a local folder of wheels, works the same:
#   make install TORCH_INDEX=https://mirror.example/pytorch/whl/cpu    or    PIP_FIND_LINKS=/wheels make
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# Where `make lock` finds that wheel: a folder (or page) of wheels holding it when there is one (pip's
# own find-links setting by default), else TORCH_INDEX.
TORCH_FIND_LINKS ?= $(shell pip3 config get global.find-links 2> /dev/null)
PIP_TORCH := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
REQ     := requirements

PACKAGES := contracts model service cli demo loadtest loop

.PHONY: install test test-fast test-latest lock lint bench demo loop-demo ab-demo compose-test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Everything from the lock, by hash: torch first (from its own index), then the rest (pip, setuptools
# and wheel included), then the project itself with no dependencies of its own to resolve.
$(STAMP): $(REQ)/dev.txt $(REQ)/torch.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --require-hashes --no-deps $(PIP_TORCH) -r $(REQ)/torch.txt
	$(BIN)/pip install --quiet --require-hashes -r $(REQ)/dev.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# The lock: requirements/dev.txt is one resolution of every set (train, serve, dev) for Python 3.11
# on linux x86_64, exact versions with hashes; serve.txt, train.txt and gpu.txt are the images' sets
# resolved under it (the same versions; gpu.txt for the CUDA base's Python 3.12); torch.txt is torch's pin alone (installed first, from
# TORCH_INDEX). Regenerate after editing pyproject.toml's ranges; `make test` then installs it.
UV_COMPILE = $(BIN)/uv pip compile --quiet --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --no-header --no-strip-extras \
	$(if $(TORCH_FIND_LINKS),$(foreach d,$(TORCH_FIND_LINKS),--find-links $(d)),\
	$(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX) --index-strategy unsafe-best-match))
lock: $(BIN)/python
	@test -x $(BIN)/uv || $(BIN)/pip install --quiet 'uv>=0.5,<1'
	$(UV_COMPILE) pyproject.toml $(REQ)/torch-cpu.in $(REQ)/build.in --extra train --extra serve --extra dev \
		-o $(REQ)/dev.txt
	$(UV_COMPILE) pyproject.toml $(REQ)/build.in --extra serve -c $(REQ)/dev.txt -o $(REQ)/serve.txt
	$(UV_COMPILE) pyproject.toml $(REQ)/torch-cpu.in $(REQ)/build.in --extra train --extra serve \
		-c $(REQ)/dev.txt -o $(REQ)/train.txt
	@# the GPU image runs the CUDA base's own Python (Ubuntu 24.04: 3.12), so its set is resolved for it
	$(UV_COMPILE:3.11=3.12) pyproject.toml $(REQ)/build.in --extra gpu -c $(REQ)/dev.txt -o $(REQ)/gpu.txt
	{ echo "# torch's pin alone, from dev.txt (make lock): installed first, from TORCH_INDEX"; \
	  sed -n '/^torch==/,/^    #/p' $(REQ)/dev.txt | grep -v '^    #'; } > $(REQ)/torch.txt
	@echo "lock written: $(REQ)/{dev,serve,train,gpu,torch}.txt"

lint: $(STAMP)
	$(BIN)/ruff check $(PACKAGES) tests bench docker
	$(BIN)/ruff format --check $(PACKAGES) tests bench docker
	$(BIN)/mypy $(PACKAGES)

test: lint
	$(BIN)/pytest -q

# The edit-test loop: everything but the tests marked slow (end to end, the demo, the image replay).
test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

# Drift, before users see it: the suite in its own environment (.venv-latest) on the newest releases
# that pyproject.toml's ranges allow, not the lock (torch stays the pinned CPU wheel).
LATEST := .venv-latest
test-latest:
	rm -rf $(LATEST) && $(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet --upgrade pip
	$(LATEST)/bin/pip install --quiet $(PIP_TORCH) 'torch==2.13.0'
	$(LATEST)/bin/pip install --quiet --upgrade --upgrade-strategy eager -e '.[train,serve,dev]'
	$(LATEST)/bin/pip list --format=freeze > $(LATEST)/versions.txt
	@echo "newest allowed releases: $(LATEST)/versions.txt; differences from the lock:"
	@$(PY) -c "import re,sys; lock=dict(re.findall(r'^([A-Za-z0-9._-]+)==(\S+)', open('$(REQ)/dev.txt').read(), re.M)); \
		norm=lambda n: re.sub(r'[-_.]+','-',n).lower(); lock={norm(k):v for k,v in lock.items()}; \
		[print(f'  {n}: lock {lock[norm(n)]} -> {v}') for n,v in (l.strip().split('==') for l in open('$(LATEST)/versions.txt') if '==' in l) \
		 if norm(n) in lock and lock[norm(n)]!=v]"
	DIN_TEST_LATEST=1 $(LATEST)/bin/pytest -q -p no:cacheprovider

# The serving graph alone, the whole service against the seed-style baseline, then the service at
# 1x, 2x and 5x its capacity, what `explain` costs, and what the impression log costs (JSON in bench/results);
# bench/precision.py (fp32 vs int8, native sgemm) unsets OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE itself.
bench: $(STAMP)
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/precision.py
	$(BIN)/python bench/e2e.py
	$(BIN)/python bench/overload.py
	$(BIN)/python bench/explain.py
	$(BIN)/python bench/impressions.py
	$(BIN)/python bench/shadow.py

demo: $(STAMP)
	$(BIN)/din demo

# The loop, one turn: the demo model served with impressions logged, simulated users, a drift, export,
# retrain, promote, and the same users again (prints CTR/AUC per phase; .din/loop/loop.png).
loop-demo: $(STAMP)
	$(BIN)/din loop-demo

# The same turn with an A/B test before the promotion: the stale bundle vs the retrained one, half the
# users each, din report (CTR per arm, the difference with its interval), promote, roll back (.din/loop-ab).
ab-demo: $(STAMP)
	$(BIN)/din loop-demo --ab

# The real stack under Docker: build, compose up, rank through the balancer, scale, kill a ranker
# and stop Redis under load, the cluster profile (docker/compose_test.py; skips without an engine).
compose-test: $(STAMP)
	$(BIN)/python docker/compose_test.py

clean:
	rm -rf $(VENV) $(LATEST) runs .pytest_cache .ruff_cache .mypy_cache
