#!/usr/bin/env bash
# Where edge-relay's CPU goes per reading: the release relay between an edge broker and
# a cloud broker from mosquitto/ (TLS to the cloud, as bench/relay.sh runs it), N QoS 1
# JSON readings from one temperature-sensor as fast as they go, the relay under
# `perf record` (its own process only). Prints the CPU per reading of the relay and of
# the edge broker, then the top entries by self time, then ours and our libraries' by
# time including what they call.
#
#   bench/profile-relay.sh      BENCH_PROFILE_N=50000 readings, BENCH_PROFILE_TOP=30 rows,
#                               BENCH_PROFILE_DATA=FILE keeps perf.data for `perf report`
#
# For call stacks, build with frame pointers and line tables into a target folder of
# their own:
#   RUSTFLAGS="-C force-frame-pointers=yes" CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \
#     CARGO_TARGET_DIR=target-profile bench/profile-relay.sh
#
# Needs perf (Debian: linux-perf) and what scripts/test installs. Not part of the tests.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

N=${BENCH_PROFILE_N:-50000}
TOP=${BENCH_PROFILE_TOP:-30}
command -v perf >/dev/null 2>&1 || { say "perf not found (Debian: apt-get install linux-perf)"; exit 1; }

build temperature-sensor mqtt-subscriber edge-relay
start_cloud
start_local relay
start_relay "$work/relay-log"
cpu() { awk '{ printf "%.3f\n", ($14 + $15) / 100 }' "/proc/$1/stat"; }

LOCAL_BROKER=127.0.0.1 LOCAL_PORT=$cloud_port LOCAL_USERNAME=mqtt-subscriber LOCAL_PASSWORD=bench RUST_LOG=info \
  "$bin/mqtt-subscriber" --client-id profile-relay --topic '/sensor/#' --qos 1 --count "$N" --format json \
  > /dev/null 2> "$work/sub.log" &
sub=$!
wait_line "$work/sub.log" 'subscribed'
perf record -F 1999 -g -o "$work/perf.data" -p "$relay_pid" 2>"$work/perf.log" &
perf_pid=$!
relay0=$(cpu "$relay_pid") edge0=$(cpu "$local_pid")
say "$N readings through the relay under perf"
LOCAL_BROKER=127.0.0.1 LOCAL_PORT=$local_port LOCAL_USERNAME=temperature-sensor LOCAL_PASSWORD=bench RUST_LOG=warn \
  "$bin/temperature-sensor" --format json --qos 1 --interval 0 --no-retain --count "$N" --device profile
wait "$sub"
relay_cpu=$(calc "$(cpu "$relay_pid") - $relay0") edge_cpu=$(calc "$(cpu "$local_pid") - $edge0")
kill -INT "$perf_pid"; wait "$perf_pid" || true
[ -z "${BENCH_PROFILE_DATA:-}" ] || cp "$work/perf.data" "$BENCH_PROFILE_DATA"
echo "edge-relay: $(calc "f'{$relay_cpu / $N * 1e6:.1f}'") µs of CPU per reading; the edge broker beside it: $(calc "f'{$edge_cpu / $N * 1e6:.1f}'") µs"
echo
perf_report "$work/perf.data" "$TOP" 'edge_relay|iot_core|rumqttc::|fjall|lsm_tree|tokio::|rustls|serde_json::|metrics'
