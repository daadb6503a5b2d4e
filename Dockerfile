# transaction-service: gRPC on 50051, HTTP (Junction webhooks, /metrics, /healthz, /readyz) on
# 8080, state in the /data volume, as uid/gid 10001. See docs/deploy.md.
#   docker build -t transaction-service --build-arg REVISION=$(git rev-parse HEAD) .
#   docker run -p 50051:50051 -p 8080:8080 -v txdata:/data \
#     -e TRANSACTION_SERVICE_WEBHOOK_SECRETS=whsec_... transaction-service
# On SIGTERM the service drains in-flight calls for TRANSACTION_SERVICE_SHUTDOWN_GRACE_SECONDS,
# set to 8 s here so it finishes inside `docker stop`'s default 10 s before SIGKILL.

# The base, pinned by digest: python:3.11-slim's multi-platform image index as recorded by the
# official images' own ledger, docker-library/repo-info (repos/python/remote/3.11-slim.md at
# commit 2477d553): Python 3.11.15 on Debian trixie, built 2026-08-05. To move it, take the new
# digest from that file (or `docker buildx imagetools inspect python:3.11-slim`) and change it
# here and in the base.digest label below. `--build-arg PYTHON_IMAGE=...` builds on another base
# (the image test does, with a stand-in made from Debian packages).
ARG PYTHON_IMAGE=python:3.11-slim@sha256:90744cff8f32887f075c47d747a173ff333e9e98801667af93c357fa9f5e28ff

# -- build: the locked dependencies, then the package, into a venv ----------------------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /build
# Every dependency pinned with its hashes, the same lock `make run` installs (requirements-dev.lock,
# which `make test` and CI install, pins the same versions). A layer of its own: rebuilt only when
# the lock changes.
COPY requirements.lock ./
RUN pip install --require-hashes --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY src/ src/
# The client distribution (the generated stubs, and the client the commands use), which the
# server depends on; neither resolves dependencies: they are all in the lock.
COPY client/ client/
RUN pip install --no-deps ./client .

# -- runtime: the venv only, as an unprivileged numeric user ----------------------------------------
FROM ${PYTHON_IMAGE}

ARG VERSION=0.1.0
ARG REVISION=
LABEL org.opencontainers.image.title="transaction-service" \
      org.opencontainers.image.description="gRPC service that turns Junction lab-order webhooks into correct, current order-transaction state" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim" \
      org.opencontainers.image.base.digest="sha256:90744cff8f32887f075c47d747a173ff333e9e98801667af93c357fa9f5e28ff"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TRANSACTION_SERVICE_DB=/data/transactions.db \
    TRANSACTION_SERVICE_SHUTDOWN_GRACE_SECONDS=8

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin app \
    && mkdir /data \
    && chown 10001:10001 /data

# Owned by root and not writable by the app; the .pyc files pip compiled are in it, so nothing
# needs writing at run time (the root filesystem can be read-only; only /data is written).
COPY --from=build /opt/venv /opt/venv

# Numeric, so that a kubelet can check runAsNonRoot without reading /etc/passwd.
USER 10001:10001
WORKDIR /data
# Declared after the chown, so a new named volume starts out owned by the app user.
VOLUME /data
EXPOSE 50051 8080

# Asks the gRPC health service on localhost:$TRANSACTION_SERVICE_GRPC_PORT (default 50051); it
# imports grpc and the health stubs only, so it answers within the timeout on a busy machine.
# With TLS on, override it to pass the CA (and a client certificate under mTLS):
#   --health-cmd 'transaction-service health --ca /certs/ca.pem'
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["transaction-service", "health", "--timeout", "3"]

CMD ["transaction-service", "serve"]
