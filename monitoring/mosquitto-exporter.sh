#!/bin/sh
# The brokers' exporter for one broker: fills monitoring/mosquitto-exporter.yaml in
# with the broker's address and runs Debian's prometheus-mqtt-exporter with it.
#
#   monitoring/mosquitto-exporter.sh BROKER_HOST:PORT [LISTEN_ADDRESS [LISTEN_PORT]]
#
# Listens on 0.0.0.0:9641 unless told otherwise. Logs in as MQTT2PROM_MQTT_USER with
# MQTT2PROM_MQTT_PASSWORD (the read-only user mqtt-subscriber). The template is
# EXPORTER_TEMPLATE, else the one beside this script, else the image's copy.
set -eu

die() { echo "mosquitto-exporter: $*" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 3 ] || die "usage: mosquitto-exporter.sh BROKER_HOST:PORT [LISTEN_ADDRESS [LISTEN_PORT]]"
case $1 in *:*) ;; *) die "BROKER '$1': expected host:port" ;; esac
command -v prometheus-mqtt-exporter >/dev/null 2>&1 || die "prometheus-mqtt-exporter not found: apt-get install prometheus-mqtt-exporter"
[ -n "${MQTT2PROM_MQTT_USER:-}" ] && [ -n "${MQTT2PROM_MQTT_PASSWORD:-}" ] \
  || die "set MQTT2PROM_MQTT_USER and MQTT2PROM_MQTT_PASSWORD (the broker user mqtt-subscriber)"

template=${EXPORTER_TEMPLATE:-$(dirname "$0")/mosquitto-exporter.yaml}
[ -f "$template" ] || template=/usr/local/share/iot-pipeline/mosquitto-exporter.yaml
config=$(mktemp "${TMPDIR:-/tmp}/mosquitto-exporter.XXXXXX")
sed "s|@BROKER@|$1|" "$template" > "$config"
exec prometheus-mqtt-exporter -config "$config" \
  -listen-address "${2:-0.0.0.0}" -listen-port "${3:-9641}"
