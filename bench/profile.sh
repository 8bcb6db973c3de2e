#!/usr/bin/env bash
# Where the persister's CPU goes per reading: queues N JSON readings for a persistent
# session on the cloud broker, then drains them with the release `mongo-persister`
# under `perf record` (sampling its own process only, not the broker or the database)
# and prints the top entries by self time, then ours and our libraries' by time
# including what they call, and the CPU seconds per reading.
#
#   bench/profile.sh            BENCH_PROFILE_N=50000 readings, BENCH_PROFILE_TOP=25 rows
#
# For call stacks, build with frame pointers and line tables into a target folder of
# their own:
#   RUSTFLAGS="-C force-frame-pointers=yes" CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \
#     CARGO_TARGET_DIR=target-profile bench/profile.sh
#
# Needs perf (Debian: linux-perf) and what scripts/test installs. Not part of the tests.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

N=${BENCH_PROFILE_N:-50000}
TOP=${BENCH_PROFILE_TOP:-25}
command -v perf >/dev/null 2>&1 || { say "perf not found (Debian: apt-get install linux-perf)"; exit 1; }

build pressure-sensor mongo-persister
start_cloud
start_database
id=profile-$$
export CLOUD_BROKER=127.0.0.1 CLOUD_PORT=$cloud_port CLOUD_USERNAME=mongo-persister CLOUD_PASSWORD=bench \
  MONGODB_URI=$db_uri MONGODB_DATABASE=profile RUST_LOG=info
# The session and the schema, then the readings queued in the session.
"$bin/mongo-persister" --client-id "$id" --topic /sensor/# >"$work/first.log" 2>&1 &
first=$!
wait_line "$work/first.log" 'subscribed filter="/sensor/#"'
wait_line "$work/first.log" 'in=0' 30 || true
kill -TERM "$first"; wait "$first"
say "queueing $N readings"
LOCAL_BROKER=127.0.0.1 LOCAL_PORT=$cloud_port LOCAL_USERNAME=bridge LOCAL_PASSWORD=bench RUST_LOG=warn \
  "$bin/pressure-sensor" --format json --qos 1 --interval 0 --no-retain --count "$N" --device "$id"

say "draining them under perf"
"$bin/mongo-persister" --client-id "$id" --topic /sensor/# --stats-interval 0.1 >"$work/drain.log" 2>&1 &
pid=$!
perf record -F 1999 -g -o "$work/perf.data" -p "$pid" 2>"$work/perf.log" &
perf_pid=$!
wait_line "$work/drain.log" "written=$N " 600
cpu=$(awk '{ print ($14 + $15) / 100 }' "/proc/$pid/stat")
kill -INT "$perf_pid"; wait "$perf_pid" || true
kill -TERM "$pid"; wait "$pid"
echo "mongo-persister: $N readings, $cpu CPU s in all (start-up included), $(calc "f'{$cpu / $N * 1e6:.1f}'") µs per reading"
echo
perf_report "$work/perf.data" "$TOP" 'mongo_persister|iot_store|iot_core|mongodb::|bson::|rumqttc::|serde_json::'
