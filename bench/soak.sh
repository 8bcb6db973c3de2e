#!/usr/bin/env bash
# The soak run: the whole pipeline (both brokers bridged over TLS, the database, the
# persister, the catch-all subscriber, device-status and two sensors) at a steady rate
# for a long time, sampling every process's resident memory; then `readings gaps` over
# everything stored. Prints a Markdown table of memory growth.
#
#   bench/soak.sh
#
# Environment (defaults): BENCH_SOAK_DURATION=30m  BENCH_SOAK_RATE=2000 (readings per
# second in all, half per sensor)  BENCH_SOAK_SAMPLE=10 (seconds between samples)
# BENCH_PROFILE=release  MONGODB_URI (else a server of its own, as bench/suite.sh).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

DURATION=${BENCH_SOAK_DURATION:-30m}
RATE=${BENCH_SOAK_RATE:-2000}
SAMPLE=${BENCH_SOAK_SAMPLE:-10}
build temperature-sensor pressure-sensor device-status mqtt-subscriber mongo-persister readings
start_cloud
start_local
start_database
export MONGODB_URI=$db_uri MONGODB_DATABASE=soak RUST_LOG=warn
edge=(LOCAL_BROKER=127.0.0.1 LOCAL_PORT="$local_port" LOCAL_PASSWORD=bench)

declare -A watched # name -> pid
watched[edge-broker]=$(pgrep -f -- "mosquitto -c $work/local/mosquitto.conf")
watched[cloud-broker]=$cloud_pid
[ ! -f "$work/db.pid" ] || watched[database]=$(cat "$work/db.pid")
CLOUD_BROKER=127.0.0.1 CLOUD_PORT=$cloud_port CLOUD_USERNAME=mongo-persister CLOUD_PASSWORD=bench RUST_LOG=info \
  "$bin/mongo-persister" 2> "$work/persister.log" & pids+=($!); watched[mongo-persister]=$!
env "${edge[@]}" LOCAL_USERNAME=mqtt-subscriber RUST_LOG=info "$bin/mqtt-subscriber" --client-id soak-subscriber \
  --format json > /dev/null 2> "$work/subscriber.log" & pids+=($!); watched[mqtt-subscriber]=$!
env "${edge[@]}" LOCAL_USERNAME=device-status "$bin/device-status" --interval 5 2> "$work/status.log" & pids+=($!)
watched[device-status]=$!
wait_line "$work/persister.log" 'subscribed filter="/device/#"'
wait_line "$work/subscriber.log" 'subscribed'
half=$(calc "$RATE / 2")
for kind in temperature pressure; do
  env "${edge[@]}" LOCAL_USERNAME=$kind-sensor RUST_LOG=info "$bin/$kind-sensor" --format json --qos 1 --no-retain \
    --rate "$half" --duration "$DURATION" --device "soak-$kind" 2> "$work/$kind.log" & pids+=($!)
  watched[$kind-sensor]=$!
done
sensors=("${watched[temperature-sensor]}" "${watched[pressure-sensor]}")

say "soak: $RATE readings/s for $DURATION, sampling every $SAMPLE s"
echo "seconds $(printf '%s ' "${!watched[@]}")" > "$work/samples"
start=$(date +%s)
while kill -0 "${sensors[0]}" 2>/dev/null || kill -0 "${sensors[1]}" 2>/dev/null; do
  line="$(( $(date +%s) - start ))"
  for name in "${!watched[@]}"; do line+=" $(rss "${watched[$name]}")"; done
  echo "$line" >> "$work/samples"
  sleep "$SAMPLE"
done
wait "${sensors[@]}" || true
sent=$(grep -ho 'summary: [0-9]*' "$work/temperature.log" "$work/pressure.log" | awk '{ n += $2 } END { print n }')

# Everything sent must be stored: wait (up to 5 minutes) for the persister to catch up,
# then let readings gaps check every seq.
stored() { "$bin/readings" gaps --format json 2>/dev/null | python3 -c 'import json, sys; print(sum(r["stored"] for r in json.load(sys.stdin)))' || echo 0; }
for _ in $(seq 300); do
  [ "$(stored)" -ge "$sent" ] && break
  sleep 1
done
gaps=0
"$bin/readings" gaps > "$work/gaps.txt" || gaps=$?
cat "$work/gaps.txt" >&2

python3 - "$work/samples" "$DURATION" "$RATE" "$sent" "$gaps" <<'PY'
import sys
path, duration, rate, sent, gaps = sys.argv[1:]
rows = [line.split() for line in open(path)]
names, samples = rows[0][1:], [list(map(int, r)) for r in rows[1:]]
print(f"\nSoak: {rate} readings/s for {duration} ({sent} readings sent), RSS sampled every "
      f"{samples[1][0] - samples[0][0] if len(samples) > 1 else 0} s; readings gaps exit code {gaps} "
      f"({'nothing missing, nothing twice' if gaps == '0' else 'see readings gaps'}).\n")
print("| process | RSS after 1 min, MiB | RSS at the end, MiB | peak, MiB | growth after the first minute |")
print("| --- | ---: | ---: | ---: | ---: |")
warm = next((s for s in samples if s[0] >= 60), samples[0])
for i, name in enumerate(names, start=1):
    first, last = warm[i] / 1024, samples[-1][i] / 1024
    peak = max(s[i] for s in samples) / 1024
    growth = f"{(last - first) / first * 100:+.0f} %" if first else "n/a"
    print(f"| {name} | {first:.1f} | {last:.1f} | {peak:.1f} | {growth} |")
PY
