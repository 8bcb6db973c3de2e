#!/usr/bin/env bash
# The edge relay's log, chosen by measurement: redb, fjall and SQLite (rusqlite,
# bundled; WAL, synchronous=FULL) against a plain append-only file with fsync (the
# floor), on the relay's workload: messages of a JSON reading's size appended in
# batches, each batch on disk before it counts (group commit); the forwarded half
# deleted; and a writer SIGKILLed half way through, the store reopened.
#
#   bench/log-store.sh
#
# Environment (defaults): BENCH_LOG_N=200000 messages, BENCH_LOG_BATCHES="10 100 500"
# (messages per commit: 10 is a few devices' worth at 1 000/s with a commit every
# 10 ms), BENCH_LOG_DIR (a folder on the disk to measure; default under target/).
# Bytes written are the kernel's count of what reached the block device
# (/proc/self/io write_bytes), fsyncs and journals included.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${BENCH_LOG_N:-200000}
BATCHES=${BENCH_LOG_BATCHES:-10 100 500}
DIR=${BENCH_LOG_DIR:-target/log-store-bench}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}/log-store
(cd bench/log-store && cargo build --release --quiet)
bin=$CARGO_TARGET_DIR/release/log-store
rm -rf "$DIR"
echo "| store | messages per commit | messages/s | commits/s | bytes written per message | bytes on disk per message | delete the first half, s |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
for batch in $BATCHES; do
  for store in file redb fjall sqlite; do
    line=$("$bin" write "$store" "$DIR/$store-$batch" "$N" "$batch")
    field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<< "$line"; }
    echo "| $store | $batch | $(field per_second) | $(field commits_per_second) | $(field written_per_message) (payload $(field payload_per_message)) | $(field on_disk_per_message) | $(field delete_half_seconds) |"
  done
done
echo
echo "| store | SIGKILLed after | recovered | lost | reopen, s |"
echo "| --- | ---: | ---: | ---: | ---: |"
for store in file redb fjall sqlite; do
  rm -rf "$DIR/crash-$store"
  line=$("$bin" crash "$store" "$DIR/crash-$store" $((N * 2)) 100)
  field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<< "$line"; }
  echo "| $store | $(field acknowledged) acknowledged | $(field recovered) | $(field lost) | $(field reopen_seconds) |"
done
rm -rf "$DIR"
