"""Kafka clients against weir's Kafka API with TLS, mTLS and SASL, for
tests/kafka_api_secure.rs. SECURITY is a JSON object of client settings merged into
the client's config (confluent-kafka's names, or kafka-python's keyword arguments).

usage:
  kafka_api_secure.py confluent BOOTSTRAP TOPIC PARTITIONS ENDS_FILE SECURITY
  kafka_api_secure.py kafka-python BOOTSTRAP TOPIC PARTITIONS ENDS_FILE SECURITY
      assign every partition from the beginning (CRCs checked), print every record
      (one JSON line, as kafka_api_read.py) until each partition reached its end in
      ENDS_FILE; exit 1 on any error or after 120 s.
  kafka_api_secure.py group BOOTSTRAP TOPIC GROUP ENDS_FILE SECURITY
      confluent-kafka subscribe()s in GROUP, commits every record synchronously and
      prints it, until every partition reached its end in ENDS_FILE.
  kafka_api_secure.py refused BOOTSTRAP TOPIC SECURITY
      confluent-kafka tries to read partition 0 of TOPIC for up to 30 s: prints
      {"error": first error seen, "records": records read}.
  kafka_api_secure.py metadata BOOTSTRAP TOPIC SECURITY
      confluent-kafka's list_topics(): {"all": {topic: error or null}, "asked":
      error of TOPIC asked for by name or null}.
  kafka_api_secure.py kafka-python-refused BOOTSTRAP TOPIC SECURITY
      kafka-python tries to connect and read partition 0: prints {"error": what it
      raised, "log": its warnings and errors}.
"""
import json
import sys
import time

from kafka_api_read import DEADLINE_S, ends_reached, line


def confluent(bootstrap, topic, partitions, ends_file, security):
    from confluent_kafka import Consumer, TopicPartition, OFFSET_BEGINNING
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": "weir-secure-assign",
        "enable.auto.commit": False,
        "check.crcs": True,
        "fetch.wait.max.ms": 200,
        **security,
    })
    consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING) for partition in range(partitions)])
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


def kafka_python(bootstrap, topic, partitions, ends_file, security):
    from kafka import KafkaConsumer, TopicPartition
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        check_crcs=True,
        fetch_max_wait_ms=200,
        **security,
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


def group(bootstrap, topic, group_id, ends_file, security):
    from confluent_kafka import Consumer
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "check.crcs": True,
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500,
        "fetch.wait.max.ms": 200,
        **security,
    })
    consumer.subscribe([topic])
    positions = {}
    deadline = time.monotonic() + DEADLINE_S
    while not ends_reached(ends_file, positions):
        if time.monotonic() > deadline:
            sys.exit(f"group: ends not reached; positions {positions}")
        message = consumer.poll(0.2)
        if message is None:
            continue
        if message.error():
            sys.exit(f"group: {message.error()}")
        consumer.commit(message=message, asynchronous=False)
        _, timestamp = message.timestamp()
        line(message.partition(), message.offset(), timestamp, message.key(), message.value(), message.headers())
        positions[message.partition()] = message.offset() + 1
    consumer.close()


def refused(bootstrap, topic, security):
    from confluent_kafka import Consumer, TopicPartition, OFFSET_BEGINNING
    errors = []
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": "weir-secure-refused",
        "enable.auto.commit": False,
        "error_cb": lambda error: errors.append(str(error)),
        **security,
    })
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    records = 0
    deadline = time.monotonic() + 30
    while not errors and time.monotonic() < deadline:
        message = consumer.poll(0.2)
        if message is None:
            continue
        if message.error():
            errors.append(f"{message.error().name()}: {message.error()}")
        else:
            records += 1
    print(json.dumps({"error": errors[0] if errors else None, "records": records}), flush=True)
    consumer.close()


def metadata(bootstrap, topic, security):
    from confluent_kafka import Consumer
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "weir-secure-metadata", **security})
    every = consumer.list_topics(timeout=20)
    asked = consumer.list_topics(topic, timeout=20)
    print(json.dumps({
        "all": {name: (entry.error.name() if entry.error else None) for name, entry in every.topics.items()},
        "asked": asked.topics[topic].error.name() if asked.topics[topic].error else None,
    }), flush=True)
    consumer.close()


def kafka_python_refused(bootstrap, topic, security):
    import logging
    from kafka import KafkaConsumer, TopicPartition
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logging.getLogger("kafka").addHandler(Keep(level=logging.WARNING))
    logging.getLogger("kafka").setLevel(logging.WARNING)
    try:
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, request_timeout_ms=10000, **security)
        consumer.assign([TopicPartition(topic, 0)])
        consumer.seek_to_beginning()
        records = consumer.poll(timeout_ms=5000)
        count = sum(len(batch) for batch in records.values())
        print(json.dumps({"error": None, "records": count, "log": seen}), flush=True)
    except Exception as error:  # the refusal is what is tested
        print(json.dumps({"error": f"{type(error).__name__}: {error}", "log": seen}), flush=True)


def main():
    mode = sys.argv[1]
    if mode in ("confluent", "kafka-python"):
        read = confluent if mode == "confluent" else kafka_python
        read(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], json.loads(sys.argv[6]))
    elif mode == "group":
        group(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], json.loads(sys.argv[6]))
    elif mode == "refused":
        refused(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))
    elif mode == "metadata":
        metadata(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))
    elif mode == "kafka-python-refused":
        kafka_python_refused(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
