#!/usr/bin/env bash
# Sparkplug B ingest against JSON, CPU per measurement, in one run: the persister's
# reading of the same 15 metrics as a Tasmota SENSOR message (the tasmota preset) and as
# a Sparkplug DDATA by alias after its birth (the sparkplug preset's host), from the
# payload to the documents it stores; five rounds, the two alternating in each, and
# the median ratio (crates/iot-store/benches/ingest.rs). The database is not part of it:
# both store 15 documents per message.
#
#   bench/sparkplug.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --quiet -p iot-store --bench ingest
