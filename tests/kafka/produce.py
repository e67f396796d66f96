"""Produces COUNT records to TOPIC through librdkafka (confluent-kafka), idempotently unless
told otherwise, and prints one JSON line: how many were acknowledged and every error.

Each record's value is "<prefix>-<i>", its key "k<i % 17>", with a header "n" = i and the
timestamp 1700000000000 + i. Every acknowledged record is appended to --acked as
"partition offset value" the moment its delivery report arrives, so a reader knows what was
acknowledged even if this process is cut short.

Usage: produce.py BOOTSTRAP TOPIC COUNT [--prefix P] [--compression C] [--acked FILE]
       [--set key=value ...] [--pace SECONDS_PER_1000]
"""

import argparse
import json
import sys
import time

from confluent_kafka import Producer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("bootstrap")
    p.add_argument("topic")
    p.add_argument("count", type=int)
    p.add_argument("--prefix", default="r")
    p.add_argument("--compression", default="none")
    p.add_argument("--acked")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--pace", type=float, default=0.0)
    a = p.parse_args()
    config = {
        "bootstrap.servers": a.bootstrap,
        "enable.idempotence": True,
        "compression.type": a.compression,
        "linger.ms": 5,
        "message.timeout.ms": 120000,
    }
    for kv in a.set:
        k, v = kv.split("=", 1)
        config[k] = v
    producer = Producer(config)
    acked_file = open(a.acked, "a", buffering=1) if a.acked else None
    acked = 0
    errors = []

    def report(err, msg):
        nonlocal acked
        if err is not None:
            errors.append(str(err))
            return
        acked += 1
        if acked_file:
            acked_file.write(f"{msg.partition()} {msg.offset()} {msg.value().decode()}\n")

    for i in range(a.count):
        while True:
            try:
                producer.produce(
                    a.topic,
                    key=f"k{i % 17}".encode(),
                    value=f"{a.prefix}-{i}".encode(),
                    headers=[("n", str(i).encode())],
                    timestamp=1700000000000 + i,
                    on_delivery=report,
                )
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
        if a.pace and i % 1000 == 999:
            time.sleep(a.pace)
    left = producer.flush(120)
    print(json.dumps({"acked": acked, "unflushed": left, "errors": errors[:20]}))
    sys.stdout.flush()


main()
