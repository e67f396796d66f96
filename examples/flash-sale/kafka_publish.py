"""The flash-sale demo's Kafka producer (`flash-sale demo --kafka PYTHON`): a service that
speaks Kafka, not weir, publishing through confluent-kafka (librdkafka).

Reads JSON lines on stdin, one record each: {"topic", "partition", "key", "id", "value"}.
Each is produced as it is read (a gateway forwarding clicks), idempotent with acks=all, to
the partition named, with weir's message id in the `weir-id` header (docs/kafka.md). Prints
one line per record as its delivery report arrives: "N PARTITION OFFSET", or "N error
TEXT" if it was not stored (N counts input lines from 0). Exits non-zero if any failed.

Usage: kafka_publish.py BOOTSTRAP < records.jsonl
"""

import json
import sys

from confluent_kafka import Producer

producer = Producer({
    "bootstrap.servers": sys.argv[1],
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 5,
    "queue.buffering.max.messages": 1000000,
    "message.timeout.ms": 120000,
})
failed = 0
out = sys.stdout


def report(n):
    def delivered(err, msg):
        global failed
        if err is not None:
            failed += 1
            out.write(f"{n} error {err}\n")
        else:
            out.write(f"{n} {msg.partition()} {msg.offset()}\n")
    return delivered


for n, line in enumerate(sys.stdin):
    r = json.loads(line)
    while True:
        try:
            producer.produce(
                r["topic"],
                value=r["value"].encode(),
                key=r["key"].encode(),
                partition=r["partition"],
                headers=[("weir-id", r["id"].encode())],
                on_delivery=report(n),
            )
            break
        except BufferError:
            producer.poll(0.05)
    if n % 1000 == 999:
        producer.poll(0)
        out.flush()
left = producer.flush(180)
out.flush()
if left or failed:
    sys.exit(f"kafka_publish.py: {left} records undelivered after 180 s, {failed} failed")
