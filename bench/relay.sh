#!/usr/bin/env bash
# edge-relay against Mosquitto's bridge on the same streams, in turns on the same
# machine, each figure the median of several runs and the relay's written as a ratio of
# the bridge's. Each run sets up a new edge broker from mosquitto/ for one forwarder
# (EDGE_FORWARDER=bridge, or relay with edge-relay beside it), both over TLS to one
# cloud broker, and measures:
#   - throughput: N QoS 1 JSON readings from one temperature-sensor as fast as it goes,
#     until a subscriber on the cloud broker has them all;
#   - the edge's cost of that: CPU seconds and bytes written to disk by the edge broker
#     and the relay (Mosquitto saves every 30 s, so a short bridge run writes nothing
#     until then; the relay writes every message once, as it comes);
#   - latency at each of RATES readings/s for SECONDS s, sensor clock to cloud subscriber;
#   - then, the cloud broker stopped, a backlog of BACKLOG readings in the relay's log:
#     disk per message (what a long outage needs, scaled) and the relay's memory.
#
#   bench/relay.sh
#
# Environment (defaults): BENCH_RELAY_N=20000, BENCH_RELAY_BACKLOG=200000, BENCH_RUNS=3, BENCH_SECONDS=5,
# BENCH_RATES="1000 5000", BENCH_PROFILE=release. Needs what scripts/test installs.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

N=${BENCH_RELAY_N:-20000}
RUNS=${BENCH_RUNS:-3}
SECONDS_PER_RUN=${BENCH_SECONDS:-5}
RATES=${BENCH_RATES:-1000 5000}
BACKLOG=${BENCH_RELAY_BACKLOG:-200000}
FORWARDERS=(bridge relay)

build temperature-sensor pressure-sensor mqtt-subscriber edge-relay
start_cloud

# CPU seconds a process used so far, and bytes it had written to disk.
cpu() { awk '{ printf "%.3f\n", ($14 + $15) / 100 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
written() { awk '/^write_bytes/ { print $2 }' "/proc/$1/io" 2>/dev/null || echo 0; }
edge_cpu() { local sum=0; for pid in "${edge[@]}"; do sum=$(calc "$sum + $(cpu "$pid")"); done; echo "$sum"; }
edge_written() { local sum=0; for pid in "${edge[@]}"; do sum=$((sum + $(written "$pid"))); done; echo "$sum"; }

run=0
up() { # forwarder
  run=$((run + 1))
  start_local "$1"
  edge=("$local_pid")
  if [ "$1" = relay ]; then
    start_relay "$work/relay-log-$run"
    edge+=("$relay_pid")
  fi
}
down() {
  for pid in "${edge[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${edge[@]}"; do wait "$pid" 2>/dev/null || true; done
}

# N readings as fast as they go: "readings_per_second cpu_µs_per_reading bytes_per_reading".
throughput() { # forwarder
  local out="$work/through-$1-$run"
  LOCAL_BROKER=127.0.0.1 LOCAL_PORT=$cloud_port LOCAL_USERNAME=mqtt-subscriber LOCAL_PASSWORD=bench RUST_LOG=info \
    "$bin/mqtt-subscriber" --client-id "through-$1-$run" --topic '/sensor/#' --qos 1 --count "$N" --format json \
    > /dev/null 2> "$out.log" &
  local sub=$!
  wait_line "$out.log" 'subscribed'
  local cpu0 bytes0 start
  cpu0=$(edge_cpu) bytes0=$(edge_written) start=$(date +%s.%N)
  LOCAL_BROKER=127.0.0.1 LOCAL_PORT=$local_port LOCAL_USERNAME=temperature-sensor LOCAL_PASSWORD=bench RUST_LOG=warn \
    "$bin/temperature-sensor" --format json --qos 1 --interval 0 --no-retain --count "$N" --device "through-$run"
  wait "$sub"
  local wall cpu_used bytes
  wall=$(calc "$(date +%s.%N) - $start")
  cpu_used=$(calc "$(edge_cpu) - $cpu0")
  bytes=$(( $(edge_written) - bytes0 ))
  calc "f'{$N / $wall:.0f} {$cpu_used * 1e6 / $N:.0f} {$bytes / $N:.0f}'"
}

declare -A through lat
for round in $(seq "$RUNS"); do
  for forwarder in "${FORWARDERS[@]}"; do
    say "round $round of $RUNS: $forwarder"
    up "$forwarder"
    through[$forwarder]+="$(throughput "$forwarder")"$'\n'
    for rate in $RATES; do
      id="lat-$forwarder-$rate-$run"
      lat[$forwarder-$rate]+="$(latency_run "$rate" "$local_port" pressure-sensor)"$'\n'
    done
    down
  done
done

# Median of column $2 of the rows in $1.
column() { printf '%s' "$1" | awk -v c="$2" 'NF { print $c }' | median; }
ratio() { calc "f'{$2 / $1:.2f}'" 2>/dev/null || echo "—"; }

echo
echo "edge-relay against Mosquitto's bridge ($(nproc) cores, medians of $RUNS runs, taken in turns; $N readings per throughput run):"
echo
echo "| figure | bridge | edge-relay | relay / bridge |"
echo "| --- | --- | --- | --- |"
row() { # label bridge relay
  echo "| $1 | $2 | $3 | $(ratio "$2" "$3") |"
}
row "forwarded readings/s (QoS 1 JSON, as fast as they go)" \
  "$(column "${through[bridge]}" 1)" "$(column "${through[relay]}" 1)"
row "edge CPU, µs per reading (broker + relay)" \
  "$(column "${through[bridge]}" 2)" "$(column "${through[relay]}" 2)"
echo "| edge bytes written to disk per reading | $(column "${through[bridge]}" 3) | $(column "${through[relay]}" 3) | (the bridge's queue is written at the next save, every 30 s) |"
for rate in $RATES; do
  for q in 1 2; do
    name=$([ "$q" = 1 ] && echo p50 || echo p99)
    row "latency $name at $rate readings/s, ms" \
      "$(column "${lat[bridge-$rate]}" "$q")" "$(column "${lat[relay-$rate]}" "$q")"
  done
done

# A backlog: the cloud broker stopped, BACKLOG readings into the relay's log.
kill -TERM "$cloud_pid"; wait "$cloud_pid" 2>/dev/null || true
start_local relay
metrics_port=$(free_port)
RELAY_METRICS_ADDRESS=127.0.0.1:$metrics_port start_relay "$work/relay-log-backlog" edge
say "a backlog of $BACKLOG readings with the cloud broker down"
LOCAL_BROKER=127.0.0.1 LOCAL_PORT=$local_port LOCAL_USERNAME=temperature-sensor LOCAL_PASSWORD=bench RUST_LOG=warn \
  "$bin/temperature-sensor" --format json --qos 1 --interval 0 --no-retain --count "$BACKLOG" --device backlog
metric() { curl -fsS "http://127.0.0.1:$metrics_port/metrics" | awk -v name="$1" '$1 == name { print $2 }'; }
for _ in $(seq 600); do
  [ "$(metric iot_relay_backlog)" = "$BACKLOG" ] && break
  sleep 0.1
done
[ "$(metric iot_relay_backlog)" = "$BACKLOG" ] ||
  { say "the relay's backlog is $(metric iot_relay_backlog), not $BACKLOG, 60 s after the sensor ended"; exit 1; }
sleep 1.5 # the keeper's next report of disk bytes (every second)
disk=$(metric iot_relay_disk_bytes)
per=$(calc "$disk / $BACKLOG")
echo
echo "| backlog (cloud broker down) | messages | disk | per message | 24 h at 1 000 readings/s | relay RSS |"
echo "| --- | ---: | ---: | ---: | ---: | ---: |"
echo "| edge-relay | $(metric iot_relay_backlog) | $(calc "f'{$disk / 1e6:.0f} MB'") | $(calc "f'{$per:.0f} B'") | $(calc "f'{$per * 86400000 / 1e9:.1f} GB'") | $(calc "f'{$(rss "$relay_pid") / 1024:.0f} MiB'") |"
