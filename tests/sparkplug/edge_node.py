"""A Sparkplug B edge node for tests/tests/sparkplug.rs, written with pysparkplug (a
Sparkplug client library from PyPI): it waits for its primary host's STATE, is born
with a device, publishes as tests/tests/sparkplug.rs expects, prints one line per step
on stdout, and runs until killed (its last will is its NDEATH).

  edge_node.py first|second --port P --user NAME --password PW --group G --host-id H

first:  births (bdSeq 0), NDATA and DDATA by alias, a historical value, a value after a
        lost seq number; then waits for the host's Rebirth command, is born again and
        publishes one more value.
second: births with bdSeq 1, then the first session's death (bdSeq 0) arriving late,
        then one more value.
"""

import argparse
import itertools
import sys
import threading
import time

import pysparkplug as spb

TIMEOUT = 60


def say(line):
    print(line, flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=["first", "second"])
    for name in ("--port", "--user", "--password", "--group", "--host-id"):
        parser.add_argument(name, required=True)
    args = parser.parse_args()
    node_id = args.user
    now = spb.get_current_timestamp

    client = spb.Client(username=args.user, password=args.password)
    host_online = threading.Event()
    rebirth = threading.Event()

    def on_state(_client, message):
        if message.payload.online:
            host_online.set()

    def on_command(_node, message):
        names = [metric.name for metric in message.payload.metrics]
        if "Node Control/Rebirth" in names:
            say("rebirth requested")
            rebirth.set()

    metrics = [
        spb.Metric(timestamp=now(), name="Temperature", datatype=spb.DataType.DOUBLE, value=21.5, alias=1),
        spb.Metric(timestamp=now(), name="Count", datatype=spb.DataType.INT8, value=-3, alias=2),
        spb.Metric(timestamp=now(), name="Running", datatype=spb.DataType.BOOLEAN, value=True, alias=3),
        spb.Metric(timestamp=now(), name="Label", datatype=spb.DataType.STRING, value="press", alias=4),
    ]
    node = spb.EdgeNode(args.group, node_id, metrics, client=client, cmd_callback=on_command)
    node.register(spb.Device("gauge", [
        spb.Metric(timestamp=now(), name="Pressure", datatype=spb.DataType.FLOAT, value=1.5, alias=10),
    ]))

    # The session number: 0 in the first run, 1 in the second (the library counts
    # per process).
    bd_seq = 0 if args.phase == "first" else 1
    cycler = itertools.cycle(range(256))
    for _ in range(bd_seq):
        next(cycler)
    spb.EdgeNode._EdgeNode__bd_seq_cycler = cycler

    def publish(message_type, payload, device=None):
        topic = spb.Topic(message_type=message_type, group_id=args.group, edge_node_id=node_id, device_id=device)
        client.publish(spb.Message(topic=topic, payload=payload, qos=spb.QoS.AT_MOST_ONCE, retain=False))

    def data(seq, alias, datatype, value, timestamp=None, historical=False, device=None):
        metric = spb.Metric(timestamp=timestamp or now(), name=None, datatype=datatype, value=value,
                            alias=alias, is_historical=historical)
        if device is None:
            publish(spb.MessageType.NDATA, spb.NData(timestamp=now(), seq=seq, metrics=(metric,)))
        else:
            publish(spb.MessageType.DDATA, spb.DData(timestamp=now(), seq=seq, metrics=(metric,)), device)

    # Connect (births) only once the host is there: a node with a primary host waits.
    probe = spb.Client(username=args.user, password=args.password)
    probe.subscribe(spb.Topic(message_type=spb.MessageType.STATE, sparkplug_host_id=args.host_id), spb.QoS.AT_LEAST_ONCE, on_state)
    probe.connect("127.0.0.1", port=int(args.port), blocking=False)
    if not host_online.wait(TIMEOUT):
        sys.exit("the host's STATE never said online")
    probe.disconnect()
    say("host online")

    node.connect("127.0.0.1", port=int(args.port), blocking=False)
    wait_connected(node)
    # The births took 0 and 1 of the numbers the library restarts on connecting.
    seq = node._EdgeNode__seq_cycler
    say(f"born bdSeq {bd_seq}")

    if args.phase == "first":
        data(next(seq), 1, spb.DataType.DOUBLE, 22.5)
        data(next(seq), 10, spb.DataType.FLOAT, 1013.25, device="gauge")
        data(next(seq), 1, spb.DataType.DOUBLE, 18.0, timestamp=now() - 3_600_000, historical=True)
        next(seq)  # lost on the way
        data(next(seq), 1, spb.DataType.DOUBLE, 23.5)
        say("gap")
        if not rebirth.wait(TIMEOUT):
            sys.exit("no Rebirth command came")
        # Born again: seq from 0, the same session (bdSeq).
        node._EdgeNode__seq_cycler = seq = itertools.cycle(range(256))
        session = spb.Metric(timestamp=now(), name="bdSeq", datatype=spb.DataType.INT64, value=bd_seq)
        publish(spb.MessageType.NBIRTH,
                spb.NBirth(timestamp=now(), seq=next(seq), metrics=(*node.metrics.values(), session)))
        publish(spb.MessageType.DBIRTH,
                spb.DBirth(timestamp=now(), seq=next(seq), metrics=tuple(node.devices["gauge"].metrics.values())),
                "gauge")
        data(next(seq), 1, spb.DataType.DOUBLE, 24.5)
    else:
        old = spb.Metric(timestamp=now(), name="bdSeq", datatype=spb.DataType.INT64, value=0)
        publish(spb.MessageType.NDEATH, spb.NDeath(timestamp=now(), bd_seq_metric=old))
        data(next(seq), 1, spb.DataType.DOUBLE, 25.5)
    say("done")
    while True:
        time.sleep(3600)


def wait_connected(node):
    deadline = time.monotonic() + TIMEOUT
    while not node._connected:
        if time.monotonic() > deadline:
            sys.exit("the edge node did not connect")
        time.sleep(0.01)


if __name__ == "__main__":
    main()
