#!/usr/bin/env bash
# The cloud tier on one Mosquitto broker against a three-node NATS JetStream cluster
# (one stream, three replicas), each with one and with several mongo-persister
# replicas, in turns on the same machine; every figure the median of several runs and
# written as a ratio of the baseline's, one Mosquitto broker with one persister. Each
# run sets up the whole path anew: an edge broker from mosquitto/ with edge-relay (a
# new log), the cloud tier (the cloud Mosquitto from mosquitto/, or the cluster from
# scripts/nats-cluster config, as tests/src/nats.rs starts it), a new database server
# and the persisters on it, TLS between every service and the cloud tier. On Mosquitto
# the replicas share the stream through a shared subscription ($share/bench/..., each
# with its fixed --client-id; one persister alone subscribes without --share), on NATS
# they share the stream's durable pull consumer. Each run measures:
#   - throughput: N QoS 1 JSON readings from one temperature-sensor as fast as it goes,
#     timed from the sensor's start until the database holds them all (readings/s),
#     with the CPU each part used meanwhile (the persisters, the database server, the
#     cloud broker or the three nodes, the relay, the edge broker, the sensor, and the
#     whole machine's, other users' work included), as cores busy (CPU seconds per
#     second) and, for our processes, the cores' worth of time their threads were
#     runnable but waited for a core (schedstat: on a shared machine a process can be
#     the limit at 0.6 of a core); from them the script names where the limit is;
#   - latency at each of RATES readings/s for SECONDS s from one pressure-sensor: each
#     stored document's received_at - ts, that is from the device's clock to the
#     persister's receipt (the same machine's clock); the write to the database
#     follows and is not in it. Where the database stores fewer readings a second than
#     the rate, the persisters hold back and the readings queue in the cloud tier, so
#     this latency grows through the run: it is then the queue's;
#   - drain: the cloud side stopped (its broker or its three nodes, and the
#     persisters), BACKLOG readings from one sensor into the relay's log, then the
#     cloud side started again: readings/s the relay forwards (iot_relay_forwarded_total
#     on its metrics, from the first one forwarded until iot_relay_backlog is 0) and
#     readings/s into the database over the same span (until it holds them all), with
#     the same CPU figures.
# Every reading of every run is then counted in the database: each stored once.
#
#   bench/cluster.sh
#
# Environment (defaults): BENCH_CLUSTER_N=20000 readings per throughput run,
# BENCH_CLUSTER_BACKLOG=1000000 readings in the relay's log for the drain (about 5
# minutes a run on 2 cores with nx-27017, an hour for 3 rounds of the 4 configurations;
# with 100000, 19 minutes), BENCH_CLUSTER_REPLICAS=3
# (the persister replicas of the several-replica runs), BENCH_CLUSTER_MAX_DISK=8G (the
# relay's --max-disk), BENCH_CLUSTER_NATS_MAX_BYTES=8G (the stream's --nats-max-bytes:
# far above the backlog), BENCH_RUNS=3, BENCH_SECONDS=5, BENCH_RATES="1000 5000",
# BENCH_PROFILE=release, MONGODB_URI (default: a database server of our own, mongod
# when on the PATH, else nx-27017 from .venv, a new one for each run). Needs what
# scripts/test installs: mosquitto, nats-server (Debian: /usr/sbin), openssl, and
# nx-27017 and pymongo in .venv (bench/peers/install.sh installs pymongo).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
# On exit the persisters go first (persisters_stop), then everything else (lib.sh).
persister_pids=()
trap 'persisters_stop; cleanup' EXIT

N=${BENCH_CLUSTER_N:-20000}
BACKLOG=${BENCH_CLUSTER_BACKLOG:-1000000}
MANY=${BENCH_CLUSTER_REPLICAS:-3}
MAX_DISK=${BENCH_CLUSTER_MAX_DISK:-8G}
NATS_MAX_BYTES=${BENCH_CLUSTER_NATS_MAX_BYTES:-8G}
for setting in "BENCH_CLUSTER_N=$N" "BENCH_CLUSTER_BACKLOG=$BACKLOG" "BENCH_CLUSTER_REPLICAS=$MANY"; do
  [[ ${setting#*=} =~ ^[1-9][0-9]*$ ]] || { say "${setting%%=*} is '${setting#*=}': expected a whole number above 0"; exit 2; }
done
(( MANY > 1 )) || { say "BENCH_CLUSTER_REPLICAS is $MANY: expected more than 1 (runs with 1 are always made)"; exit 2; }

python=.venv/bin/python
"$python" -c 'import pymongo' 2>/dev/null ||
  { say "pymongo missing in .venv: run bench/peers/install.sh (or scripts/test once)"; exit 1; }
nats_server=$(command -v nats-server 2>/dev/null || echo /usr/sbin/nats-server)
[ -x "$nats_server" ] || { say "nats-server is not installed (apt-get install nats-server)"; exit 1; }
command -v curl >/dev/null || { say "curl is not installed (apt-get install curl)"; exit 1; }

# The configurations, in the order of every round; the first is the baseline.
CONFIGS=(mosquitto-1 "mosquitto-$MANY" nats-1 "nats-$MANY")
declare -A label=(
  [mosquitto-1]="Mosquitto, 1 persister"
  [mosquitto-$MANY]="Mosquitto, $MANY persisters (\$share)"
  [nats-1]="NATS cluster, 1 persister"
  [nats-$MANY]="NATS cluster, $MANY persisters"
)

build edge-relay mongo-persister temperature-sensor pressure-sensor
# Names this script's databases apart from an earlier run's (on a MONGODB_URI server).
stamp=$(date +%Y%m%d%H%M%S)
# start_local reads the cloud Mosquitto's TLS port, which a NATS run has not.
cloud_port=0 cloud_tls_port=0
# The certificates of both cloud tiers (127.0.0.1 among their names): the cloud
# Mosquitto's TLS listener and the NATS nodes' client listeners.
sh mosquitto/certs.sh "$work/certs" >/dev/null

# The database's readings, by pymongo:
#   count URI DB                 documents in readings now
#   wait URI DB TARGET TIMEOUT   once readings hold TARGET documents, the time (epoch s)
#   stored URI DB DEVICE         documents of DEVICE
#   latency URI DB DEVICE        p50 p99 max of received_at - ts over DEVICE's, in ms
cat > "$work/readings.py" <<'PY'
import sys, time
from pymongo import MongoClient
mode, uri, database = sys.argv[1:4]
readings = MongoClient(uri, serverSelectionTimeoutMS=30000)[database]["readings"]
if mode == "count":
    print(readings.estimated_document_count())
elif mode == "wait":
    target, timeout = int(sys.argv[4]), float(sys.argv[5])
    deadline = time.monotonic() + timeout
    while (stored := readings.estimated_document_count()) < target:
        if time.monotonic() > deadline:
            sys.exit(f"only {stored} of {target} documents in {database}.readings after {timeout:.0f} s")
        time.sleep(0.05)
    print(f"{time.time():.3f}")
elif mode == "stored":
    print(readings.count_documents({"device": sys.argv[4]}))
elif mode == "latency":
    lat = sorted((d["received_at"] - d["ts"]).total_seconds() * 1000
                 for d in readings.find({"device": sys.argv[4]}, {"_id": 0, "ts": 1, "received_at": 1}))
    if not lat:
        sys.exit(f"no readings of {sys.argv[4]} in {database}")
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
    print(f"{pick(0.5):.0f} {pick(0.99):.0f} {lat[-1]:.0f}")
PY
readings() { "$python" "$work/readings.py" "$1" "$db_uri" "$db" "${@:2}"; }

# Where the limit is, from a run's load: a process busy half a core or more that was
# running or waiting for a core 0.85 of the time or more (the busiest persister, the
# database server, the cloud tier's busiest process, the relay: each has one thread that
# does most of its work; a process of many threads that each wake briefly, a NATS node,
# waits much and works little) is saturated, the one with the most first, on a machine
# whose cores were all busy or not;
# else the machine's cores when nearly all were busy; else none: the path waits (round
# trips, the database server's disk). nx-27017 runs past one core while SQLite works
# outside Python's lock.
cat > "$work/limit.py" <<'PY'
import sys
config, cores = sys.argv[1], float(sys.argv[2])
v = list(map(float, sys.argv[3].split()))
tier = "the Mosquitto broker" if config.startswith("mosquitto") else "a NATS node"
named = {"a persister": v[0:2], "the database server": v[2:4], tier: v[4:6], "the relay": v[6:8]}
sensor, machine = v[8], v[9]
name, (busy, wait) = max(named.items(), key=lambda item: sum(item[1]))
full = machine >= 0.9 * cores
if busy >= 0.5 and busy + wait >= 0.85:
    print(f"{name} ({busy:.2f} busy + {wait:.2f} waiting for a core"
          + (f"; all {cores:.0f} cores busy" if full else "") + ")")
elif full:
    print(f"the machine's cores ({machine:.2f} of {cores:.0f} busy; the most of ours: {name}, {busy:.2f} busy + {wait:.2f} waiting)")
else:
    print(f"no process saturated (the most: {name}, {busy:.2f} busy + {wait:.2f} waiting): waits (round trips, disk)")
PY

# CPU ticks a process used so far (0 once it is gone); nanoseconds each of its threads
# spent runnable but waiting for a core ("thread ns" lines, from the kernel's schedstat,
# so that a thread that begins or ends between two looks counts only what it waited
# between them); the machine's busy and all ticks over every core.
tick=$(getconf CLK_TCK)
ticks() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{ printf "%.0f\n", $12 + $13 }' || echo 0; }
waits() { awk '{ print FILENAME, $2 }' "/proc/$1"/task/*/schedstat 2>/dev/null || true; }
machine() { awk '/^cpu / { printf "%.0f %.0f\n", $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat; }
declare -A ticks0
# Marks the start of a measured span for the processes of every group.
cpu_mark() {
  ticks0=()
  for pid in "${persister_pids[@]}" "${cloud_pids[@]}" "${db_pids[@]}" "$relay_pid" "$local_pid"; do
    ticks0[$pid]=$(ticks "$pid")
    waits "$pid" > "$work/waits-$pid"
  done
  read -r machine_busy0 machine_all0 < <(machine)
}
# "busy waiting" of the processes PID... over WALL seconds since cpu_mark, in cores:
# CPU seconds per second, and seconds per second runnable but waiting for a core; their
# sums, or with `max` the one process's with the most of both together.
load() { # wall sum|max pid...
  local wall=$1 how=$2 pid
  shift 2
  for pid in "$@"; do
    echo "$(( $(ticks "$pid") - ${ticks0[$pid]:-0} )) $(waits "$pid" | awk -v before="$work/waits-$pid" '
      BEGIN { while ((getline line < before) > 0) { split(line, f, " "); was[f[1]] = f[2] } }
      $2 != "" { s += $2 - (($1 in was) ? was[$1] : 0) } END { printf "%.0f\n", s }')"
  done | awk -v wall="$wall" -v how="$how" -v tick="$tick" '
    { b = $1 / tick / wall; w = $2 / 1e9 / wall
      if (how == "sum") { B += b; W += w } else if (NR == 1 || b + w > B + W) { B = b; W = w } }
    END { printf "%.2f %.2f\n", B, W }'
}
# The load over WALL seconds since cpu_mark, "busy waiting" pairs (load) for the
# persisters, the busiest persister, the database server, the cloud tier, its busiest
# process, the relay and the edge broker, then the sensor's cores busy (from its CPU
# seconds SENSOR_CPU), the machine's (every process on it) and the rest: the machine's
# less those named (other users' work, this script's looks at the metrics and the
# database).
cpu_row() { # wall sensor_cpu
  local busy all row
  read -r busy all < <(machine)
  row="$(load "$1" sum "${persister_pids[@]}") $(load "$1" max "${persister_pids[@]}")"
  row+=" $(load "$1" sum "${db_pids[@]}") $(load "$1" sum "${cloud_pids[@]}") $(load "$1" max "${cloud_pids[@]}")"
  row+=" $(load "$1" sum "$relay_pid") $(load "$1" sum "$local_pid") $(calc "f'{$2 / $1:.2f}'")"
  row+=" $(calc "f'{($busy - $machine_busy0) / max(1, $all - $machine_all0) * $(nproc):.2f}'")"
  echo "$row $(echo "$row" | awk '{ r = $16 - ($1 + $5 + $7 + $11 + $13 + $15); printf "%.2f", (r > 0 ? r : 0) }')"
}

# Waits until every path exists (ready files), or fails naming the log.
wait_files() { # seconds log path...
  local tries=$(( $1 * 10 )) log=$2 missing
  shift 2
  for _ in $(seq "$tries"); do
    missing=0
    for path in "$@"; do [ -e "$path" ] || missing=1; done
    (( missing )) || return 0
    sleep 0.1
  done
  say "timed out waiting for $*; $log ends:"; tail -n 5 "$log" >&2; exit 1
}

# A new database server for each run (a run's writes do not slow the next one's), or a
# new database on the MONGODB_URI server; its pid in $db_pids (none for MONGODB_URI).
db_pids=()
fresh_database() {
  for pid in "${db_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  db_pids=()
  rm -rf "$work/db" "$work/db.pid"
  start_database
  if [ "$(database_server)" != uri ]; then
    db_pids=("${pids[-1]}")
    # nx-27017 writes the pid of the process that serves (its launcher's, as it is).
    if [ -s "$work/db.pid" ]; then db_pids=("$(cat "$work/db.pid")"); fi
  fi
}

# The cloud tier of configuration $cloud, new: the cloud Mosquitto from mosquitto/ (TLS
# on $cloud_tls_port), or the three NATS nodes (TLS on each of $nats_ports); their pids
# in $cloud_pids.
cloud_pids=()
# K distinct free ports (bound at once, so none twice).
free_ports() { # k
  python3 -c 'import socket, sys
s = [socket.socket() for _ in range(int(sys.argv[1]))]
for x in s: x.bind(("127.0.0.1", 0))
print(" ".join(str(x.getsockname()[1]) for x in s))' "$1"
}
cloud_new() {
  if [ "$cloud" = mosquitto ]; then
    rm -rf "$work/cloud"
    start_cloud
    cloud_pids=("$cloud_pid")
    return
  fi
  # A port free when picked may be taken by a client's connection before a node
  # listens on it: then again with other ports.
  local attempt ports
  for attempt in 1 2 3; do
    nats_dir=$work/nats-$run-$attempt
    read -r -a ports < <(free_ports 9)
    nats_ports=("${ports[@]:0:3}") nats_monitors=("${ports[@]:6:3}")
    NATS_PERSISTER_PASSWORD=bench NATS_SITES="edge:bench" NATS_CERTS_DIR="$work/certs" \
      NATS_PORTS="${nats_ports[*]}" NATS_ROUTE_PORTS="${ports[*]:3:3}" NATS_MONITOR_PORTS="${nats_monitors[*]}" \
      scripts/nats-cluster config "$nats_dir" || { say "scripts/nats-cluster config failed"; exit 1; }
    nats_address=$(printf 'nats://127.0.0.1:%s,' "${nats_ports[@]}")
    nats_address=${nats_address%,}
    cloud_start && return
    grep -q "address already in use" "$nats_dir"/node-*.log 2>/dev/null || break
    cloud_stop
    say "a NATS node's port was taken (attempt $attempt of 3): other ports"
  done
  say "the NATS cluster did not start; its nodes' logs end:"
  tail -n 3 "$nats_dir"/node-*.log >&2
  exit 1
}
# Starts the cloud tier again from its configuration and state (after cloud_stop); for
# NATS, fails (status 1) when a node exits or JetStream has no leader within 90 s.
cloud_start() {
  cloud_pids=()
  if [ "$cloud" = mosquitto ]; then
    mosquitto -c "$work/cloud/mosquitto.conf" 2>>"$work/cloud.log" & pids+=($!)
    cloud_pid=$!
    cloud_pids=("$cloud_pid")
    wait_port "$cloud_tls_port"
    return
  fi
  local node pid
  for node in 1 2 3; do
    "$nats_server" -c "$nats_dir/node-$node.conf" 2>>"$nats_dir/node-$node.log" & pids+=($!)
    cloud_pids+=($!)
  done
  # A JetStream leader once every node's /healthz answers 200 (503 before).
  for node in 0 1 2; do
    for _ in $(seq 900); do
      curl -fsS "http://127.0.0.1:${nats_monitors[$node]}/healthz" >/dev/null 2>&1 && continue 2
      for pid in "${cloud_pids[@]}"; do running "$pid" || return 1; done
      sleep 0.1
    done
    return 1
  done
}
cloud_stop() {
  for pid in "${cloud_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${cloud_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}

# $replicas persisters on the cloud tier into database $db, each with its fixed client
# id (persister-I: the same on a restart, so a Mosquitto session finds its share
# waiting); their pids in $persister_pids, once every one stands (its --ready-file).
persisters_start() {
  persister_pids=()
  local ready=() i file log
  for i in $(seq "$replicas"); do
    file=$work/ready-$run-$i log=$work/persister-$run-$i.log
    ready+=("$file")
    local env=(MONGODB_URI="$db_uri" MONGODB_DATABASE="$db" CLOUD_USERNAME=mongo-persister CLOUD_PASSWORD=bench
      CLOUD_TLS_CA="$work/certs/ca.crt" RUST_LOG=info)
    local args=(--client-id "persister-$i" --ready-file "$file")
    if [ "$cloud" = mosquitto ]; then
      env+=(CLOUD_BROKER=127.0.0.1 CLOUD_PORT="$cloud_tls_port")
      (( replicas == 1 )) || args+=(--share bench)
    else
      env+=(CLOUD_BROKER="$nats_address" PERSISTER_NATS_MAX_BYTES="$NATS_MAX_BYTES")
    fi
    env -u CLOUD_PORT "${env[@]}" "$bin/mongo-persister" "${args[@]}" >>"$log" 2>&1 & pids+=($!)
    persister_pids+=($!)
  done
  wait_files 90 "$work/persister-$run-1.log" "${ready[@]}"
}
# Stops the persisters. One on NATS flushes its connection before it exits and waits
# for that without end while the cluster is down (a second SIGTERM ends it at once):
# after 30 s it gets one.
persisters_stop() {
  local pid
  for pid in "${persister_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 300); do
    running "${persister_pids[@]}" || break
    sleep 0.1
  done
  if running "${persister_pids[@]}"; then
    say "a persister still runs 30 s after SIGTERM: sent it again"
    for pid in "${persister_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  fi
  for pid in "${persister_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
# Whether any of the processes runs (neither gone nor a zombie).
running() {
  local pid state
  for pid in "$@"; do
    state=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)
    [ -z "$state" ] || [ "$state" = Z ] || return 0
  done
  return 1
}

# A new edge broker and edge-relay (a new log, its metrics on $metrics_port) into the
# cloud tier: start_relay for Mosquitto, its NATS twin (tests/src/nats.rs start_relay_at:
# the site's own account edge-relay-SITE) for the cluster.
edge_new() {
  start_local relay
  metrics_port=$(free_port)
  export RELAY_METRICS_ADDRESS=127.0.0.1:$metrics_port RELAY_MAX_DISK=$MAX_DISK
  if [ "$cloud" = mosquitto ]; then
    start_relay "$work/relay-log-$run"
  else
    LOCAL_BROKER=127.0.0.1 LOCAL_PORT=$local_port LOCAL_USERNAME=edge-relay LOCAL_PASSWORD=bench \
      CLOUD_BROKER=$nats_address CLOUD_TLS_CA="$work/certs/ca.crt" EDGE_SITE=edge \
      CLOUD_USERNAME=edge-relay-edge CLOUD_PASSWORD=bench RUST_LOG=info \
      "$bin/edge-relay" --log-dir "$work/relay-log-$run" 2>"$work/relay.log" >&2 & pids+=($!)
    relay_pid=$!
    wait_line "$work/relay.log" "subscribed on the edge broker"
    wait_line "$work/relay.log" "publishing into the NATS stream" 90
  fi
  unset RELAY_METRICS_ADDRESS RELAY_MAX_DISK
}
edge_stop() {
  kill -TERM "$relay_pid" "$local_pid" 2>/dev/null || true
  wait "$relay_pid" "$local_pid" 2>/dev/null || true
}
metric() { curl -fsS "http://127.0.0.1:$metrics_port/metrics" | awk -v name="$1" '$1 == name { print $2 }'; }

# Starts waiting in the background until the database holds TARGET readings; wait_done
# then sets $waited_at to the time it did (epoch seconds).
wait_start() { # target timeout
  readings wait "$1" "$2" > "$work/waited" & waiter=$!
  pids+=("$waiter")
}
wait_done() {
  wait "$waiter" || { say "the database did not get every reading (above); the persisters' log ends:"; tail -n 5 "$work/persister-$run-1.log" >&2; exit 1; }
  waited_at=$(cat "$work/waited")
}
timeout_for() { calc "max(300, int($1 / 100))"; } # seconds to store COUNT readings

declare -A through drain_fwd drain_db lat cpu_through cpu_drain verdict
run=0
one_run() { # configuration
  run=$((run + 1))
  cloud=${1%-*} replicas=${1##*-} db=bench_cluster_${stamp}_$run
  fresh_database
  cloud_new
  persisters_start
  edge_new
  local expected=() base start wall rate count

  # Throughput: N readings as fast as they go, sensor to database.
  base=$(readings count)
  wait_start $((base + N)) "$(timeout_for "$N")"
  cpu_mark
  start=$(date +%s.%N)
  env LOCAL_BROKER=127.0.0.1 LOCAL_PORT="$local_port" LOCAL_USERNAME=temperature-sensor LOCAL_PASSWORD=bench RUST_LOG=warn \
    "${measure[@]}" "$work/sensor-usage" \
    "$bin/temperature-sensor" --format json --qos 1 --interval 0 --no-retain --count "$N" --device "through-$run"
  wait_done
  wall=$(calc "$waited_at - $start")
  through[$1]+="$(calc "f'{$N / $wall:.0f}'")"$'\n'
  cpu_through[$1]+="$(cpu_row "$wall" "$(awk '{ print $2 }' "$work/sensor-usage")")"$'\n'
  expected+=("through-$run:$N")

  # Latency at each rate: device clock to the persister's receipt.
  for rate in $RATES; do
    count=$(calc "max(1, int($rate * $SECONDS_PER_RUN))")
    base=$(readings count)
    wait_start $((base + count)) "$(timeout_for "$count")"
    LOCAL_BROKER=127.0.0.1 LOCAL_PORT=$local_port LOCAL_USERNAME=pressure-sensor LOCAL_PASSWORD=bench RUST_LOG=warn \
      "$bin/pressure-sensor" --rate "$rate" --count "$count" --format json --qos 1 --no-retain --device "lat-$rate-$run"
    wait_done
    lat[$1-$rate]+="$(readings latency "lat-$rate-$run")"$'\n'
    expected+=("lat-$rate-$run:$count")
  done

  # Drain: the cloud side down, BACKLOG readings into the relay's log, the cloud side
  # back (the relay reconnects by itself, with its backoff).
  # Stored is not yet forwarded in the relay's count: the cloud's last acknowledgements
  # may still be on their way.
  for _ in $(seq 300); do
    [ "$(metric iot_relay_backlog)" = 0 ] && break
    sleep 0.1
  done
  [ "$(metric iot_relay_backlog)" = 0 ] ||
    { say "the relay's backlog is $(metric iot_relay_backlog) 30 s after the database held every reading, not 0"; exit 1; }
  persisters_stop
  cloud_stop
  say "run $run ($1): a backlog of $BACKLOG readings with the cloud side down"
  LOCAL_BROKER=127.0.0.1 LOCAL_PORT=$local_port LOCAL_USERNAME=temperature-sensor LOCAL_PASSWORD=bench RUST_LOG=warn \
    "$bin/temperature-sensor" --format json --qos 1 --interval 0 --no-retain --count "$BACKLOG" --device "backlog-$run"
  for _ in $(seq 600); do
    [ "$(metric iot_relay_backlog)" = "$BACKLOG" ] && break
    sleep 0.1
  done
  [ "$(metric iot_relay_backlog)" = "$BACKLOG" ] ||
    { say "the relay's backlog is $(metric iot_relay_backlog), not $BACKLOG, 60 s after the sensor ended"; exit 1; }
  say "run $run ($1): the cloud side back, draining"
  local forwarded0 drain_start cpu_start forward_end
  forwarded0=$(metric iot_relay_forwarded_total)
  base=$(readings count)
  cloud_start || { say "the cloud side did not start again; its logs end:"; tail -n 3 "$work/cloud.log" "${nats_dir:-.}"/node-*.log >&2 2>/dev/null; exit 1; }
  wait_start $((base + BACKLOG)) "$(timeout_for "$BACKLOG")"
  persisters_start
  # From the first message forwarded (the relay's reconnect backoff, up to 30 s, is not
  # the drain): the drain starts at the last look that saw none forwarded yet, so it
  # counts the whole backlog over at most one look (about 0.06 s) more than it took.
  drain_start=$(date +%s.%N)
  for _ in $(seq 2400); do
    [ "$(metric iot_relay_forwarded_total)" != "$forwarded0" ] && break
    drain_start=$(date +%s.%N)
    sleep 0.05
  done
  [ "$(metric iot_relay_forwarded_total)" != "$forwarded0" ] ||
    { say "the relay forwarded nothing within 120 s of the cloud side's return; its log ends:"; tail -n 5 "$work/relay.log" >&2; exit 1; }
  cpu_mark
  cpu_start=$(date +%s.%N)
  for _ in $(seq 72000); do
    [ "$(metric iot_relay_backlog)" = 0 ] && break
    sleep 0.05
  done
  [ "$(metric iot_relay_backlog)" = 0 ] || { say "the relay's backlog did not drain within an hour"; exit 1; }
  forward_end=$(date +%s.%N)
  drain_fwd[$1]+="$(calc "f'{($(metric iot_relay_forwarded_total) - $forwarded0) / ($forward_end - $drain_start):.0f}'")"$'\n'
  wait_done
  drain_db[$1]+="$(calc "f'{$BACKLOG / ($waited_at - $drain_start):.0f}'")"$'\n'
  cpu_drain[$1]+="$(cpu_row "$(calc "max(0.001, $waited_at - $cpu_start)")" 0)"$'\n'
  expected+=("backlog-$run:$BACKLOG")

  # Every reading stored once: (device, boot, seq) is unique, so as many as were sent.
  local entry stored
  for entry in "${expected[@]}"; do
    stored=$(readings stored "${entry%:*}")
    [ "$stored" = "${entry##*:}" ] ||
      { say "run $run ($1): ${entry%:*}: $stored readings stored, not ${entry##*:}"; exit 1; }
  done
  edge_stop
  persisters_stop
  cloud_stop
}

for round in $(seq "$RUNS"); do
  for config in "${CONFIGS[@]}"; do
    say "round $round of $RUNS: ${label[$config]}"
    one_run "$config"
  done
done
for pid in "${db_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done

# Median of column $2 of the rows in $1.
column() { printf '%s' "$1" | awk -v c="$2" 'NF { print $c }' | median; }
# A figure and its ratio to the baseline's: "12345 (0.95×)".
cell() { # value baseline
  echo "$1 ($(calc "f'{$1 / $2:.2f}×'" 2>/dev/null || echo "—"))"
}
base=${CONFIGS[0]}
header() { # first column's title
  local line="| $1 |" rule="| --- |"
  for config in "${CONFIGS[@]}"; do line+=" ${label[$config]} |"; rule+=" ---: |"; done
  echo "$line"
  echo "$rule"
}
figure_row() { # label array-name column
  local -n values=$2
  local line="| $1 |" b
  b=$(column "${values[$base]}" "$3")
  for config in "${CONFIGS[@]}"; do line+=" $(cell "$(column "${values[$config]}" "$3")" "$b") |"; done
  echo "$line"
}

echo
echo "The cloud tier: one Mosquitto broker against a NATS JetStream cluster of three nodes (stream of three replicas), with 1 and $MANY persisters ($(nproc) cores, $server, medians of $RUNS runs taken in turns; ratios to ${label[$base]}):"
echo
header "figure"
figure_row "readings/s, sensor to MongoDB ($N QoS 1 JSON, as fast as they go)" through 1
for rate in $RATES; do
  declare -A latency_of=()
  for config in "${CONFIGS[@]}"; do latency_of[$config]=${lat[$config-$rate]}; done
  figure_row "latency p50 at $rate readings/s, ms (sensor to persister receipt)" latency_of 1
  figure_row "latency p99 at $rate readings/s, ms (sensor to persister receipt)" latency_of 2
done
figure_row "drain of $BACKLOG: readings/s forwarded by the relay into the cloud tier" drain_fwd 1
figure_row "drain of $BACKLOG: readings/s into MongoDB" drain_db 1

cpu_table() { # title array-name
  local -n rows=$2
  echo
  echo "$1: cores busy (CPU seconds per second) + cores' worth of waiting for a core (runnable, not running); one core is 1.00:"
  echo
  header "process"
  # Each row's label and the columns of its cells in cpu_row's rows.
  local names=("persisters, all" "the busiest persister" "database server" "cloud tier (the broker, or the 3 nodes)"
    "the busiest cloud process (the broker, or one node)" "edge-relay" "edge broker" "the sensor (busy)"
    "the machine (every process; $(nproc) cores; busy)" "the rest (other users' work, this script's looks; busy)")
  local columns=("1 2" "3 4" "5 6" "7 8" "9 10" "11 12" "13 14" "15" "16" "17")
  local i c line
  for i in "${!names[@]}"; do
    line="| ${names[$i]} |"
    for config in "${CONFIGS[@]}"; do
      line+=" $(for c in ${columns[$i]}; do column "${rows[$config]}" "$c"; done | paste -sd + | sed 's/+/ + /') |"
    done
    echo "$line"
  done
  line="| where the limit is |"
  for config in "${CONFIGS[@]}"; do
    line+=" $(python3 "$work/limit.py" "$config" "$(nproc)" \
      "$(for c in 3 4 5 6 9 10 11 12 15 16; do column "${rows[$config]}" "$c"; done)") |"
  done
  echo "$line"
}
cpu_table "During the throughput run (sensor to MongoDB)" cpu_through
cpu_table "During the drain (from the first reading forwarded until the database held the backlog)" cpu_drain
