#!/usr/bin/env bash
# The persister beside what users would run instead, on the same queued readings and
# the same database server: Node-RED 4 with node-red-contrib-mongodb4 (one insertOne
# per message, and batched by a join node into insertMany), a Python script with
# paho-mqtt and pymongo (insert_many of 500, acknowledging after the write; once as
# most would write it, once writing the persister's keyed documents), and the
# one-insert-per-message baseline (`mongo-persister --batch-size 1`). Each drains N
# queued QoS 1 JSON readings into its own database (subscribed first, then held with
# SIGSTOP while they queue): wall time and CPU seconds from its resume to the Nth
# document, its peak memory, what it stored; then a second run is SIGKILLed a third
# into its drain, and restarted: what is missing and what is stored twice then.
#
#   bench/peers.sh
#
# Environment (defaults): BENCH_PEERS="persister persister-each nodered-each
# nodered-batch python python-keyed" (which to run), BENCH_PEERS_N=5000 readings,
# BENCH_RUNS=3 runs per figure (the median), BENCH_PERSISTER_ARGS (more flags for
# mongo-persister, e.g. --no-repair), BENCH_PROFILE=release, MONGODB_URI (default: a
# server of our own, as bench/suite.sh), BENCH_BASELINE_BIN=DIR (adds the consumer
# persister-baseline: the mongo-persister in DIR, built from another commit, on the
# same stream and server, so what a change costs per reading is a ratio of one run). Needs what scripts/test installs: mosquitto,
# nx-27017, paho-mqtt and pymongo in .venv, Node-RED in nodered/node_modules and the
# MongoDB node in bench/peers/node_modules (bench/peers/install.sh).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

N=${BENCH_PEERS_N:-5000}
PERSISTER_ARGS=${BENCH_PERSISTER_ARGS:-}
python=.venv/bin/python
node_red=nodered/node_modules/.bin/node-red
for need in "$python" "$node_red" bench/peers/node_modules/node-red-contrib-mongodb4/package.json; do
  [ -e "$need" ] || { say "missing $need: run scripts/test once, or bench/peers/install.sh"; exit 1; }
done
"$python" -c 'import paho.mqtt, pymongo' 2>/dev/null || { say "paho-mqtt or pymongo missing in .venv: bench/peers/install.sh"; exit 1; }

build pressure-sensor mongo-persister
start_cloud
start_database

# Consumer commands, by name: each reads its settings from the environment below.
read -r -a peers <<< "${BENCH_PEERS:-persister persister-each nodered-each nodered-batch python python-keyed}"
baseline=${BENCH_BASELINE_BIN:-}
if [ -n "$baseline" ]; then
  [ -x "$baseline/mongo-persister" ] || { say "BENCH_BASELINE_BIN: no mongo-persister in $baseline"; exit 2; }
  [[ " ${peers[*]} " == *" persister-baseline "* ]] || peers+=(persister-baseline)
fi
declare -A label=(
  [persister]="\`mongo-persister\` (batches of 500)"
  [persister-baseline]="\`mongo-persister\` (batches of 500) from $baseline"
  [persister-each]="\`mongo-persister --batch-size 1\` (one insert per message)"
  [nodered-each]="Node-RED: \`mqtt in\` → \`mongodb4\` insertOne"
  [nodered-batch]="Node-RED: \`mqtt in\` → \`join\` (500 or 0.2 s) → \`mongodb4\` insertMany"
  [python]="Python: paho-mqtt + pymongo \`insert_many\` (500, acknowledged after the write)"
  [python-keyed]="Python: the same, writing the persister's documents (\`(device, boot, seq)\` as \`_id\`, dates)"
)
# Starts consumer $1 for session $id into database $db; its pid in $pid.
start_peer() {
  local log="$work/$id.log"
  export PEER_MQTT_PORT=$cloud_port PEER_MQTT_USER=mongo-persister PEER_MQTT_PASSWORD=bench PEER_CLIENT_ID=$id \
    PEER_MONGODB_URI=$db_uri PEER_MONGODB_DATABASE=$db
  case $1 in
    persister | persister-each | persister-baseline)
      local batch=500 exe=$bin/mongo-persister
      [ "$1" != persister-each ] || batch=1
      [ "$1" != persister-baseline ] || exe=$baseline/mongo-persister
      CLOUD_BROKER=127.0.0.1 CLOUD_PORT=$cloud_port CLOUD_USERNAME=mongo-persister CLOUD_PASSWORD=bench \
        MONGODB_URI=$db_uri MONGODB_DATABASE=$db RUST_LOG=warn \
        "$exe" --client-id "$id" --topic /sensor/# --batch-size "$batch" $PERSISTER_ARGS >>"$log" 2>&1 &
      ;;
    nodered-*)
      PEER_FLOWS="nodered-${1#nodered-}.json" PEER_NODERED_PORT=$(free_port) \
        "$node_red" --settings bench/peers/settings.js --userDir "$work/$id.nodered" >>"$log" 2>&1 &
      ;;
    python) PEER_KEYED=0 "$python" bench/peers/persist.py >>"$log" 2>&1 & ;;
    python-keyed) PEER_KEYED=1 "$python" bench/peers/persist.py >>"$log" 2>&1 & ;;
  esac
  pid=$!
  pids+=("$pid")
}
# A new persistent session $id subscribed to the readings, and database $db with the
# persister's collections and indexes (made by a persister that then stops), so every
# consumer writes into the same schema: the queries of `readings` need those indexes,
# and each one makes an insert dearer for the server.
run_id=0
new_session() {
  run_id=$((run_id + 1))
  id="bench-$1-$run_id"
  db=${id//-/_}
  mosquitto_sub -h 127.0.0.1 -p "$cloud_port" -u mongo-persister -P bench -c -i "$id" -q 1 -t /sensor/# -E
  local port
  port=$(free_port)
  CLOUD_BROKER=127.0.0.1 CLOUD_PORT=$cloud_port CLOUD_USERNAME=mongo-persister CLOUD_PASSWORD=bench \
    MONGODB_URI=$db_uri MONGODB_DATABASE=$db RUST_LOG=warn \
    "$bin/mongo-persister" --client-id "schema-$id" --topic /bench/schema --no-repair \
    --metrics-address "127.0.0.1:$port" >>"$work/schema.log" 2>&1 &
  local schema=$!
  "$python" - "$port" <<'PY'
import sys, time, urllib.request
for _ in range(1200):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health/ready", timeout=1)
        sys.exit(0)
    except OSError:
        time.sleep(0.05)
sys.exit("the schema was not made within 60 s")
PY
  kill -TERM "$schema"; wait "$schema"
}
# N JSON readings of device $id queued at QoS 1.
fill() {
  LOCAL_BROKER=127.0.0.1 LOCAL_PORT=$cloud_port LOCAL_USERNAME=bridge LOCAL_PASSWORD=bench RUST_LOG=warn \
    "$bin/pressure-sensor" --format json --qos 1 --interval 0 --no-retain --count "$N" --device "$id"
}
watch() { "$python" bench/peers/watch.py "$@"; }

declare -A drained crashed
for peer in "${peers[@]}"; do
  say "$peer: draining $N queued readings, $RUNS runs; then one run SIGKILLed a third in"
  rows=()
  for run in $(seq "$RUNS"); do
    new_session "$peer"
    start_peer "$peer"
    # Connected and subscribed (the broker logs the connection; the subscription follows
    # within milliseconds), then held while the readings queue.
    wait_line "$work/cloud.log" "connected from .* as $id "
    sleep 1
    kill -STOP "$pid"
    fill
    row=$(watch drain "$db_uri" "$db" "$N" "$pid") || { tail -n 20 "$work/$id.log" >&2; exit 1; }
    rows+=("$row")
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
  done
  # The median run by wall time: "wall cpu rss stored distinct".
  drained[$peer]=$(printf '%s\n' "${rows[@]}" | sort -g | awk '{ v[NR] = $0 } END { print v[int((NR + 1) / 2)] }')

  # The crash run: the same start, SIGKILLed a third into its median drain time (the
  # database's own pace decides when writes show, so a count is no trigger), restarted.
  new_session "$peer-crash"
  start_peer "$peer"
  wait_line "$work/cloud.log" "connected from .* as $id "
  sleep 1
  kill -STOP "$pid"
  fill
  kill -CONT "$pid"
  sleep "$(calc "$(echo "${drained[$peer]}" | cut -d' ' -f1) / 3")"
  kill -KILL "$pid"; wait "$pid" 2>/dev/null || true
  say "$peer: SIGKILLed with $(watch settle "$db_uri" "$db" "$N" | cut -d' ' -f1) stored; restarting it"
  start_peer "$peer"
  crashed[$peer]=$(watch settle "$db_uri" "$db" "$N")
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
done

node_red_version=$(node -p "require('./nodered/node_modules/node-red/package.json').version")
mongodb4_version=$(node -p "require('./bench/peers/node_modules/node-red-contrib-mongodb4/package.json').version")
echo
echo "Peers of $(date -u +%F) on $(nproc) cores ($(uname -m)), $server, profile $BENCH_PROFILE; Node-RED $node_red_version with node-red-contrib-mongodb4 $mongodb4_version, Node.js $(node --version), paho-mqtt $("$python" -c 'import paho.mqtt; print(paho.mqtt.__version__)') and pymongo $("$python" -c 'import pymongo; print(pymongo.version)'); medians of $RUNS runs; $N queued QoS 1 JSON readings each. Each consumer subscribed, then held (SIGSTOP) while the readings queued; wall and CPU seconds (its own process) from its resume to the last document."
echo
echo "| consumer | wall s | readings/s | CPU s | CPU µs per reading | peak RSS, MiB | stored (distinct) | SIGKILLed a third in: missing, stored twice |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
for peer in "${peers[@]}"; do
  read -r wall cpu rss stored distinct <<< "${drained[$peer]}"
  read -r crash_stored crash_distinct <<< "${crashed[$peer]}"
  echo "| ${label[$peer]} | $wall | $(calc "f'{$N / $wall:,.0f}'") | $cpu | $(calc "f'{$cpu / $N * 1e6:,.0f}'") | $(calc "f'{$rss / 1024:.1f}'") | $stored ($distinct) | $((N - crash_distinct)), $((crash_stored - crash_distinct)) |"
done
if [ -n "${drained[persister]:-}" ] && [ -n "${drained[persister-baseline]:-}" ]; then
  read -r _ ours _ <<< "${drained[persister]}"
  read -r _ theirs _ <<< "${drained[persister-baseline]}"
  echo
  echo "CPU per reading, this build / the baseline: $(calc "f'{$ours / $theirs:.2f}'")"
fi
