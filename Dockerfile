# syntax=docker/dockerfile:1
# din-rank images, one Dockerfile, three targets:
#   serve      (default) the CPU ranking service: slim Python, the `serve` extra only (no torch, no compiler)
#   serve-gpu  the same service on CUDA + cuDNN with onnxruntime-gpu (DIN_PROVIDERS=auto picks CUDA)
#   train      torch (CPU) + the `train` extra: synth / prepare / train / export / seed (compose's bootstrap)
#
#   docker build --target serve -t din-rank:serve .
#   docker run -p 8000:8000 -v "$PWD/runs/bundle:/models/bundle:ro" \
#       -e DIN_REDIS_URL=redis://host.docker.internal:6379/0 din-rank:serve
#
# Dependency layers come before the source: they are rebuilt only when pyproject.toml changes.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

# ------------------------------------------------------------------ builder: the serve venv
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Dependencies only: the project before its source is copied (no package found), then removed again.
COPY pyproject.toml README.md ./
# DL3013: the versions are the ranges of pyproject.toml, the project's one source of truth.
# hadolint ignore=DL3013
RUN pip install '.[serve]' \
 && pip uninstall --yes din-rank
COPY model/ model/
COPY service/ service/
COPY cli/ cli/
COPY demo/ demo/
COPY loadtest/ loadtest/
RUN pip install --no-deps . \
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
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["din", "serve"]

# ------------------------------------------------------------------ serve-gpu: CUDA + onnxruntime-gpu
FROM ${CUDA_IMAGE} AS builder-gpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install --yes --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
# onnxruntime (from `serve`) and onnxruntime-gpu share one import name: keep only the GPU build.
# hadolint ignore=DL3013
RUN pip install '.[serve,gpu]' \
 && pip uninstall --yes din-rank onnxruntime onnxruntime-gpu \
 && pip install --no-deps 'onnxruntime-gpu>=1.18'
COPY model/ model/
COPY service/ service/
COPY cli/ cli/
COPY demo/ demo/
COPY loadtest/ loadtest/
RUN pip install --no-deps . \
 && din --help > /dev/null

FROM ${CUDA_IMAGE} AS serve-gpu
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DEBIAN_FRONTEND=noninteractive \
    DIN_BUNDLE=/models/bundle \
    DIN_HOST=0.0.0.0 \
    DIN_PORT=8000 \
    DIN_LOG_JSON=true \
    DIN_PROVIDERS=auto
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install --yes --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 din \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/din din \
 && mkdir -p /models \
 && chown din:din /models
COPY --from=builder-gpu /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/din
VOLUME ["/models"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["din", "serve"]

# ------------------------------------------------------------------ train: torch CPU, builds bundles
FROM ${PYTHON_IMAGE} AS train
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
WORKDIR /src
RUN python -m venv /opt/venv \
 && pip install --index-url https://download.pytorch.org/whl/cpu 'torch==2.13.0'
COPY pyproject.toml README.md ./
# hadolint ignore=DL3013
RUN pip install '.[train,serve]' \
 && pip uninstall --yes din-rank
COPY model/ model/
COPY service/ service/
COPY cli/ cli/
COPY demo/ demo/
COPY loadtest/ loadtest/
COPY docker/bootstrap.sh /usr/local/bin/din-bootstrap
RUN pip install --no-deps . \
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
