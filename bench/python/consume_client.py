"""The Kafka client of `weir-bench consume` (bench/src/consume.rs): confluent-kafka
(librdkafka), the same client and settings against weir and against the test broker.

usage:
  consume_client.py tail BOOTSTRAP TOPIC PARTITIONS KEY OUT_FILE STOP_FILE
      assigns every partition at its end (its high watermark); after a second of
      polling prints "ready", then polls until STOP_FILE exists. Each record whose key is KEY (hex;
      "-" for none) is written to OUT_FILE as "partition offset receive_ns"
      (time.time_ns() when poll returned it). Finally prints {"records": n} (all
      records read).
  consume_client.py read BOOTSTRAP TOPIC PARTITIONS RECORDS
      assigns every partition from the beginning and reads until RECORDS records;
      prints {"records", "value_bytes", "seconds"} (seconds from the assign to the
      last record). Exits 1 after 300 s without them.
  consume_client.py copy FROM TO TOPIC PARTITIONS RECORDS
      reads RECORDS records from FROM (every partition from the beginning) and
      produces each to the same partition of TO with its key, value, headers and
      timestamp (acks=all); prints {"copied": n}.
"""
import json
import os
import sys
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

DEADLINE_S = 300
# One setting set for every broker: only the bootstrap address differs.
CONSUMER = {
    "group.id": "weir-bench-consume",
    "enable.auto.commit": False,
    "check.crcs": False,
    "fetch.wait.max.ms": 100,
    "fetch.min.bytes": 1,
    "enable.partition.eof": False,
}


def consumer(bootstrap, **extra):
    return Consumer(dict(CONSUMER, **{"bootstrap.servers": bootstrap}, **extra))


def tail(bootstrap, topic, partitions, key_hex, out_file, stop_file):
    key = None if key_hex == "-" else bytes.fromhex(key_hex)
    reader = consumer(bootstrap)
    # Each partition's end now (an OFFSET_END assignment has no position to wait for
    # until a record arrives).
    ends = [reader.get_watermark_offsets(TopicPartition(topic, partition), timeout=30)[1]
            for partition in range(partitions)]
    reader.assign([TopicPartition(topic, partition, end) for partition, end in enumerate(ends)])
    # The fetchers start while it polls.
    started = time.monotonic()
    while time.monotonic() - started < 1.0:
        message = reader.poll(0.05)
        if message is not None and message.error():
            sys.exit(f"tail: {message.error()}")
    print("ready", flush=True)
    records = 0
    lines = []
    while not os.path.exists(stop_file):
        message = reader.poll(0.05)
        if message is None:
            continue
        now_ns = time.time_ns()
        if message.error():
            sys.exit(f"tail: {message.error()}")
        records += 1
        if key is not None and message.key() == key:
            lines.append(f"{message.partition()} {message.offset()} {now_ns}\n")
    with open(out_file, "w") as out:
        out.writelines(lines)
    reader.close()
    print(json.dumps({"records": records}), flush=True)


def read(bootstrap, topic, partitions, records):
    reader = consumer(bootstrap)
    started = time.monotonic()
    reader.assign([TopicPartition(topic, partition, OFFSET_BEGINNING) for partition in range(partitions)])
    count = 0
    value_bytes = 0
    last = started
    while count < records:
        if time.monotonic() - started > DEADLINE_S:
            sys.exit(f"read: {count} of {records} records after {DEADLINE_S} s")
        for message in reader.consume(num_messages=10000, timeout=0.5):
            if message.error():
                sys.exit(f"read: {message.error()}")
            count += 1
            value_bytes += len(message.value() or b"")
        last = time.monotonic()
    reader.close()
    print(json.dumps({"records": count, "value_bytes": value_bytes, "seconds": last - started}))


def copy(source, target, topic, partitions, records):
    reader = consumer(source)
    reader.assign([TopicPartition(topic, partition, OFFSET_BEGINNING) for partition in range(partitions)])
    writer = Producer({"bootstrap.servers": target, "acks": "all", "linger.ms": 5, "batch.size": 1 << 20,
                       "enable.idempotence": False})
    failed = []

    def delivered(error, _message):
        if error is not None:
            failed.append(str(error))

    copied = 0
    started = time.monotonic()
    while copied < records:
        if time.monotonic() - started > DEADLINE_S:
            sys.exit(f"copy: {copied} of {records} records after {DEADLINE_S} s")
        for message in reader.consume(num_messages=10000, timeout=0.5):
            if message.error():
                sys.exit(f"copy: {message.error()}")
            _, timestamp = message.timestamp()
            while True:
                try:
                    writer.produce(topic, value=message.value(), key=message.key(), partition=message.partition(),
                                   headers=message.headers(), timestamp=timestamp, on_delivery=delivered)
                    break
                except BufferError:
                    writer.poll(0.1)
            copied += 1
        writer.poll(0)
    writer.flush(60)
    reader.close()
    if failed:
        sys.exit(f"copy: {len(failed)} records not delivered, the first: {failed[0]}")
    print(json.dumps({"copied": copied}))


def main():
    mode = sys.argv[1]
    if mode == "tail":
        tail(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6], sys.argv[7])
    elif mode == "read":
        read(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    elif mode == "copy":
        copy(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
