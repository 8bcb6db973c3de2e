#!/usr/bin/env python3
"""MQTT readings into MongoDB, as a careful user would write it with paho-mqtt and
pymongo: a persistent session at QoS 1, insert_many in batches of 500 (or what came in
0.2 s), and each message acknowledged to the broker only after the batch holding it
was written (paho's manual_ack), so a crash loses nothing the broker handed over.

    persist.py   (settings from the environment: PEER_MQTT_HOST, PEER_MQTT_PORT,
                  PEER_MQTT_USER, PEER_MQTT_PASSWORD, PEER_CLIENT_ID, PEER_TOPIC,
                  PEER_MONGODB_URI, PEER_MONGODB_DATABASE, PEER_KEYED)

With PEER_KEYED=1 it writes what mongo-persister writes for a JSON reading: the key
`(device, boot, seq)` as `_id` (a reading delivered again is refused as a duplicate,
not stored twice), `ts` as a date and the measurement named by the topic.

A peer of mongo-persister for bench/peers.sh; not part of the pipeline.
"""
import json
import os
import queue
import signal
import threading
from datetime import datetime, timezone

import paho.mqtt.client as mqtt
from pymongo import MongoClient
from pymongo.errors import BulkWriteError

BATCH = 500
WAIT = 0.2

env = os.environ
KEYED = env.get("PEER_KEYED") == "1"
DUPLICATE_KEY = 11000
collection = MongoClient(env["PEER_MONGODB_URI"])[env["PEER_MONGODB_DATABASE"]]["readings"]
arrived = queue.Queue()
stop = threading.Event()


def on_connect(client, userdata, flags, reason_code, properties):
    client.subscribe(env.get("PEER_TOPIC", "/sensor/#"), qos=1)


def on_message(client, userdata, message):
    arrived.put(message)


def document(message):
    try:
        reading = json.loads(message.payload)
    except ValueError:
        reading = None
    if not isinstance(reading, dict):
        reading = {"raw": message.payload.decode("utf-8", "replace")}
    reading["topic"] = message.topic
    reading["received_at"] = datetime.now(timezone.utc)
    if KEYED and {"device", "boot", "seq", "ts"} <= reading.keys():
        reading["_id"] = {k: reading[k] for k in ("device", "boot", "seq")}
        reading["ts"] = datetime.fromisoformat(reading["ts"].replace("Z", "+00:00"))
        reading["measurement"] = message.topic.rsplit("/", 1)[-1]
    return reading


def insert(documents):
    try:
        collection.insert_many(documents, ordered=False)
    except BulkWriteError as error:
        # Keyed: a reading stored before is refused, and that is the point.
        if not KEYED or any(e["code"] != DUPLICATE_KEY for e in error.details["writeErrors"]):
            raise


def write(client):
    while not stop.is_set():
        try:
            batch = [arrived.get(timeout=WAIT)]
        except queue.Empty:
            continue
        deadline = threading.Event()
        timer = threading.Timer(WAIT, deadline.set)
        timer.start()
        while len(batch) < BATCH and not deadline.is_set():
            try:
                batch.append(arrived.get(timeout=0.01))
            except queue.Empty:
                pass
        timer.cancel()
        insert([document(m) for m in batch])
        for message in batch:
            client.ack(message.mid, message.qos)


client = mqtt.Client(
    mqtt.CallbackAPIVersion.VERSION2,
    client_id=env["PEER_CLIENT_ID"],
    clean_session=False,
    manual_ack=True,
)
client.username_pw_set(env["PEER_MQTT_USER"], env["PEER_MQTT_PASSWORD"])
client.max_inflight_messages_set(1000)
client.on_connect = on_connect
client.on_message = on_message
signal.signal(signal.SIGTERM, lambda *_: stop.set())
client.connect(env.get("PEER_MQTT_HOST", "127.0.0.1"), int(env["PEER_MQTT_PORT"]))
client.loop_start()
writer = threading.Thread(target=write, args=(client,))
writer.start()
try:
    while writer.is_alive():
        writer.join(0.5)
except KeyboardInterrupt:
    stop.set()
client.loop_stop()
client.disconnect()
