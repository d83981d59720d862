# syntax=docker/dockerfile:1
#
# The gateway's production image: one uvicorn worker (uvloop + httptools) per container.
#
#   docker build -t gateway:0.1.0 .
#   docker run --rm -p 8000:8000 -e GATEWAY_ENV=production -e GATEWAY_JWT_SECRET=... gateway:0.1.0
#
# Two stages: the builder makes a virtual environment with `pip install .` (the runtime
# dependencies of pyproject.toml, no test extra, no editable install; the compiled modules
# built with the builder's C compiler); the final stage is a
# fresh slim Python with that venv copied in and nothing else: no pip cache, no build
# files, no tests, running as an unprivileged user. tests/test_deploy.py builds the same
# venv from the same files, starts the same command and lints this file with hadolint.
# docs/deploy.md explains the settings, Kubernetes manifests (k8s/) and operations.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# A C compiler for the compiled modules (setup.py); this stage only, the image gets the
# venv alone.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
# Only what the package is built from (.dockerignore keeps caches and the rest out).
COPY pyproject.toml setup.py README.md ./
COPY auth/ ./auth/
COPY channels/ ./channels/
COPY gateway/ ./gateway/
# Built with its compiled modules (the check fails the build if they are not).
RUN /opt/venv/bin/pip install . \
    && /opt/venv/bin/python -I -c "import gateway.__main__, uvloop, httptools" \
    && /opt/venv/bin/python -I -c "import gateway.ws, sys; sys.exit(gateway.ws.__file__.endswith('.py'))"

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="gateway" \
      org.opencontainers.image.description="Real-time streaming gateway: WebSocket and SSE fan-out"
# Production: without GATEWAY_JWT_SECRET or GATEWAY_JWT_PUBLIC_KEY the image refuses to
# start, instead of an open dev mode on every interface (-e GATEWAY_ENV=development for it).
ENV GATEWAY_ENV=production \
    PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8000
# A fixed numeric uid/gid, so that Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin gateway
COPY --from=builder /opt/venv /opt/venv
# An empty directory owned by root: `python -m` puts the working directory first on
# sys.path, so it must not be one the gateway's user can write to. Nothing is written at
# run time except (possibly) temporary files: the root filesystem can be read-only, with a
# writable /tmp (k8s/deployment.yaml mounts an emptyDir there; `docker run --read-only
# --tmpfs /tmp` does the same).
WORKDIR /app
USER 10001:10001
EXPOSE 8000
# Docker's own health check (Kubernetes uses the probes in k8s/deployment.yaml instead).
# No curl in the slim image: Python's urllib, failing (exit 1) on any error or non-2xx.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
# SIGTERM starts the drain: stop accepting, not ready, WebSockets closed with 1012, SSE
# streams ended, exit within GATEWAY_DRAIN_SECONDS. Exec form: python is PID 1 and gets it.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "gateway"]
# One worker per container: scale with replicas, not --workers.
CMD ["--host", "0.0.0.0", "--port", "8000", "--workers", "1"]
