# syntax=docker/dockerfile:1
# fedgrad container image: the `fedgrad` CLI as entrypoint, run as a non-root user.
#
#   docker build -t fedgrad:0.1.0 .                       # CPU torch (default)
#   docker build -t fedgrad:0.1.0-cu128 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # CUDA torch
#   docker run --rm fedgrad:0.1.0 --help
#
# See deploy/README.md for Compose and Kubernetes.

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: a self-contained virtualenv in /opt/fedgrad -------------------------------
FROM ${PYTHON_IMAGE} AS build

# The default index's Linux torch wheel bundles CUDA (GBs); the CPU index has the
# small CPU-only build. A CUDA variant only swaps the index (or the whole spec).
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/fedgrad/bin:$PATH

# torch first, in its own layer: `pip install .` below then finds it satisfied, and code
# changes do not re-download it. DL3013: the version is pinned, in TORCH_SPEC.
# hadolint ignore=DL3013
RUN python -m venv /opt/fedgrad \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

WORKDIR /src
# Only what the wheel needs (pyproject's package-dir folders); .dockerignore allowlists them.
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY common/ common/
COPY server/ server/
COPY client/ client/
COPY launch/ launch/
RUN pip install --no-cache-dir . \
    && fedgrad --help > /dev/null

# --- runtime: the same base, the virtualenv, an unprivileged user ------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="fedgrad" \
      org.opencontainers.image.description="gRPC aggregator and compute nodes for data-parallel PyTorch training" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it and volumes can be
# prepared for it. /var/lib/fedgrad is the data directory: a fresh named volume mounted
# there inherits this ownership.
RUN groupadd --system --gid 10001 fedgrad \
    && useradd --system --uid 10001 --gid fedgrad --home-dir /home/fedgrad \
       --create-home --shell /usr/sbin/nologin fedgrad \
    && install -d -o fedgrad -g fedgrad -m 0750 /var/lib/fedgrad

COPY --from=build /opt/fedgrad /opt/fedgrad

# MPLCONFIGDIR: matplotlib (used by `fedgrad plot`) needs a writable config dir, and the
# root filesystem is read-only under the Compose and Kubernetes manifests (/tmp is not).
ENV PATH=/opt/fedgrad/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /var/lib/fedgrad
USER 10001:10001

# 50051: gRPC (aggregator --listen); 9090: Prometheus metrics (aggregator --metrics-port).
EXPOSE 50051 9090

# For a plaintext aggregator (--insecure). Under TLS the probe needs the CA and a client
# certificate: deploy/compose.yaml overrides this with those options; nodes disable it.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["fedgrad", "health", "127.0.0.1:50051", "--timeout", "3"]

ENTRYPOINT ["fedgrad"]
CMD ["--help"]
