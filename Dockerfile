# transaction-service: gRPC on 50051, HTTP (Junction webhooks, /metrics, /healthz, /readyz) on
# 8080, state in the /data volume.
#   docker build -t transaction-service .
#   docker run -p 50051:50051 -p 8080:8080 -v txdata:/data \
#     -e TRANSACTION_SERVICE_WEBHOOK_SECRETS=whsec_... transaction-service
# On SIGTERM the service drains in-flight calls for TRANSACTION_SERVICE_SHUTDOWN_GRACE_SECONDS,
# set to 8 s here so it finishes inside `docker stop`'s default 10 s before SIGKILL.

# -- build: install the package and its runtime dependencies (no dev extras) into a venv --------
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /build
COPY pyproject.toml README.md ./
COPY src/ src/
# The client distribution: the generated stubs, and the client the commands use. Installed in
# the same pip command as the server, which depends on it.
COPY client/ client/
RUN pip install ./client .

# -- runtime: the venv only, as an unprivileged user ---------------------------------------------
FROM python:3.11-slim

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TRANSACTION_SERVICE_DB=/data/transactions.db \
    TRANSACTION_SERVICE_SHUTDOWN_GRACE_SECONDS=8

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin app \
    && mkdir /data \
    && chown app:app /data

COPY --from=build /opt/venv /opt/venv

USER app
WORKDIR /data
# Declared after the chown, so a new named volume starts out owned by the app user.
VOLUME /data
EXPOSE 50051 8080

# Asks the gRPC health service on localhost:$TRANSACTION_SERVICE_GRPC_PORT (default 50051). With
# TLS on, override it to pass the CA (and a client certificate under mTLS):
#   --health-cmd 'transaction-service health --ca /certs/ca.pem'
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["transaction-service", "health", "--timeout", "3"]

CMD ["transaction-service", "serve"]
