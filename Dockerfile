# syntax=docker/dockerfile:1
# One image with every binary of the workspace; compose picks the binary per service.
#
#   docker build -t iot-pipeline .
#
# Stages: cargo-chef caches the dependency build in its own layer (rebuilt only when
# Cargo.toml or Cargo.lock change), then the workspace is built, then the binaries go
# into a slim Debian image that runs as an unprivileged user.

FROM rust:1-bookworm AS chef
RUN cargo install cargo-chef --locked
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS build
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --recipe-path recipe.json
COPY . .
RUN cargo build --release --workspace --bins

FROM debian:bookworm-slim AS runtime
# ca-certificates for TLS to brokers and databases; openssl for mosquitto/certs.sh (the
# compose service that makes development certificates runs this image); curl for the
# healthchecks (/health/ready); prometheus-mqtt-exporter for the brokers' metrics (the
# monitoring profile).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates openssl curl prometheus-mqtt-exporter \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin iot
COPY --from=build \
    /src/target/release/temperature-sensor \
    /src/target/release/pressure-sensor \
    /src/target/release/device-status \
    /src/target/release/mqtt-subscriber \
    /src/target/release/edge-relay \
    /src/target/release/mongo-persister \
    /src/target/release/readings \
    /usr/local/bin/
COPY mosquitto/certs.sh /usr/local/bin/certs.sh
COPY monitoring/mosquitto-exporter.sh /usr/local/bin/mosquitto-exporter
COPY monitoring/mosquitto-exporter.yaml /usr/local/share/iot-pipeline/mosquitto-exporter.yaml
# A fresh named volume mounted on /certs takes this folder's owner, so the certs
# service can write there without root.
RUN mkdir /certs && chown iot /certs
# The same for edge-relay's log.
RUN mkdir -p /var/lib/edge-relay && chown iot /var/lib/edge-relay
USER iot
WORKDIR /home/iot
