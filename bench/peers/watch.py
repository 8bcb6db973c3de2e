#!/usr/bin/env python3
"""Measures one consumer draining queued readings into MongoDB, for bench/peers.sh.

    watch.py drain URI DATABASE N PID     -> "wall_s cpu_s peak_rss_kib stored distinct"
    watch.py settle URI DATABASE N        -> "stored distinct" once nothing more arrives

drain: resumes the consumer PID (stopped with SIGSTOP once it had subscribed, the
readings queued since) and polls the readings collection until it holds N documents;
wall time and the process's CPU time run from the resume to the Nth document (start-up
is not draining); the peak resident memory is the process's VmHWM then.
settle: waits until N distinct readings are stored or nothing arrived for 5 s.
"""
import os
import signal
import sys
import time

from pymongo import MongoClient

TICKS = os.sysconf("SC_CLK_TCK")


def cpu(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def peak_rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def distinct(readings):
    keys = readings.aggregate([{"$group": {"_id": {"$concat": ["$device", ":", {"$toString": "$seq"}]}}}, {"$count": "n"}])
    return next(iter(keys), {"n": 0})["n"]


mode, uri, database, n = sys.argv[1:5]
n = int(n)
readings = MongoClient(uri)[database]["readings"]
if mode == "drain":
    pid = int(sys.argv[5])
    deadline = time.monotonic() + 600
    # The consumer was stopped (SIGSTOP) once subscribed, and the readings queued since.
    start, cpu_start = time.monotonic(), cpu(pid)
    os.kill(pid, signal.SIGCONT)
    while readings.estimated_document_count() < n:
        if time.monotonic() > deadline:
            sys.exit(f"only {readings.estimated_document_count()} of {n} stored in 600 s")
        time.sleep(0.01)
    wall, used, rss = time.monotonic() - start, cpu(pid) - cpu_start, peak_rss(pid)
    print(f"{wall:.3f} {used:.3f} {rss} {readings.count_documents({})} {distinct(readings)}")
else:
    last, since = -1, time.monotonic()
    while time.monotonic() - since < 5:
        stored = readings.count_documents({})
        if stored != last:
            last, since = stored, time.monotonic()
        if distinct(readings) >= n:
            break
        time.sleep(0.2)
    print(f"{readings.count_documents({})} {distinct(readings)}")
