# Shared helpers of the benchmark scripts (sourced, not run): a scratch folder cleaned
# up on exit, free ports, the project's brokers and database on them, medians.
#
# Before sourcing, a script may set BENCH_PROFILE (release, the default, or debug for
# a quick smoke run with the binaries the tests build).

cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib.sh
# The settings several scripts share: runs per figure (medians), and the latency runs'
# rates and length (latency_run).
RUNS=${BENCH_RUNS:-3}
SECONDS_PER_RUN=${BENCH_SECONDS:-5}
RATES=${BENCH_RATES:-1000 5000}
BENCH_PROFILE=${BENCH_PROFILE:-release}
bin=${CARGO_TARGET_DIR:-target}/$BENCH_PROFILE
work=$(mktemp -d /tmp/iot-bench-XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

say() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; }

# Builds the named binaries in the chosen profile.
build() {
  local args=()
  for name in "$@"; do args+=(--bin "$name"); done
  case $BENCH_PROFILE in
    release) cargo build --release --quiet "${args[@]}" ;;
    debug) cargo build --quiet "${args[@]}" ;;
    *) say "BENCH_PROFILE must be release or debug"; exit 2 ;;
  esac
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 400); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
  say "nothing listens on port $1"; exit 1
}
# Waits until FILE has a line matching the extended regular expression.
wait_line() { # file regex [seconds]
  local tries=$(( ${3:-60} * 20 ))
  for _ in $(seq "$tries"); do grep -Eq "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done
  say "timed out waiting for /$2/ in $1:"; tail -n 5 "$1" >&2; exit 1
}

# One password for every broker user of the benchmark.
export TEMPERATURE_SENSOR_PASSWORD=bench PRESSURE_SENSOR_PASSWORD=bench DEVICE_STATUS_PASSWORD=bench \
  MQTT_SUBSCRIBER_PASSWORD=bench BRIDGE_PASSWORD=bench MONGO_PERSISTER_PASSWORD=bench \
  EDGE_RELAY_PASSWORD=bench

# The cloud broker alone from mosquitto/ (plain listener on $cloud_port, TLS on
# $cloud_tls_port): the benchmarks of one client against one broker use it.
start_cloud() {
  cloud_port=$(free_port) cloud_tls_port=$(free_port)
  MQTT_LISTEN_PORT=$cloud_port MQTT_TLS_PORT=$cloud_tls_port MQTT_LISTEN_ADDRESS=127.0.0.1 \
    MQTT_CERTS_DIR="$work/certs" mosquitto/setup.sh cloud "$work/cloud" 2>/dev/null
  mosquitto -c "$work/cloud/mosquitto.conf" 2>"$work/cloud.log" & pids+=($!)
  cloud_pid=$!
  wait_port "$cloud_port"
}

# The edge broker from mosquitto/ on $local_port (pid $local_pid), bridged over TLS to
# the cloud broker; with argument `relay`, set up for edge-relay instead (start_relay).
start_local() { # [bridge|relay]
  local forwarder=${1:-bridge}
  local_port=$(free_port)
  rm -rf "$work/local"
  EDGE_FORWARDER=$forwarder MQTT_LISTEN_PORT=$local_port MQTT_LISTEN_ADDRESS=127.0.0.1 MQTT_CERTS_DIR="$work/certs" \
    CLOUD_BRIDGE_HOST=127.0.0.1 CLOUD_BRIDGE_PORT=$cloud_tls_port \
    mosquitto/setup.sh local "$work/local" 2>/dev/null
  mosquitto -c "$work/local/mosquitto.conf" 2>"$work/local.log" & pids+=($!)
  local_pid=$!
  wait_port "$local_port"
  [ "$forwarder" = relay ] || wait_line "$work/cloud.log" "connected from .* as edge-bridge"
}

# edge-relay between the edge broker and the cloud broker (TLS), its log in LOG_DIR;
# its pid in $relay_pid, once it subscribed on both (with `edge`: on the edge broker,
# for a cloud broker that is down).
start_relay() { # log_dir [edge]
  LOCAL_BROKER=127.0.0.1 LOCAL_PORT=$local_port LOCAL_USERNAME=edge-relay LOCAL_PASSWORD=bench \
    CLOUD_BROKER=127.0.0.1 CLOUD_PORT=$cloud_tls_port CLOUD_TLS_CA="$work/certs/ca.crt" \
    CLOUD_USERNAME=edge-relay CLOUD_PASSWORD=bench RUST_LOG=info \
    "$bin/edge-relay" --log-dir "$1" 2>"$work/relay.log" >&2 & pids+=($!)
  relay_pid=$!
  wait_line "$work/relay.log" "subscribed on the edge broker"
  [ "${2:-}" = edge ] || wait_line "$work/relay.log" "subscribed on the cloud broker"
}

# The database as $db_uri: the server MONGODB_URI names when set, else one of our own
# on a free port (mongod when on the PATH, else nx-27017 from .venv).
start_database() {
  local db_port
  case $(database_server) in
    uri)
      server="the MONGODB_URI server"
      db_uri=$MONGODB_URI
      return
      ;;
    mongod)
      db_port=$(free_port)
      server="mongod $(mongod --version | head -n 1)"
      mkdir -p "$work/db"
      mongod --dbpath "$work/db" --bind_ip 127.0.0.1 --port "$db_port" --quiet >"$work/db.log" 2>&1 & pids+=($!)
      ;;
    nx-27017)
      [ -x .venv/bin/nx-27017 ] || { say "no database: set MONGODB_URI, put mongod on the PATH, or run scripts/test once (it installs nx-27017 into .venv)"; exit 1; }
      db_port=$(free_port)
      server="nx-27017 $(.venv/bin/pip show nx-27017 | sed -n 's/^Version: //p')"
      .venv/bin/nx-27017 --data-dir "$work/db" --host 127.0.0.1 --port "$db_port" \
        --log-file "$work/db.log" --pid-file "$work/db.pid" >/dev/null 2>&1 & pids+=($!)
      ;;
  esac
  wait_port "$db_port"
  db_uri="mongodb://127.0.0.1:$db_port"
}

# Resident memory of process PID in KiB (0 once it is gone).
rss() { awk '/VmRSS/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
# The median of the numbers on standard input, one per line.
median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
# Prints a Python expression's value: calc 'f"{3/2:.1f}"'.
calc() { python3 -c "print($1)"; }

# Runs a command (standard input and output passed through) and writes
# "wall_seconds cpu_seconds peak_rss_kib" of it to OUT.
cat > "$work/measure.py" <<'PY'
import resource, subprocess, sys, time
out, command = sys.argv[1], sys.argv[2:]
start = time.monotonic()
code = subprocess.call(command)
wall = time.monotonic() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(out, "w") as f:
    f.write(f"{wall:.3f} {usage.ru_utime + usage.ru_stime:.3f} {usage.ru_maxrss}\n")
sys.exit(code)
PY
measure=(python3 "$work/measure.py") # usage: [env VAR=...] "${measure[@]}" OUT command...

# Latency of JSON readings at RATE for SECONDS_PER_RUN seconds from a sensor on broker port
# SENSOR_PORT (user SENSOR_USER) to a subscriber on the cloud broker with client id
# $id; prints "p50 p99 max" in ms.
latency_run() { # rate sensor_port sensor_user
  local rate=$1 count out
  count=$(calc "max(1, int($rate * $SECONDS_PER_RUN))")
  out="$work/$id"
  env LOCAL_BROKER=127.0.0.1 LOCAL_PORT="$cloud_port" LOCAL_USERNAME=mqtt-subscriber LOCAL_PASSWORD=bench \
    RUST_LOG=info "$bin/mqtt-subscriber" --client-id "$id" --topic /sensor/# --qos 1 \
    --count "$count" --format json > "$out.jsonl" 2> "$out.log" &
  local sub=$!
  wait_line "$out.log" 'subscribed'
  env LOCAL_BROKER=127.0.0.1 LOCAL_PORT="$2" LOCAL_USERNAME="$3" LOCAL_PASSWORD=bench RUST_LOG=warn \
    "$bin/pressure-sensor" --rate "$rate" --count "$count" --format json --qos 1 --no-retain
  wait "$sub"
  python3 - "$out.jsonl" <<'PY'
import json, sys
from datetime import datetime
def t(text):
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
lat = sorted((t(m["received_at"]) - t(json.loads(m["payload"])["ts"])) * 1000
             for m in map(json.loads, open(sys.argv[1])))
pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
print(f"{pick(0.5):.0f} {pick(0.99):.0f} {lat[-1]:.0f}")
PY
}

# The top TOP entries of perf.data FILE by self time, then those matching PATTERN (ours
# and our libraries') by time with what they call (needs frame pointers).
perf_report() { # file top pattern
  echo "By self time:"
  perf report -i "$1" --no-children --sort symbol --stdio 2>/dev/null \
    | grep -E '^ +[0-9.]+%' | head -n "$2"
  echo
  echo "Ours and our libraries', with what they call (needs frame pointers):"
  perf report -i "$1" --children --sort symbol --stdio -g none 2>/dev/null \
    | grep -E '^ +[0-9.]+%' | grep -E "$3" | head -n "$2"
}
