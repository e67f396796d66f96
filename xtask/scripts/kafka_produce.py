"""`cargo xtask bench`'s Kafka producer: COUNT records of SIZE bytes to TOPIC's 4 partitions,
handed over in batches of 1,000 (as `weir bench publish --batch 1000` sends them), through
confluent-kafka's produce_batch with acks=all and idempotence, librdkafka's batching left at
its defaults (linger.ms 5, batches of up to 10,000 records or 1 MB); delivery is reported
for failures only. The 1,000 messages are built once and handed over again, as `weir bench
publish` reuses its payloads. Timed from the first batch to the end of flush(). Prints
"throughput: N records/s".

Usage: kafka_produce.py BOOTSTRAP TOPIC COUNT SIZE
"""

import os
import sys
import time

from confluent_kafka import Producer

bootstrap, topic, count, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
producer = Producer({
    "bootstrap.servers": bootstrap,
    "enable.idempotence": True,
    "acks": "all",
    "queue.buffering.max.messages": 1000000,
    "queue.buffering.max.kbytes": 1048576,
    "delivery.report.only.error": True,
})
values = [os.urandom(size) for _ in range(1000)]
failed = 0


def report(err, _msg):
    global failed
    if err is not None:
        failed += 1


def fresh(n):
    return [{"value": v} for v in values[:n]]


batch = fresh(1000)
started = time.perf_counter()
sent = 0
while sent < count:
    n = min(1000, count - sent)
    messages = batch if n == 1000 else fresh(n)
    partition = (sent // 1000) % 4
    while messages:
        try:
            producer.produce_batch(topic, messages, partition=partition, on_delivery=report)
        except BufferError:
            pass
        # What the local queue had no room for is marked "_error": send those again once it
        # drains, and stop reusing the marked messages.
        left = [{"value": m["value"]} for m in messages if "_error" in m]
        if messages is batch and left:
            batch = fresh(1000)
        messages = left
        if messages:
            producer.poll(0.01)
    sent += n
    producer.poll(0)
left = producer.flush(300)
elapsed = time.perf_counter() - started
if left or failed:
    sys.exit(f"{left} records not delivered, {failed} failed")
print(f"{count} records of {size} B in {elapsed:.2f} s, throughput: {count / elapsed:.0f} records/s")
