"""Reads one partition of an upstream topic with an independent Kafka client
(confluent-kafka / librdkafka, check.crcs=true) and prints every record as one JSON
line: offset, key and value as hex (null when absent), timestamp, headers.

Used by weir's shipping tests (tests/ship*.rs) as the oracle for what reached the
broker. Reads from the beginning until the partition's end (EOF, from the Fetch high
watermark) once at least --expect records were seen, or until --timeout seconds pass.

usage: kafka_read_upstream.py BOOTSTRAP TOPIC PARTITION --expect N [--timeout S]
                              [--config KEY=VALUE ...]
--config adds librdkafka settings (security.protocol, ssl.*, sasl.*) for brokers
behind TLS or SASL.
"""

import argparse
import json
import sys
import time

from confluent_kafka import Consumer, KafkaError, TopicPartition


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("bootstrap")
    parser.add_argument("topic")
    parser.add_argument("partition", type=int)
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--config", action="append", default=[])
    args = parser.parse_args()
    extra = dict(setting.split("=", 1) for setting in args.config)
    consumer = Consumer(
        extra
        | {
            "bootstrap.servers": args.bootstrap,
            "group.id": "weir-test-reader",
            "enable.auto.commit": False,
            "check.crcs": True,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 50,
        }
    )
    consumer.assign([TopicPartition(args.topic, args.partition, 0)])
    deadline = time.monotonic() + args.timeout
    seen = 0
    at_end = False
    out = sys.stdout
    while time.monotonic() < deadline:
        message = consumer.poll(0.2)
        if message is None:
            if at_end and seen >= args.expect:
                break
            continue
        if message.error():
            if message.error().code() == KafkaError._PARTITION_EOF:
                at_end = True
                if seen >= args.expect:
                    break
                continue
            print(f"consumer error: {message.error()}", file=sys.stderr)
            return 2
        at_end = False
        key = message.key()
        value = message.value()
        headers = message.headers() or []
        out.write(
            json.dumps(
                {
                    "offset": message.offset(),
                    "key": None if key is None else key.hex(),
                    "value": None if value is None else value.hex(),
                    "timestamp": message.timestamp()[1],
                    "headers": [[name, None if data is None else data.hex()] for name, data in headers],
                }
            )
            + "\n"
        )
        seen += 1
    consumer.close()
    out.flush()
    if seen < args.expect:
        print(f"timed out: {seen} of {args.expect} records", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
