# The scripts' shared choices (sourced, not run; POSIX sh): the pinned versions of what
# they install from PyPI, which MongoDB-compatible server runs when none is named, how a
# secret is made, and where Python packages go. Sourced by scripts/dev-stack,
# scripts/test, scripts/new-env, scripts/add-device and bench/lib.sh from the
# repository's root. (tests/src/lib.rs makes the same database choice for a test run
# started with a bare `cargo test`.)

# nx-27017, the MongoDB wire-protocol server on SQLite, when no mongod is installed.
NX_VERSION=0.8.1
# honcho, which runs the native stack's Procfile.
HONCHO_VERSION=2.0.0

# Which database server to use: `uri` when MONGODB_URI names one, `mongod` when one is
# on the PATH, else `nx-27017` (installed into .venv/ with venv_install).
database_server() {
  if [ -n "${MONGODB_URI:-}" ]; then
    echo uri
  elif command -v mongod >/dev/null 2>&1; then
    echo mongod
  else
    echo nx-27017
  fi
}

# A new secret: 144 random bits as hex, nothing Mosquitto's password file or a MongoDB
# connection string would need escaped.
random_secret() { od -An -N18 -tx1 /dev/urandom | tr -d ' \n'; }

# Whether .venv/ holds PACKAGE at VERSION.
venv_has() { [ -x .venv/bin/pip ] && .venv/bin/pip show "$1" 2>/dev/null | grep -qx "Version: $2"; }

# Installs PACKAGE at VERSION into .venv/ (made when missing) unless it is there.
venv_install() {
  venv_has "$1" "$2" && return 0
  [ -x .venv/bin/pip ] || python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check "$1==$2"
}
