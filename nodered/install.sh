#!/usr/bin/env bash
# Installs Node-RED and the dashboard nodes at the versions pinned in
# nodered/package-lock.json into nodered/node_modules/ (git-ignored), with Node.js and
# npm from apt when they are missing. Does nothing when that lock file is already
# installed. Used by scripts/dev-stack --dashboard and scripts/test.
#
#   nodered/install.sh
set -euo pipefail
cd "$(dirname "$0")"

say() { printf 'nodered/install.sh: %s\n' "$*" >&2; }

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  say "installing nodejs and npm with apt-get"
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends nodejs npm
fi
# Node-RED 4.1 needs Node.js 18.5 or newer (Debian 12 has 18.19).
if ! node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 18 || (a === 18 && b >= 5) ? 0 : 1)'; then
  say "Node.js $(node --version) is too old: Node-RED 4.1 needs 18.5 or newer"
  exit 1
fi

# One install at a time (tests run in parallel): hold a lock on this script.
exec 9<"$(basename "$0")"
flock 9

# The lock file's digest, remembered beside what it installed.
stamp=node_modules/.installed-lock
digest=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then
  exit 0
fi
say "installing Node-RED and the dashboard nodes (nodered/package-lock.json) into nodered/node_modules/"
npm ci --no-audit --no-fund --loglevel=error
echo "$digest" > "$stamp"
