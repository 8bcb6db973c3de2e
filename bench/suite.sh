#!/usr/bin/env bash
# The benchmark suite: every stage of the pipeline beside a reference measured in the
# same run on the same machine, each figure the median of several runs, written as a
# ratio. Prints Markdown tables (the README's Benchmarks section is one such output).
#
#   bench/suite.sh [SECTION ...]     sections: subscriber publisher bridge persister
#                                    ingest metrics replay repair resources (default: all,
#                                    in order)
#
# Environment (defaults):
#   BENCH_N=100000        messages per run of the subscriber, publisher and resources runs
#   BENCH_RUNS=3          runs per figure; the median is reported
#   BENCH_SECONDS=5       length of one bridge latency run
#   BENCH_RATES="1000 5000"   publish rates of the latency runs, messages per second
#   BENCH_PERSISTER_N=5000    readings per persister run
#   BENCH_DEVICES=1000    device-status connections for the per-connection cost
#   BENCH_REPAIR_RATE=400 readings/s of the sensor in the repair runs (5 s of them lost)
#   BENCH_REPAIR_AFTER=10 the persister's --repair-after in the repair runs (its default)
#   BENCH_PROFILE=release (debug: the test build, for a quick smoke run)
#   MONGODB_URI           the persister's database server (default: one of our own,
#                         mongod when on the PATH, else nx-27017 from .venv)
#
# Needs what scripts/test installs (mosquitto, mosquitto-clients, and nx-27017 in .venv
# unless a mongod is on the PATH). Benchmarks are not tests: nothing here fails on a
# slow figure; the targets are in the README.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

N=${BENCH_N:-100000}
PERSISTER_N=${BENCH_PERSISTER_N:-5000}
DEVICES=${BENCH_DEVICES:-1000}
REPAIR_RATE=${BENCH_REPAIR_RATE:-400}
REPAIR_AFTER=${BENCH_REPAIR_AFTER:-10}
sections=("$@")
((${#sections[@]})) || sections=(subscriber publisher bridge persister ingest metrics replay repair resources)
for section in "${sections[@]}"; do
  case $section in
    subscriber | publisher | bridge | persister | ingest | metrics | replay | repair | resources) ;;
    *) say "unknown section '$section': expected subscriber, publisher, bridge, persister, ingest, metrics, replay, repair or resources"; exit 2 ;;
  esac
done
wants() { [[ " ${sections[*]} " == *" $1 "* ]]; }

build pressure-sensor temperature-sensor mqtt-subscriber mongo-persister device-status readings
start_cloud
# Publishing and reading on the cloud broker: the bridge user may write /sensor/#.
pub_env=(LOCAL_BROKER=127.0.0.1 LOCAL_PORT="$cloud_port" LOCAL_USERNAME=bridge LOCAL_PASSWORD=bench RUST_LOG=warn)
sub_env=(LOCAL_BROKER=127.0.0.1 LOCAL_PORT="$cloud_port" LOCAL_USERNAME=mqtt-subscriber LOCAL_PASSWORD=bench RUST_LOG=warn)
c_pub=(mosquitto_pub -h 127.0.0.1 -p "$cloud_port" -u bridge -P bench)
c_sub=(mosquitto_sub -h 127.0.0.1 -p "$cloud_port" -u mqtt-subscriber -P bench)
seq "$N" | awk '{ printf "%.2f\n", 990 + ($1 % 3000) / 100 }' > "$work/lines"
# A new persistent session subscribed to the sensor topics, with client id $id.
new_session() { next_id "$1"; "${c_sub[@]}" -c -i "$id" -q 1 -t /sensor/# -E; }
# How many messages wait in session $id (reads them; gives up 10 s after the last).
queued() { "${c_sub[@]}" -c -i "$id" -q 1 -t /sensor/# -C "$N" -W 10 2>/dev/null | wc -l; }
# Queues N QoS 1 readings for session $id, with our sensor (mosquitto_pub -l loses some).
fill() { env "${pub_env[@]}" "$bin/pressure-sensor" --count "$N" --interval 0 --qos 1 --no-retain; }

# Resources of our runs, per binary: "cpu_seconds peak_rss_kib messages" of the median run.
declare -A resources=()
# Sets $med to the median wall time of the runs measured into FILE... and $best to
# that run's file; keeps the resources of that run under LABEL (none when empty).
median_run() { # label files...
  local label=$1
  shift
  best=$(for f in "$@"; do echo "$(head -n 1 "$f" | cut -d' ' -f1) $f"; done | sort -g | awk '{ v[NR] = $2 } END { print v[int((NR + 1) / 2)] }')
  [ -z "$label" ] || resources[$label]="$(head -n 1 "$best" | cut -d' ' -f2,3)"
  med=$(head -n 1 "$best" | cut -d' ' -f1)
}

table_header() {
  echo
  echo "$1"
  echo
}

# A client id never used before in this run, in $id (a persistent session each).
run_id=0
next_id() { run_id=$((run_id + 1)); id="bench-$1-$run_id"; }

if wants subscriber; then
  say "subscriber ingest: $N queued QoS 1 messages, $RUNS runs each"
  ours=() theirs=()
  for run in $(seq "$RUNS"); do
    for client in ours theirs; do
      new_session sub
      fill
      out="$work/sub-$client-$run"
      if [ "$client" = ours ]; then
        env "${sub_env[@]}" "${measure[@]}" "$out" timeout 300 "$bin/mqtt-subscriber" --client-id "$id" --topic /sensor/# --qos 1 \
          --count "$N" --format json > /dev/null
        ours+=("$out")
      else
        "${measure[@]}" "$out" timeout 300 "${c_sub[@]}" -c -i "$id" -q 1 -t /sensor/# -C "$N" > /dev/null
        theirs+=("$out")
      fi
    done
  done
  median_run mqtt-subscriber "${ours[@]}"; sub_ours=$med
  median_run "" "${theirs[@]}"; sub_theirs=$med
  resources[mqtt-subscriber]+=" $N"
fi

if wants publisher; then
  say "publisher: $N QoS 1 messages as fast as possible, $RUNS runs each"
  # Each run publishes into a new session, which then counts what arrived.
  ours=() theirs=() lines=()
  for run in $(seq "$RUNS"); do
    new_session pub
    out="$work/pub-ours-$run"
    env "${pub_env[@]}" "${measure[@]}" "$out" "$bin/pressure-sensor" --count "$N" --interval 0 --qos 1 --no-retain
    echo " $(queued)" >> "$out"
    ours+=("$out")
    new_session pub
    out="$work/pub-theirs-$run"
    "${measure[@]}" "$out" "${c_pub[@]}" -t /sensor/pressure -q 1 -m 1001.23 --repeat "$N"
    echo " $(queued)" >> "$out"
    theirs+=("$out")
    new_session pub
    out="$work/pub-lines-$run"
    "${measure[@]}" "$out" "${c_pub[@]}" -t /sensor/pressure -q 1 -l < "$work/lines"
    echo " $(queued)" >> "$out"
    lines+=("$out")
  done
  # Messages delivered of the median run: field 4 (after wall, cpu, rss).
  delivered() { tr '\n' ' ' < "$1" | awk '{ print $4 }'; }
  median_run pressure-sensor "${ours[@]}"; pub_ours=$med pub_ours_n=$(delivered "$best")
  median_run "" "${theirs[@]}"; pub_theirs=$med pub_theirs_n=$(delivered "$best")
  median_run "" "${lines[@]}"; pub_lines=$med pub_lines_n=$(delivered "$best")
  resources[pressure-sensor]+=" $N"

  say "publisher: holding 10 000 readings/s for $SECONDS_PER_RUN s at QoS 0 and 1"
  paced=()
  for qos in 0 1; do
    env "${pub_env[@]}" RUST_LOG=info "$bin/pressure-sensor" --rate 10000 --duration "$SECONDS_PER_RUN" --qos "$qos" \
      --no-retain 2> "$work/paced-$qos.log"
    paced+=("$(grep -o 'summary: .*' "$work/paced-$qos.log" | sed -E 's/summary: ([0-9]+) readings sent in ([0-9.]+) s \(([0-9]+)\/s.*/\3/')")
  done
fi

if wants bridge; then
  start_local
  declare -A lat_bridge lat_direct
  for rate in $RATES; do
    say "bridge latency at $rate readings/s, $SECONDS_PER_RUN s per run, $RUNS runs each"
    b=() d=()
    for run in $(seq "$RUNS"); do
      next_id lat
      b+=("$(latency_run "$rate" "$local_port" pressure-sensor)")
      next_id lat
      d+=("$(latency_run "$rate" "$cloud_port" bridge)")
    done
    # Median per column over the runs.
    col_median() { for row in "${@:2}"; do echo "$row" | cut -d' ' -f"$1"; done | median; }
    lat_bridge[$rate]="$(col_median 1 "${b[@]}") $(col_median 2 "${b[@]}") $(col_median 3 "${b[@]}")"
    lat_direct[$rate]="$(col_median 1 "${d[@]}") $(col_median 2 "${d[@]}") $(col_median 3 "${d[@]}")"
  done
fi

if wants persister || wants ingest || wants metrics; then
  start_database
  export CLOUD_BROKER=127.0.0.1 CLOUD_PORT=$cloud_port CLOUD_USERNAME=mongo-persister CLOUD_PASSWORD=bench \
    MONGODB_URI="$db_uri"
  # Queues PERSISTER_N JSON readings of device $id for the session.
  fill_readings() {
    env "${pub_env[@]}" "$bin/temperature-sensor" --format json --qos 1 --interval 0 --no-retain \
      --count "$PERSISTER_N" --device "$id"
  }
  # One drain: a new persistent session (the persister started once with ARGS, the
  # subscription FILTER, a regex, standing), FILL queues messages for it, then it is
  # timed storing them until WRITTEN documents are written. Writes its measure to OUT.
  drain() { # out written fill filter args...
    local out=$1 written=$2 fill=$3 filter=$4 db log
    shift 4
    next_id persister
    db=${id//-/_}
    log="$work/$id.log"
    MONGODB_DATABASE=$db RUST_LOG=info "$bin/mongo-persister" --client-id "$id" "$@" >"$log" 2>&1 &
    local pid=$!
    wait_line "$log" "subscribed filter=\"$filter\""
    kill -TERM "$pid"; wait "$pid"
    "$fill"
    # Stopped by a watcher once every document is written; the stats line says when.
    (wait_line "$log.2" "written=$written " 600 && pkill -TERM -f -- "^$bin/mongo-persister --client-id $id ") &
    local watcher=$!
    env MONGODB_DATABASE="$db" RUST_LOG=info "${measure[@]}" "$out" "$bin/mongo-persister" --client-id "$id" "$@" \
      --stats-interval 0.05 >"$log.2" 2>&1
    wait "$watcher"
    # Wall time from the persister's first log line to the stats line that counts every
    # reading written: neither its start-up nor its shutdown is ingest.
    python3 - "$log.2" "written=$written " "$out" <<'PY'
import re, sys
from datetime import datetime
log, needle, out = sys.argv[1:]
stamps = [(line, re.match(r"\S+", line).group()) for line in open(log) if re.match(r"\d{4}-", line)]
at = lambda stamp: datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
start = at(stamps[0][1])
end = next(at(stamp) for line, stamp in stamps if needle in line)
fields = open(out).read().split()
open(out, "w").write(" ".join([f"{end - start:.3f}"] + fields[1:]) + "\n")
PY
  }
fi
if wants persister; then
  say "persister: $PERSISTER_N queued readings into $server, $RUNS runs each"
  one=() many=()
  for run in $(seq "$RUNS"); do
    drain "$work/persist-1-$run" "$PERSISTER_N" fill_readings /device/# --batch-size 1; one+=("$work/persist-1-$run")
    drain "$work/persist-500-$run" "$PERSISTER_N" fill_readings /device/# --batch-size 500; many+=("$work/persist-500-$run")
  done
  median_run "" "${one[@]}"; persist_one=$med
  median_run mongo-persister "${many[@]}"; persist_many=$med
  resources[mongo-persister]+=" $PERSISTER_N"
fi

if wants ingest; then
  # The same queued Tasmota messages (a BME280 and a DS18B20: five numbers, a time, two
  # units), read by the tasmota preset (five documents each, with device time) and by
  # the default mapping (not its form: one flagged document each, raw text kept).
  tasmota='{"Time":"2026-11-24T11:00:00","BME280":{"Temperature":22.1,"Humidity":45.0,"DewPoint":9.6,"Pressure":1013.2},"DS18B20":{"Id":"01144A0CB2AA","Temperature":21.4},"PressureUnit":"hPa","TempUnit":"C"}'
  fill_tasmota() { "${c_pub[@]}" -q 1 -t tele/bench/SENSOR -m "$tasmota" --repeat "$PERSISTER_N"; }
  say "ingest: $PERSISTER_N queued Tasmota messages into $server, $RUNS runs each"
  preset=() plain=()
  for run in $(seq "$RUNS"); do
    drain "$work/ingest-preset-$run" "$((PERSISTER_N * 5))" fill_tasmota "tele/[+]/SENSOR" --ingest tasmota; preset+=("$work/ingest-preset-$run")
    drain "$work/ingest-default-$run" "$PERSISTER_N" fill_tasmota tele/# --topic 'tele/#'; plain+=("$work/ingest-default-$run")
  done
  median_run "" "${plain[@]}"; ingest_default=$med ingest_default_cpu=$(cut -d' ' -f2 "$best")
  median_run "" "${preset[@]}"; ingest_preset=$med ingest_preset_cpu=$(cut -d' ' -f2 "$best")
fi

if wants metrics; then
  # The same queued readings, stored with the metrics listener on and off, alternating.
  say "metrics: $PERSISTER_N queued readings into $server with and without --metrics-address, $RUNS runs each"
  with_metrics=() without_metrics=()
  for run in $(seq "$RUNS"); do
    drain "$work/metrics-on-$run" "$PERSISTER_N" fill_readings /device/# --metrics-address 127.0.0.1:0; with_metrics+=("$work/metrics-on-$run")
    drain "$work/metrics-off-$run" "$PERSISTER_N" fill_readings /device/#; without_metrics+=("$work/metrics-off-$run")
  done
  median_run "" "${with_metrics[@]}"; metrics_on=$med metrics_on_cpu=$(cut -d' ' -f2 "$best")
  median_run "" "${without_metrics[@]}"; metrics_off=$med metrics_off_cpu=$(cut -d' ' -f2 "$best")
fi

if wants replay; then
  # A sensor publishing N JSON readings at 10 000/s (paced, so its send queue stays
  # short and the buffer is what grows), keeping them all for replays (--replay-buffer N)
  # in memory and on disk too (--replay-dir), and keeping none, alternating: CPU and
  # peak memory.
  say "replay: $N JSON readings with a replay buffer of $N, of $N on disk too, and of 0, $RUNS runs each"
  kept=() disk=() none=()
  replay_sensor() { # out args...
    local out=$1
    shift
    env "${pub_env[@]}" "${measure[@]}" "$out" "$bin/temperature-sensor" --format json --count "$N" --rate 10000 --qos 1 --no-retain "$@"
  }
  for run in $(seq "$RUNS"); do
    replay_sensor "$work/replay-kept-$run" --replay-buffer "$N"; kept+=("$work/replay-kept-$run")
    replay_sensor "$work/replay-disk-$run" --replay-buffer "$N" --replay-dir "$work/replay-dir-$run"; disk+=("$work/replay-disk-$run")
    replay_sensor "$work/replay-none-$run" --replay-buffer 0; none+=("$work/replay-none-$run")
  done
  replay_disk_bytes=$(du -sb "$work/replay-dir-1" | cut -f1)
  median_run "" "${kept[@]}"; replay_kept_cpu=$(cut -d' ' -f2 "$best") replay_kept_rss=$(cut -d' ' -f3 "$best")
  median_run "" "${disk[@]}"; replay_disk_cpu=$(cut -d' ' -f2 "$best") replay_disk_rss=$(cut -d' ' -f3 "$best")
  median_run "" "${none[@]}"; replay_none_cpu=$(cut -d' ' -f2 "$best") replay_none_rss=$(cut -d' ' -f3 "$best")
fi

if wants repair; then
  # The README's measured case: a sensor streams REPAIR_RATE JSON readings/s through
  # the edge broker and the bridge; the cloud machine loses power (cloud broker and
  # persister SIGKILLed, the broker's persistence file gone), the broker comes back at
  # once and the persister 5 s later. Timed: from the persister's restart to
  # `readings gaps` clean again with the readings after the outage stored.
  [ -n "${local_port:-}" ] || start_local
  [ -n "${db_uri:-}" ] || start_database
  say "repair: a cloud power cut under $REPAIR_RATE readings/s, --repair-after $REPAIR_AFTER, $RUNS runs"
  repair_times=() repair_lost=()
  repair_env=(CLOUD_BROKER=127.0.0.1 CLOUD_PORT="$cloud_port" CLOUD_USERNAME=mongo-persister CLOUD_PASSWORD=bench MONGODB_URI="$db_uri")
  gaps_json() { env "${repair_env[@]}" MONGODB_DATABASE="$1" "$bin/readings" gaps --device "$2" --format json 2>/dev/null; }
  stored_count() { gaps_json "$1" "$2" | python3 -c 'import json,sys; print(sum(r["stored"] for r in json.load(sys.stdin)))' 2>/dev/null || echo 0; }
  for run in $(seq "$RUNS"); do
    next_id repair
    db=${id//-/_}
    persister() {
      env "${repair_env[@]}" MONGODB_DATABASE="$db" RUST_LOG=info "$bin/mongo-persister" --client-id "$id" \
        --repair-after "$REPAIR_AFTER" >>"$work/$id.log" 2>&1 & pids+=($!)
      persister_pid=$!
    }
    persister
    wait_line "$work/$id.log" 'subscribed filter="/sensor/#"'
    LOCAL_BROKER=127.0.0.1 LOCAL_PORT=$local_port LOCAL_USERNAME=temperature-sensor LOCAL_PASSWORD=bench RUST_LOG=info \
      "$bin/temperature-sensor" --format json --qos 1 --no-retain --rate "$REPAIR_RATE" --device "$id" 2>"$work/$id.sensor.log" & pids+=($!)
    sensor_pid=$!
    for _ in $(seq 600); do [ "$(stored_count "$db" "$id")" -ge $((REPAIR_RATE * 3)) ] && break; sleep 0.1; done
    kill -KILL "$persister_pid" "$cloud_pid"; wait "$persister_pid" "$cloud_pid" 2>/dev/null || true
    rm -f "$work/cloud/data/mosquitto.db"
    mosquitto -c "$work/cloud/mosquitto.conf" 2>>"$work/cloud.log" & pids+=($!)
    cloud_pid=$!
    wait_port "$cloud_port"
    sleep 5 # the persister's own restart, as in the measured case
    before=$(stored_count "$db" "$id")
    persister
    started=$(date +%s.%N)
    # Clean: no gaps, and more than 5 s of readings stored since (the outage's are in).
    for _ in $(seq 3000); do
      if gaps_json "$db" "$id" >/dev/null && [ "$(stored_count "$db" "$id")" -gt $((before + REPAIR_RATE * 5)) ]; then break; fi
      sleep 0.1
    done
    repair_times+=("$(calc "f'{$(date +%s.%N) - $started:.1f}'")")
    repair_lost+=("$(grep -o 'ranges=\[[^]]*\] attempt=1' "$work/$id.log" | python3 -c '
import re, sys
print(sum(int(b) - int(a) + 1 for line in sys.stdin for a, b in re.findall(r"\((\d+), (\d+)\)", line)))')")
    kill -TERM "$sensor_pid" "$persister_pid"; wait "$sensor_pid" "$persister_pid" 2>/dev/null || true
  done
  repair_time=$(printf '%s\n' "${repair_times[@]}" | median)
  repair_missing=$(printf '%s\n' "${repair_lost[@]}" | median)
fi

if wants resources; then
  say "resources: temperature-sensor, and device-status with 1 and $DEVICES devices"
  env "${pub_env[@]}" "${measure[@]}" "$work/res-temp" "$bin/temperature-sensor" --count "$N" --interval 0 --qos 1 --no-retain
  resources[temperature-sensor]="$(cut -d' ' -f2,3 "$work/res-temp") $N"
  [ -n "${local_port:-}" ] || start_local
  # Per connection: RSS of device-status and of the edge broker with 1 and with DEVICES
  # devices connected and online.
  status_rss() { # devices -> "status_kib broker_kib"
    local log="$work/status-$1.log"
    LOCAL_BROKER=127.0.0.1 LOCAL_PORT=$local_port LOCAL_USERNAME=device-status LOCAL_PASSWORD=bench RUST_LOG=debug \
      "$bin/device-status" --devices "$1" --topic '/device/{device}/status' --device "bench-$1-0001" 2>"$log" &
    local pid=$!
    for _ in $(seq 1200); do
      [ "$(grep -c 'status online' "$log")" -ge "$1" ] && break
      sleep 0.05
    done
    local broker_pid
    broker_pid=$(pgrep -f -- "mosquitto -c $work/local/mosquitto.conf")
    echo "$(rss "$pid") $(rss "$broker_pid")"
    kill -TERM "$pid"; wait "$pid"
  }
  read -r status_1 broker_1 <<< "$(status_rss 1)"
  read -r status_n broker_n <<< "$(status_rss "$DEVICES")"
fi

# The report.
cores=$(nproc)
mosquitto_version=$(mosquitto -h 2>/dev/null | head -n 1 | grep -o 'version [0-9.]*' || true)
echo
echo "Benchmarks of $(date -u +%F) on $cores cores ($(uname -m)), Mosquitto ${mosquitto_version#version }, profile $BENCH_PROFILE; medians of $RUNS runs. Ratio: reference time / ours (above 1: ours is faster)."
ratio() { calc "f'{$1 / $2:.2f}'"; }
rate() { calc "f'{$1 / $2:,.0f}'"; }
if wants subscriber || wants publisher || wants persister; then
  table_header "Throughput"
  echo "| stage | ours | reference | ours, msg/s | reference, msg/s | ratio |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: |"
  if wants subscriber; then
    echo "| subscriber: drain $N queued QoS 1 | \`mqtt-subscriber --format json\` ${sub_ours} s | \`mosquitto_sub -c -q 1 -C N\` ${sub_theirs} s | $(rate "$N" "$sub_ours") | $(rate "$N" "$sub_theirs") | $(ratio "$sub_theirs" "$sub_ours") |"
  fi
  if wants publisher; then
    echo "| publisher: $N at QoS 1 | \`pressure-sensor --interval 0\` ${pub_ours} s, $pub_ours_n delivered | \`mosquitto_pub -q 1 --repeat N\` ${pub_theirs} s, $pub_theirs_n delivered | $(rate "$N" "$pub_ours") | $(rate "$N" "$pub_theirs") | $(ratio "$pub_theirs" "$pub_ours") |"
    if [ "$pub_lines_n" = "$N" ]; then lines_ratio=$(ratio "$pub_lines" "$pub_ours"); else lines_ratio="none: it lost messages"; fi
    echo "| publisher: $N lines at QoS 1 | (as above) | \`mosquitto_pub -l -q 1\` ${pub_lines} s, $pub_lines_n delivered | — | $(rate "$pub_lines_n" "$pub_lines") | $lines_ratio |"
  fi
  if wants persister; then
    echo "| persister: $PERSISTER_N queued readings into $server | \`--batch-size 500\` ${persist_many} s | one insert per message ${persist_one} s | $(rate "$PERSISTER_N" "$persist_many") | $(rate "$PERSISTER_N" "$persist_one") | $(ratio "$persist_one" "$persist_many") |"
  fi
fi
if wants ingest; then
  table_header "Ingest: $PERSISTER_N queued Tasmota SENSOR messages into $server"
  echo "| mapping | documents | wall s | persister CPU s | CPU µs per message | wall ratio to default |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: |"
  echo "| \`--ingest tasmota\` (5 measurements each) | $((PERSISTER_N * 5)) | $ingest_preset | $ingest_preset_cpu | $(calc "f'{$ingest_preset_cpu / $PERSISTER_N * 1e6:,.0f}'") | $(ratio "$ingest_preset" "$ingest_default") |"
  echo "| default (flagged, raw kept) | $PERSISTER_N | $ingest_default | $ingest_default_cpu | $(calc "f'{$ingest_default_cpu / $PERSISTER_N * 1e6:,.0f}'") | 1.00 |"
fi
if wants metrics; then
  table_header "Persister with metrics on and off: $PERSISTER_N queued readings into $server"
  echo "| persister | wall s | CPU s | wall ratio to off |"
  echo "| --- | ---: | ---: | ---: |"
  echo "| \`--metrics-address\` on | $metrics_on | $metrics_on_cpu | $(ratio "$metrics_on" "$metrics_off") |"
  echo "| off | $metrics_off | $metrics_off_cpu | 1.00 |"
fi
if wants replay; then
  table_header "Replay buffer: a sensor publishing $N JSON readings at 10 000/s"
  echo "| replay buffer | CPU s | CPU µs per reading | peak RSS, MiB |"
  echo "| --- | ---: | ---: | ---: |"
  echo "| $N (all kept) | $replay_kept_cpu | $(calc "f'{$replay_kept_cpu / $N * 1e6:,.1f}'") | $(calc "f'{$replay_kept_rss / 1024:.1f}'") |"
  echo "| $N on disk too (\`--replay-dir\`, $(calc "f'{$replay_disk_bytes / 2**20:.1f}'") MiB of files) | $replay_disk_cpu | $(calc "f'{$replay_disk_cpu / $N * 1e6:,.1f}'") | $(calc "f'{$replay_disk_rss / 1024:.1f}'") |"
  echo "| 0 (none) | $replay_none_cpu | $(calc "f'{$replay_none_cpu / $N * 1e6:,.1f}'") | $(calc "f'{$replay_none_rss / 1024:.1f}'") |"
  echo
  echo "Memory per reading kept: $(calc "f'{($replay_kept_rss - $replay_none_rss) * 1024 / $N:,.0f}'") bytes; CPU ratio kept/none $(ratio "$replay_kept_cpu" "$replay_none_cpu"), on disk too/none $(ratio "$replay_disk_cpu" "$replay_none_cpu")."
fi
if wants repair; then
  table_header "Repair: a cloud power cut under $REPAIR_RATE readings/s (broker back at once, persister 5 s later)"
  echo "| --repair-after | readings asked for again (median) | persister restart to \`readings gaps\` clean, s (median) | runs, s |"
  echo "| ---: | ---: | ---: | --- |"
  echo "| $REPAIR_AFTER | $repair_missing | $repair_time | ${repair_times[*]} |"
fi
if wants publisher; then
  table_header "Paced publishing, one process (\`pressure-sensor --rate 10000\`, $SECONDS_PER_RUN s)"
  echo "| QoS | asked, msg/s | achieved, msg/s | ratio |"
  echo "| ---: | ---: | ---: | ---: |"
  echo "| 0 | 10,000 | $(calc "f'{${paced[0]}:,}'") | $(ratio "${paced[0]}" 10000) |"
  echo "| 1 | 10,000 | $(calc "f'{${paced[1]}:,}'") | $(ratio "${paced[1]}" 10000) |"
fi
if wants bridge; then
  table_header "Latency, sensor to subscriber on the cloud broker, QoS 1 JSON, ms (1 ms resolution)"
  echo "| msg/s | path | p50 | p99 | max | p99 ratio to direct |"
  echo "| ---: | --- | ---: | ---: | ---: | ---: |"
  for rate in $RATES; do
    read -r b50 b99 bmax <<< "${lat_bridge[$rate]}"
    read -r d50 d99 dmax <<< "${lat_direct[$rate]}"
    echo "| $rate | edge broker, TLS bridge, cloud broker | $b50 | $b99 | $bmax | $(calc "f'{max($b99, 1) / max($d99, 1):.1f}'") |"
    echo "| $rate | reference: cloud broker alone | $d50 | $d99 | $dmax | 1.0 |"
  done
fi
if ((${#resources[@]})); then
  table_header "Resources per 100 000 messages (CPU seconds scaled from the run's count; peak RSS as measured)"
  echo "| binary | messages in the run | CPU s per 100 000 | peak RSS, MiB |"
  echo "| --- | ---: | ---: | ---: |"
  for name in temperature-sensor pressure-sensor mqtt-subscriber mongo-persister; do
    [ -n "${resources[$name]:-}" ] || continue
    read -r cpu rss count <<< "${resources[$name]}"
    echo "| $name | $count | $(calc "f'{$cpu * 100000 / $count:.2f}'") | $(calc "f'{$rss / 1024:.1f}'") |"
  done
fi
if wants resources; then
  table_header "device-status: cost of one device (one MQTT connection each)"
  echo "| process | RSS with 1 device, MiB | with $DEVICES, MiB | per device, KiB |"
  echo "| --- | ---: | ---: | ---: |"
  echo "| device-status | $(calc "f'{$status_1 / 1024:.1f}'") | $(calc "f'{$status_n / 1024:.1f}'") | $(calc "f'{($status_n - $status_1) / max($DEVICES - 1, 1):.1f}'") |"
  echo "| edge broker (mosquitto) | $(calc "f'{$broker_1 / 1024:.1f}'") | $(calc "f'{$broker_n / 1024:.1f}'") | $(calc "f'{($broker_n - $broker_1) / max($DEVICES - 1, 1):.1f}'") |"
fi
