#!/usr/bin/env bash
# Persister ingest benchmark: N queued QoS 1 readings drained from the cloud broker
# into the database, in documents per second, beside a baseline of one insert per
# message (the seed's approach: mongo-persister --batch-size 1) on the same broker and
# server in the same run. Prints a Markdown table; each figure is the median of R runs.
#
#   bench/persister.sh [N] [R]        (defaults: N=3000, R=3)
#
# Needs what scripts/test installs (mosquitto, and nx-27017 in .venv unless a mongod is
# on the PATH) and release binaries (built here).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-3000}
R=${2:-3}

cargo build --release --quiet --bin mongo-persister --bin temperature-sensor
bin=${CARGO_TARGET_DIR:-target}/release
work=$(mktemp -d /tmp/iot-bench-XXXXXX)
chmod 755 "$work"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "nothing on port $1" >&2; exit 1; }

export TEMPERATURE_SENSOR_PASSWORD=x PRESSURE_SENSOR_PASSWORD=x DEVICE_STATUS_PASSWORD=x \
  MQTT_SUBSCRIBER_PASSWORD=x BRIDGE_PASSWORD=bench MONGO_PERSISTER_PASSWORD=bench
mqtt_port=$(free_port)
MQTT_LISTEN_PORT=$mqtt_port MQTT_LISTEN_ADDRESS=127.0.0.1 mosquitto/setup.sh cloud "$work/cloud" 2>/dev/null
mosquitto -c "$work/cloud/mosquitto.conf" 2>"$work/broker.log" & pids+=($!)
wait_port "$mqtt_port"

db_port=$(free_port)
if command -v mongod >/dev/null 2>&1; then
  server="mongod $(mongod --version | head -n 1)"
  mkdir -p "$work/db"; mongod --dbpath "$work/db" --bind_ip 127.0.0.1 --port "$db_port" --quiet >"$work/db.log" 2>&1 & pids+=($!)
else
  server="nx-27017 $(.venv/bin/pip show nx-27017 | sed -n 's/^Version: //p')"
  .venv/bin/nx-27017 --data-dir "$work/db" --host 127.0.0.1 --port "$db_port" \
    --log-file "$work/db.log" --pid-file "$work/db.pid" >/dev/null 2>&1 & pids+=($!)
fi
wait_port "$db_port"

export CLOUD_BROKER=127.0.0.1 CLOUD_PORT=$mqtt_port CLOUD_USERNAME=mongo-persister CLOUD_PASSWORD=bench \
  MONGODB_URI="mongodb://127.0.0.1:$db_port" RUST_LOG=info

# One drain: queue N readings for the persister's session, then time it storing them.
drain() { # batch-size run-number -> seconds
  local batch=$1 db="bench_${1}_$2" log="$work/persister-$1-$2.log"
  MONGODB_DATABASE=$db "$bin/mongo-persister" --client-id "bench-$1-$2" --batch-size "$batch" >"$log" 2>&1 &
  local pid=$!
  until grep -q 'subscribed filter="/device/#"' "$log"; do sleep 0.05; done
  kill -TERM "$pid"; wait "$pid"
  LOCAL_BROKER=127.0.0.1 LOCAL_PORT=$mqtt_port LOCAL_USERNAME=bridge LOCAL_PASSWORD=bench RUST_LOG=warn \
    "$bin/temperature-sensor" --format json --qos 1 --interval 0 --no-retain --count "$N" --device "bench-$2"
  local start end
  start=$(date +%s.%N)
  MONGODB_DATABASE=$db "$bin/mongo-persister" --client-id "bench-$1-$2" --batch-size "$batch" --stats-interval 0.05 >"$log" 2>&1 &
  pid=$!
  until grep -q "written=$N " "$log"; do sleep 0.02; done
  end=$(date +%s.%N)
  kill -TERM "$pid"; wait "$pid"
  python3 -c "print(f'{$end - $start:.3f}')"
}

median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

declare -A seconds
for batch in 1 500; do
  for run in $(seq "$R"); do
    seconds[$batch]+="$(drain "$batch" "$run")"$'\n'
  done
done
base=$(printf '%s' "${seconds[1]}" | median)
fast=$(printf '%s' "${seconds[500]}" | median)
rate() { python3 -c "print(f'{$N / $1:,.0f}')"; }

echo
echo "Persister ingest, $N queued QoS 1 JSON readings, median of $R runs, $(nproc) cores, $server, $(date -u +%F)"
echo
echo "| mode | seconds | documents/s | ratio |"
echo "| --- | ---: | ---: | ---: |"
echo "| baseline: one insert per message (--batch-size 1) | $base | $(rate "$base") | 1.0 |"
echo "| mongo-persister (--batch-size 500) | $fast | $(rate "$fast") | $(python3 -c "print(f'{$base / $fast:.1f}')") |"
