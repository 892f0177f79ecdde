"""Read weir's records three ways and print each as one JSON line, for tests/kafka_api.rs.

usage:
  kafka_api_read.py segments DATA_DIR TOPIC PARTITIONS
      every stored record, decoded from the segment files with kafka-python's own
      RecordBatch reader (CRC checked): the oracle.
  kafka_api_read.py confluent|kafka-python BOOTSTRAP TOPIC PARTITIONS ENDS_FILE
      a consumer that assigns every partition from the beginning (CRCs checked) and
      reads until ENDS_FILE exists ({"partition": end_offset, ...}) and every
      partition reached its end; exits 1 after 120 s without reaching it.
  kafka_api_read.py from-zero BOOTSTRAP TOPIC PARTITIONS ENDS_FILE
      a confluent-kafka consumer (auto.offset.reset = earliest) that assigns every
      partition at offset 0, which retention may have deleted, and reads like
      `confluent` (CRCs checked) until every partition reached its end in ENDS_FILE.
  kafka_api_read.py long-poll BOOTSTRAP TOPIC PARTITIONS WAIT_MS
      a confluent-kafka consumer with fetch.wait.max.ms = WAIT_MS at offset 0 of every
      partition of an empty topic: prints "parked" once it has polled 2 s with nothing
      read, then the first record it reads, and exits; exits 1 after 120 s without one.
  kafka_api_read.py produce BOOTSTRAP TOPIC
      tries to produce one record with confluent-kafka and prints the error it got.
  kafka_api_read.py offset-for-time BOOTSTRAP TOPIC PARTITION TIMESTAMP_MS
      confluent-kafka's offsets_for_times for one partition: prints the offset.
  kafka_api_read.py group-member BOOTSTRAP TOPIC GROUP STOP_FILE
      a confluent-kafka consumer that subscribe()s in GROUP, prints every record it
      reads and commits it synchronously before reading on; on STOP_FILE it closes
      (leaving the group) and exits.
  kafka_api_read.py commit-at BOOTSTRAP TOPIC GROUP OFFSETS_JSON STOP_FILE
      a confluent-kafka consumer that subscribe()s in GROUP, waits until it is
      assigned every partition named in OFFSETS_JSON ({"partition": offset, ...}),
      commits exactly those offsets synchronously, prints "committed", and stays in
      the group (polling, committing nothing more) until STOP_FILE exists.
  kafka_api_read.py committed BOOTSTRAP TOPIC GROUP PARTITIONS
      the group's committed offsets: {"partition": offset, ...} (-1001 when none).

A record line: {"partition", "offset", "timestamp", "key", "value", "headers"} with
bytes as hex (null for null) and headers as [[key, hex-or-null], ...] in order.
"""
import json
import os
import struct
import sys
import time

DEADLINE_S = 120


def hexed(value):
    return None if value is None else bytes(value).hex()


def line(partition, offset, timestamp, key, value, headers):
    print(json.dumps({
        "partition": partition,
        "offset": offset,
        "timestamp": timestamp,
        "key": hexed(key),
        "value": hexed(value),
        "headers": [[name, hexed(data)] for name, data in (headers or [])],
    }), flush=True)


def segments(data_dir, topic, partitions):
    from kafka.record.default_records import DefaultRecordBatch
    for partition in range(partitions):
        directory = os.path.join(data_dir, f"{topic}-{partition}")
        for name in sorted(n for n in os.listdir(directory) if n.endswith(".log")):
            data = open(os.path.join(directory, name), "rb").read()
            position = 0
            while position + 12 <= len(data):
                base_offset, length = struct.unpack(">qi", data[position:position + 12])
                if length == 0:
                    break
                batch = DefaultRecordBatch(bytearray(data[position:position + 12 + length]))
                if not batch.validate_crc():
                    sys.exit(f"{name}: byte {position}: bad CRC")
                for record in batch:
                    line(partition, record.offset, record.timestamp, record.key, record.value, record.headers)
                position += 12 + length


def ends_reached(ends_file, positions):
    if not os.path.exists(ends_file):
        return False
    ends = json.load(open(ends_file))
    return all(positions.get(int(partition), 0) >= end for partition, end in ends.items())


def confluent(bootstrap, topic, partitions, ends_file, start=None):
    from confluent_kafka import Consumer, TopicPartition, OFFSET_BEGINNING
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": "weir-test-assign",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "check.crcs": True,
        "fetch.wait.max.ms": 200,
    })
    offset = OFFSET_BEGINNING if start is None else start
    consumer.assign([TopicPartition(topic, partition, offset) for partition in range(partitions)])
    positions = {}
    deadline = time.monotonic() + DEADLINE_S
    while not ends_reached(ends_file, positions):
        if time.monotonic() > deadline:
            sys.exit(f"confluent: ends not reached; positions {positions}")
        message = consumer.poll(0.2)
        if message is None:
            continue
        if message.error():
            sys.exit(f"confluent: {message.error()}")
        _, timestamp = message.timestamp()
        line(message.partition(), message.offset(), timestamp, message.key(), message.value(), message.headers())
        positions[message.partition()] = message.offset() + 1
    consumer.close()


def kafka_python(bootstrap, topic, partitions, ends_file):
    from kafka import KafkaConsumer, TopicPartition
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        check_crcs=True,
        fetch_max_wait_ms=200,
    )
    assigned = [TopicPartition(topic, partition) for partition in range(partitions)]
    consumer.assign(assigned)
    consumer.seek_to_beginning(*assigned)
    positions = {}
    deadline = time.monotonic() + DEADLINE_S
    while not ends_reached(ends_file, positions):
        if time.monotonic() > deadline:
            sys.exit(f"kafka-python: ends not reached; positions {positions}")
        for records in consumer.poll(timeout_ms=200).values():
            for record in records:
                line(record.partition, record.offset, record.timestamp, record.key, record.value, record.headers)
                positions[record.partition] = record.offset + 1
    consumer.close()


def long_poll(bootstrap, topic, partitions, wait_ms):
    from confluent_kafka import Consumer, TopicPartition
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": "weir-test-long-poll",
        "enable.auto.commit": False,
        "check.crcs": True,
        "fetch.wait.max.ms": wait_ms,
    })
    consumer.assign([TopicPartition(topic, partition, 0) for partition in range(partitions)])
    deadline = time.monotonic() + DEADLINE_S
    # Polled empty for 2 s: the consumer's fetch is parked at the end by now.
    parked_at = time.monotonic() + 2
    parked = False
    while True:
        if time.monotonic() > deadline:
            sys.exit("long-poll: no record")
        message = consumer.poll(0.2)
        if message is None:
            if not parked and time.monotonic() > parked_at:
                print(json.dumps("parked"), flush=True)
                parked = True
            continue
        if message.error():
            sys.exit(f"long-poll: {message.error()}")
        if not parked:
            sys.exit("long-poll: a record arrived before the consumer parked")
        _, timestamp = message.timestamp()
        line(message.partition(), message.offset(), timestamp, message.key(), message.value(), message.headers())
        break
    consumer.close()


def produce(bootstrap, topic):
    from confluent_kafka import Producer
    errors = []
    producer = Producer({"bootstrap.servers": bootstrap, "message.timeout.ms": 10000, "retries": 0})
    producer.produce(topic, b"from a Kafka client", on_delivery=lambda error, _: errors.append(error))
    producer.flush(15)
    print(json.dumps({"error": str(errors[0]) if errors else None}))


def offset_for_time(bootstrap, topic, partition, timestamp_ms):
    from confluent_kafka import Consumer, TopicPartition
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "weir-test-times"})
    found = consumer.offsets_for_times([TopicPartition(topic, partition, timestamp_ms)], timeout=10)
    print(json.dumps({"offset": found[0].offset, "error": str(found[0].error) if found[0].error else None}))
    consumer.close()


def group_member(bootstrap, topic, group, stop_file):
    from confluent_kafka import Consumer
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "check.crcs": True,
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500,
        "fetch.wait.max.ms": 200,
    })
    consumer.subscribe([topic])
    deadline = time.monotonic() + DEADLINE_S
    while not os.path.exists(stop_file):
        if time.monotonic() > deadline:
            sys.exit("group-member: never told to stop")
        message = consumer.poll(0.2)
        if message is None:
            continue
        if message.error():
            sys.exit(f"group-member: {message.error()}")
        # Committed before it is reported, so a record is reported once at most.
        consumer.commit(message=message, asynchronous=False)
        _, timestamp = message.timestamp()
        line(message.partition(), message.offset(), timestamp, message.key(), message.value(), message.headers())
    consumer.close()


def commit_at(bootstrap, topic, group, offsets_json, stop_file):
    from confluent_kafka import Consumer, TopicPartition
    offsets = {int(partition): offset for partition, offset in json.loads(offsets_json).items()}
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500,
        "fetch.wait.max.ms": 200,
    })
    consumer.subscribe([topic])
    deadline = time.monotonic() + DEADLINE_S
    while not set(offsets) <= {entry.partition for entry in consumer.assignment()}:
        if time.monotonic() > deadline:
            sys.exit(f"commit-at: never assigned {sorted(offsets)}")
        message = consumer.poll(0.2)
        if message is not None and message.error():
            sys.exit(f"commit-at: {message.error()}")
    answered = consumer.commit(
        offsets=[TopicPartition(topic, partition, offset) for partition, offset in offsets.items()],
        asynchronous=False)
    failed = [entry for entry in answered if entry.error]
    if failed:
        sys.exit(f"commit-at: {failed}")
    print("committed", flush=True)
    while not os.path.exists(stop_file):
        if time.monotonic() > deadline:
            sys.exit("commit-at: never told to stop")
        message = consumer.poll(0.2)
        if message is not None and message.error():
            sys.exit(f"commit-at: {message.error()}")
    consumer.close()


def committed(bootstrap, topic, group, partitions):
    from confluent_kafka import Consumer, TopicPartition
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    found = consumer.committed([TopicPartition(topic, partition) for partition in range(partitions)], timeout=10)
    print(json.dumps({str(entry.partition): entry.offset for entry in found}))
    consumer.close()


def main():
    mode = sys.argv[1]
    if mode == "segments":
        segments(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif mode == "confluent":
        confluent(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    elif mode == "kafka-python":
        kafka_python(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    elif mode == "from-zero":
        confluent(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], start=0)
    elif mode == "long-poll":
        long_poll(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    elif mode == "produce":
        produce(sys.argv[2], sys.argv[3])
    elif mode == "offset-for-time":
        offset_for_time(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    elif mode == "group-member":
        group_member(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
    elif mode == "commit-at":
        commit_at(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6])
    elif mode == "committed":
        committed(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
