#!/usr/bin/env bash
# Installs what bench/peers.sh runs besides our binaries: node-red-contrib-mongodb4 at
# the version pinned in bench/peers/package-lock.json into bench/peers/node_modules/
# (git-ignored; Node-RED itself comes from nodered/install.sh), and paho-mqtt and
# pymongo into the project's .venv/. Does nothing when both are in place. Used by
# scripts/test (the benchmark's smoke run).
#
#   bench/peers/install.sh
set -euo pipefail
cd "$(dirname "$0")"

say() { printf 'bench/peers/install.sh: %s\n' "$*" >&2; }

PAHO_VERSION=2.1.0
PYMONGO_VERSION=4.20.1

# One install at a time (tests run in parallel): hold a lock on this script.
exec 9<"$(basename "$0")"
flock 9

../../nodered/install.sh
stamp=node_modules/.installed-lock
digest=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
  say "installing node-red-contrib-mongodb4 (bench/peers/package-lock.json) into bench/peers/node_modules/"
  npm ci --omit=dev --no-audit --no-fund --loglevel=error
  echo "$digest" > "$stamp"
fi

cd ../..
[ -x .venv/bin/python ] || python3 -m venv .venv
if ! .venv/bin/python -c "
import sys, paho.mqtt, pymongo
sys.exit(paho.mqtt.__version__ != '$PAHO_VERSION' or pymongo.version != '$PYMONGO_VERSION')" 2>/dev/null; then
  say "installing paho-mqtt $PAHO_VERSION and pymongo $PYMONGO_VERSION into .venv/"
  .venv/bin/pip install --quiet --disable-pip-version-check "paho-mqtt==$PAHO_VERSION" "pymongo==$PYMONGO_VERSION"
fi
