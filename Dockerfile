# syntax=docker/dockerfile:1
# The `chat` image: one binary for every process of the system; the command picks which.
#
#   docker build -t chat:local .
#   docker run --rm -p 8080:8080 -v chat-data:/data chat:local           # all-in-one (embedded store in /data)
#   docker run ... chat:local gateway --nats nats://nats-1:4222 --cql scylla-1:9042
#   docker run ... -e CHAT_LISTEN=0.0.0.0:9180 chat:local fanout --nats ... --cql ...
#
# Every flag has an environment twin (README.md's configuration table). The image listens on
# 0.0.0.0:8080 (CHAT_LISTEN) whatever the command: give a fanout worker CHAT_LISTEN=0.0.0.0:9180
# to keep the port the source gives its ops endpoints. The HEALTHCHECK follows CHAT_LISTEN, so
# set the address there rather than with --listen.
#
# Build stages (the cargo-chef pattern): `planner` reduces the workspace to a recipe of its
# dependencies, `builder` compiles them in a layer that only a change of the manifests or
# Cargo.lock invalidates, then compiles the workspace's own crates. Linted by
# deploy/container/check (hadolint); see docs/deploy/containers.md.

ARG RUST_VERSION=1.95.0
ARG DEBIAN_RELEASE=trixie

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --package chat --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --package chat --bin chat

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# CA roots for TLS to NATS, CQL or an OTLP collector (the build image has ca-certificates): no
# package manager runs in this stage. The binary links only glibc and libgcc, which slim has.
COPY --from=builder /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=builder /src/target/release/chat /usr/local/bin/chat
COPY --chmod=0755 deploy/container/healthcheck /usr/local/bin/chat-healthcheck
RUN useradd --system --no-log-init --uid 10001 --user-group --no-create-home \
      --home-dir /data --shell /usr/sbin/nologin chat \
    && install -d -o chat -g chat -m 0750 /data
USER 10001:10001
WORKDIR /data
ENV CHAT_LISTEN=0.0.0.0:8080 \
    CHAT_DATA_DIR=/data
# 8080: HTTP and WebSockets of a gateway or the all-in-one server (/ws, /healthz, /readyz,
# /metrics); 9180: a fanout worker's ops endpoints when run with CHAT_LISTEN=0.0.0.0:9180.
EXPOSE 8080 9180
# Liveness (/healthz), not readiness: an orchestrator that restarts unhealthy containers must not
# restart every gateway while NATS or the store is down. Load balancers probe /readyz.
HEALTHCHECK --interval=10s --timeout=6s --start-period=60s --retries=3 CMD ["chat-healthcheck"]
ENTRYPOINT ["chat"]
