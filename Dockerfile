# din-rank images for the CPU, two targets (the GPU service is Dockerfile.gpu, so that no CPU build,
# under BuildKit or the classic builder, ever needs the CUDA base image):
#   serve      (default) the ranking service: slim Python, the `serve` set only (no torch, no compiler)
#   train      torch (CPU) + the `train` set: synth / prepare / train / export / seed (compose's bootstrap)
#
#   docker build --target serve -t din-rank:serve .
#   docker run -p 8000:8000 -v "$PWD/runs/bundle:/models/bundle:ro" \
#       -e DIN_REDIS_URL=redis://host.docker.internal:6379/0 din-rank:serve
#
# Every install comes from the lock (requirements/, `make lock`) by hash. Every base image and package
# index is a build argument with today's public default; a mirror or an air-gapped build overrides them:
#   docker build --build-arg PYTHON_IMAGE=registry.internal/python:3.11.11-slim-bookworm \
#       --build-arg PIP_INDEX_URL=https://pypi.internal/simple \
#       --build-arg TORCH_INDEX_URL=https://pypi.internal/pytorch-cpu --target train .
# No `# syntax=` line: BuildKit's built-in frontend builds this file, with no registry to ask.
# Dependency layers come before the source: they are rebuilt only when the lock changes.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ------------------------------------------------------------------ builder: the serve venv
FROM ${PYTHON_IMAGE} AS builder
ARG PIP_INDEX_URL=https://pypi.org/simple
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_INDEX_URL=${PIP_INDEX_URL} \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY requirements/serve.txt requirements/
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --require-hashes -r requirements/serve.txt
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
# Only what serving imports: the contracts, the service, the dispatcher, `din loadtest`, and of model/
# the torch-free reader `din seed` uses (tests/test_imports.py proves the service imports no torch).
COPY contracts/ contracts/
COPY model/__init__.py model/data.py model/
COPY service/ service/
COPY cli/ cli/
COPY loadtest/ loadtest/
RUN pip install --no-deps --no-build-isolation . \
 && din --help > /dev/null

# ------------------------------------------------------------------ serve: the CPU service
FROM ${PYTHON_IMAGE} AS serve
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DIN_BUNDLE=/models/bundle \
    DIN_HOST=0.0.0.0 \
    DIN_PORT=8000 \
    DIN_LOG_JSON=true
RUN groupadd --system --gid 10001 din \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/din din \
 && mkdir -p /models /reports \
 && chown din:din /models /reports
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/din
VOLUME ["/models"]
EXPOSE 8000
# Ready = the model is loaded and warm and the replica is not draining (Redis down still answers, degraded).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status == 200 else 1)"]
# Exec form: `din serve` is PID 1 and gets SIGTERM itself (it drains, then stops).
STOPSIGNAL SIGTERM
ENTRYPOINT ["din", "serve"]

# ------------------------------------------------------------------ train: torch CPU, builds bundles
FROM ${PYTHON_IMAGE} AS train
ARG PIP_INDEX_URL=https://pypi.org/simple
# torch's CPU build is not on PyPI: its own index (or a mirror of it; empty: PIP_INDEX_URL serves it).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_INDEX_URL=${PIP_INDEX_URL} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /src
COPY requirements/torch.txt requirements/train.txt requirements/
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --require-hashes --no-deps \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r requirements/torch.txt \
 && /opt/venv/bin/pip install --require-hashes -r requirements/train.txt
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY contracts/ contracts/
COPY model/ model/
COPY service/ service/
COPY cli/ cli/
COPY demo/ demo/
COPY loadtest/ loadtest/
COPY docker/bootstrap.sh /usr/local/bin/din-bootstrap
RUN pip install --no-deps --no-build-isolation . \
 && din --help > /dev/null \
 && groupadd --system --gid 10001 din \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/din din \
 && mkdir -p /models \
 && chown din:din /models
USER 10001:10001
WORKDIR /home/din
VOLUME ["/models"]
CMD ["din-bootstrap"]

# The default target (last stage wins otherwise): the CPU service.
FROM serve
