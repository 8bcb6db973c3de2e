# syntax=docker/dockerfile:1
# One image with every binary of the workspace; compose picks the binary per service.
#
#   docker build -t iot-pipeline .
#
# Stages: the planner keeps only the workspace's manifests, every target an empty stub,
# so that the dependencies are built in a layer of their own (rebuilt only when a
# Cargo.toml or Cargo.lock changes); then the workspace is built; then the binaries go
# into a slim Debian image that runs as an unprivileged user. (The classic builder
# computes COPY's cache key from the files' contents, not their times.)

FROM rust:1-bookworm AS planner
WORKDIR /src
COPY . .
RUN set -eu; \
    mkdir /skeleton; \
    cp Cargo.toml Cargo.lock /skeleton/; \
    for manifest in crates/*/Cargo.toml tests/Cargo.toml; do \
      dir=${manifest%/Cargo.toml}; \
      mkdir -p "/skeleton/$dir"; \
      cp "$manifest" "/skeleton/$dir/"; \
      for target in "$dir"/src/lib.rs "$dir"/src/main.rs "$dir"/benches/*.rs; do \
        [ -f "$target" ] || continue; \
        mkdir -p "/skeleton/${target%/*}"; \
        echo 'fn main() {}' > "/skeleton/$target"; \
      done; \
    done

FROM rust:1-bookworm AS build
WORKDIR /src
# The shipped binaries only (not the tests package's tools, nor its features).
ENV BINARIES="-p temperature-sensor -p pressure-sensor -p device-status -p mqtt-subscriber -p edge-relay -p mongo-persister -p readings"
COPY --from=planner /skeleton/ ./
RUN cargo build --release --locked $BINARIES
# What the binaries are built from (docs and the rest do not rebuild them): the crates
# and the presets they embed.
COPY crates crates
COPY ingest ingest
# The sources are older than the stubs built above: newer, so cargo builds them.
RUN find crates -name '*.rs' -exec touch {} + \
    && cargo build --release --locked $BINARIES

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
# A fresh named volume takes the owner of the folder it is mounted on: the certs
# service writes the cloud broker's certificate and key (/certs), the CA's certificate
# for the edge (/ca), and keeps the CA's key apart (/ca-private, its own only), and
# edge-relay its log, without root; so does compose.cluster.yaml's nats-config, the
# NATS nodes' configuration and certificates (/nats*).
RUN mkdir -p /certs /ca /ca-private /var/lib/edge-relay /nats /nats-certs /nats-ca /nats-ca-private \
    && chown iot /certs /ca /ca-private /var/lib/edge-relay /nats /nats-certs /nats-ca /nats-ca-private \
    && chmod 700 /ca-private /nats-ca-private
USER iot
WORKDIR /home/iot
