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
#     disk per message (what a long outage needs, scaled) and the relay's memory; the
#     cloud broker back, how fast the backlog drains into it; and throughout, how long
#     a QoS 1 publish to the edge broker takes (its stalls).
#
#   bench/relay.sh
#
# Environment (defaults): BENCH_RELAY_N=20000, BENCH_RELAY_BACKLOG=5000000 (about 20 min
# with its drain), BENCH_RELAY_MAX_DISK=8G, BENCH_RELAY_COMPARE=1 (0: the backlog only),
# BENCH_RUNS=3, BENCH_SECONDS=5, BENCH_RATES="1000 5000", BENCH_PROFILE=release. Needs
# what scripts/test installs.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

N=${BENCH_RELAY_N:-20000}
BACKLOG=${BENCH_RELAY_BACKLOG:-5000000}
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

if [ "${BENCH_RELAY_COMPARE:-1}" = 1 ]; then
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
fi

# A backlog: the cloud broker stopped, BACKLOG readings into the relay's log (its disk
# budget large enough), then the cloud broker back and the backlog drained into it.
# Meanwhile a probe publishes one QoS 1 message to the edge broker every 0.2 s and
# times it (a process start and a TLS-less connection each: the idle baseline is taken
# the same way first), and the relay's RSS is sampled.
kill -TERM "$cloud_pid"; wait "$cloud_pid" 2>/dev/null || true
start_local relay
metrics_port=$(free_port)
RELAY_METRICS_ADDRESS=127.0.0.1:$metrics_port RELAY_MAX_DISK=${BENCH_RELAY_MAX_DISK:-8G} \
  start_relay "$work/relay-log-backlog" edge
# Lines in a file, 0 when there is none (a probe that never finished one).
lines() { if [ -f "$1" ]; then wc -l < "$1"; else echo 0; fi; }
metric() { curl -fsS "http://127.0.0.1:$metrics_port/metrics" | awk -v name="$1" '$1 == name { print $2 }'; }
probe_once() { # file
  local start
  start=$(date +%s%N)
  mosquitto_pub -h 127.0.0.1 -p "$local_port" -u temperature-sensor -P bench -q 1 \
    -t /sensor/probe/temperature -m 1 && echo $(( ($(date +%s%N) - start) / 1000000 )) >> "$1"
}
# The probe every 0.2 s into a file until stop_probe, which lets the publish under way
# finish and be counted (a probe killed between its publish and its line left one
# message in the relay's backlog that no line counted); with "rss", the relay's memory
# too.
start_probe() { # file [rss]
  rm -f "$work/probe-stop"
  ( while [ ! -e "$work/probe-stop" ]; do
      probe_once "$1"
      [ "${2:-}" != rss ] || rss "$relay_pid" >> "$work/relay-rss"
      sleep 0.2
    done ) &
  probe=$!
  pids+=("$probe")
}
stop_probe() { touch "$work/probe-stop"; wait "$probe" 2>/dev/null || true; }
for _ in $(seq 25); do probe_once "$work/probe-idle"; sleep 0.2; done
start_probe "$work/probe-busy" rss
say "a backlog of $BACKLOG readings with the cloud broker down"
LOCAL_BROKER=127.0.0.1 LOCAL_PORT=$local_port LOCAL_USERNAME=temperature-sensor LOCAL_PASSWORD=bench RUST_LOG=warn \
  "$bin/temperature-sensor" --format json --qos 1 --interval 0 --no-retain --count "$BACKLOG" --device backlog
stop_probe
probes=$(( $(lines "$work/probe-idle") + $(lines "$work/probe-busy") ))
expected=$((BACKLOG + probes))
for _ in $(seq 600); do
  [ "$(metric iot_relay_backlog)" = "$expected" ] && break
  sleep 0.1
done
[ "$(metric iot_relay_backlog)" = "$expected" ] ||
  { say "the relay's backlog is $(metric iot_relay_backlog), not $expected, 60 s after the sensor ended"; exit 1; }
# What the log takes on the disk (the relay's iot_relay_disk_bytes counts its journal at
# its most, 64 MiB, whatever it holds).
sync
disk=$(du -s -B1 "$work/relay-log-backlog" | cut -f1)
per=$(calc "$disk / $expected")
fill_rss=$(rss "$relay_pid") backlog_count=$expected
early_rss=$(awk '{ v[NR] = $1 } END { print v[int(NR / 5) + 1] }' "$work/relay-rss")

# The edge as it would be through such an outage: a live stream of 1 000 readings/s
# into the relay with the backlog on its disk, the probe beside it.
live=$(calc "max(1, int(4000 * $SECONDS_PER_RUN))")
say "1 000 readings/s live for $(calc "$live / 1000") s with the backlog on disk"
start_probe "$work/probe-live"
LOCAL_BROKER=127.0.0.1 LOCAL_PORT=$local_port LOCAL_USERNAME=pressure-sensor LOCAL_PASSWORD=bench RUST_LOG=warn \
  "$bin/pressure-sensor" --rate 1000 --count "$live" --format json --qos 1 --no-retain
stop_probe
expected=$((expected + live + $(lines "$work/probe-live")))

say "the cloud broker back: draining $expected messages"
mosquitto -c "$work/cloud/mosquitto.conf" 2>>"$work/cloud.log" & pids+=($!)
forwarded0=$(metric iot_relay_forwarded_total)
start_probe "$work/probe-drain"
# From the first message forwarded (the relay's reconnect backoff is not the drain).
for _ in $(seq 1200); do
  [ "$(metric iot_relay_forwarded_total)" != "$forwarded0" ] && break
  sleep 0.05
done
drain_start=$(date +%s.%N) drained0=$(metric iot_relay_forwarded_total)
for _ in $(seq 36000); do
  [ "$(metric iot_relay_backlog)" = 0 ] && break
  sleep 0.1
done
[ "$(metric iot_relay_backlog)" = 0 ] || { say "the backlog did not drain within an hour"; exit 1; }
drain_rate=$(calc "($(metric iot_relay_forwarded_total) - $drained0) / ($(date +%s.%N) - $drain_start)")
stop_probe
# "p50 p99 max" of the probe times in a file.
probe_stats() {
  [ -s "$1" ] || { echo "none taken (too short)"; return; }
  sort -n "$1" | awk '{ v[NR] = $1 } END { i = int(NR * 0.99 + 0.5); if (i < 1) i = 1; printf "%d / %d / %d\n", v[int((NR + 1) / 2)], v[i], v[NR] }'
}

echo
echo "| backlog (cloud broker down) | messages | disk | per message | 24 h at 1 000 readings/s | relay RSS at a fifth, at the end |"
echo "| --- | ---: | ---: | ---: | ---: | ---: |"
echo "| edge-relay | $backlog_count | $(calc "f'{$disk / 1e6:.0f} MB'") | $(calc "f'{$per:.0f} B'") | $(calc "f'{$per * 86400000 / 1e9:.1f} GB'") | $(calc "f'{$early_rss / 1024:.0f} MiB, {$fill_rss / 1024:.0f} MiB'") |"
echo
echo "| the backlog drained into the cloud broker | readings/s | against a 1 000/s live stream |"
echo "| --- | ---: | ---: |"
echo "| edge-relay | $(calc "f'{$drain_rate:.0f}'") | $(calc "f'{$drain_rate / 1000:.1f}×'") |"
echo
echo "| a QoS 1 publish to the edge broker (mosquitto_pub, process start included), ms | p50 / p99 / max |"
echo "| --- | ---: |"
echo "| idle | $(probe_stats "$work/probe-idle") |"
echo "| while the backlog fills (one sensor as fast as it goes: the machine's cores busy) | $(probe_stats "$work/probe-busy") |"
echo "| the backlog on disk, 1 000 readings/s live | $(probe_stats "$work/probe-live") |"
echo "| while it drains (as fast as the cloud broker takes it) | $(probe_stats "$work/probe-drain") |"
