"""A consumer group of two over librdkafka (confluent-kafka): consumers A and B share TOPIC
(rebalancing as B joins and A leaves), committing synchronously after each record; then C,
a new member of the same group, resumes from the committed offsets. Prints one JSON line.

Usage: group.py BOOTSTRAP TOPIC PARTITIONS TOTAL

BOOTSTRAP may be "FOR_A_AND_C|FOR_B": on a cluster, A and B bootstrap from different nodes
and must still form one group.
"""

import json
import sys
import threading
import time

from confluent_kafka import Consumer, Producer, TopicPartition

bootstrap, topic, partitions, total = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
bootstrap_b = bootstrap.split("|")[-1]
bootstrap = bootstrap.split("|")[0]
seen = {}  # (partition, offset) -> [consumer names]
assignments = {"A": [], "B": [], "C": []}
lock = threading.Lock()
b_done = threading.Event()


def consumer(name):
    c = Consumer({
        "bootstrap.servers": bootstrap_b if name == "B" else bootstrap,
        "group.id": "kgroup",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 300,
    })

    def on_assign(_, parts):
        with lock:
            assignments[name].append(sorted(p.partition for p in parts))

    c.subscribe([topic], on_assign=on_assign)
    return c


def consume(c, name, until):
    n = 0
    while not until():
        m = c.poll(0.2)
        if m is None or m.error():
            continue
        with lock:
            seen.setdefault((m.partition(), m.offset()), []).append(name)
        c.commit(message=m, asynchronous=False)
        n += 1
        time.sleep(0.002)  # slow enough that B joins while A is still busy
    return n


producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
for i in range(total):
    producer.produce(topic, key=f"k{i}".encode(), value=f"g-{i}".encode())
assert producer.flush(60) == 0

a = consumer("A")
counts = {}
started = time.time()


def a_done():
    # A goes on until B has joined and been given partitions (so the split is seen, however
    # fast A is) and a third of the records are read; a minute at most.
    with lock:
        b_assigned = any(assignments["B"])
    return (b_assigned and len(seen) >= total // 3) or time.time() - started > 60


t_a = threading.Thread(target=lambda: counts.__setitem__("A", consume(a, "A", a_done)))
t_a.start()
time.sleep(1.0)
b = consumer("B")
def b_done():
    # B goes on until every record is read and A's leaving gave it every partition.
    with lock:
        b_all = bool(assignments["B"]) and len(assignments["B"][-1]) == partitions
    return (len(seen) >= total and b_all) or time.time() - started > 90


t_b = threading.Thread(target=lambda: counts.__setitem__("B", consume(b, "B", b_done)))
t_b.start()
t_a.join()
a.close()  # leaves the group: B takes every partition
t_b.join()
b.close()

# C resumes from the committed offsets: nothing it reads may be one A or B committed.
c = consumer("C")
extra = 50
for i in range(extra):
    producer.produce(topic, key=f"x{i}".encode(), value=f"x-{i}".encode())
assert producer.flush(60) == 0
c_values = []
deadline = time.time() + 30
while len(c_values) < extra and time.time() < deadline:
    m = c.poll(0.2)
    if m is None or m.error():
        continue
    c_values.append(m.value().decode())
    c.commit(message=m, asynchronous=False)
committed = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
c.close()

print(json.dumps({
    "distinct": len(seen),
    "assignments": assignments,
    "counts": counts,
    "c_values": c_values,
    "committed": {tp.partition: tp.offset for tp in committed},
}))
