"""A group's coordinator, and a member that resumes it, over librdkafka (confluent-kafka).
Prints one JSON line.

Usage:
  resume.py coordinator BOOTSTRAP GROUP
      {"id": .., "port": ..}: the node coordinating GROUP, as the AdminClient finds it.
  resume.py resume BOOTSTRAP TOPIC GROUP N
      Produces N records "r-<i>", then reads TOPIC as a member of GROUP (committing each
      record) until N records are read or 60 s pass: {"values": [...]}.
"""

import json
import sys
import time

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

mode, bootstrap = sys.argv[1], sys.argv[2]
if mode == "coordinator":
    group = sys.argv[3]
    admin = AdminClient({"bootstrap.servers": bootstrap})
    described = admin.describe_consumer_groups([group])[group].result(timeout=30)
    print(json.dumps({"id": described.coordinator.id, "port": described.coordinator.port}))
    sys.exit(0)

topic, group, n = sys.argv[3], sys.argv[4], int(sys.argv[5])
producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
for i in range(n):
    producer.produce(topic, key=f"r{i}".encode(), value=f"r-{i}".encode())
assert producer.flush(60) == 0
c = Consumer({
    "bootstrap.servers": bootstrap,
    "group.id": group,
    "auto.offset.reset": "earliest",
    "enable.auto.commit": False,
    "session.timeout.ms": 6000,
})
c.subscribe([topic])
values = []
deadline = time.time() + 60
while len(values) < n and time.time() < deadline:
    m = c.poll(0.2)
    if m is None or m.error():
        continue
    values.append(m.value().decode())
    c.commit(message=m, asynchronous=False)
c.close()
print(json.dumps({"values": values}))
