"""The upstream ceiling of `weir-bench ship`, and its independent reader.

`produce`: a confluent-kafka (librdkafka) idempotent producer, acks=all, TCP_NODELAY (as weir), sends one
partition's share of the bench's records to the broker, the same records weir's log
holds (bench/src/records.rs: key "{a}:{s}", value byte i = (s*31 + a + i) % 251,
timestamp 1_700_000_000_000 + s ms, headers appender/seq/nothing), appender by
appender in chunks of --records-per-append, the way the bench appended them. While it
runs it prints `progress RECORDS` lines (records the broker acknowledged so far); its
last line is one JSON object: records, payload_bytes, elapsed_s (first produce() to the
end of flush()), cpu_s (the process's CPU time, librdkafka's threads included, over
the same span), batch_bytes_avg and batch_records_avg (librdkafka's statistics of the
batches it sent, over a recent window), rtt_us_avg and queue_us_avg (its Produce round
trip and the time records waited in its queue, same window), window_records (acknowledged records per --window-ms window).

`sample`: reads --count records from each of --offsets with check.crcs=true and prints
every one as a JSON line (offset, key and value as hex, timestamp, headers).

usage: ship_ceiling.py produce BOOTSTRAP TOPIC PARTITION --record-bytes B
           --first-appender A --appenders N --records-per-appender R
           --records-per-append C --batch-bytes BYTES [--window-ms MS]
       ship_ceiling.py sample BOOTSTRAP TOPIC PARTITION --offsets O1,O2,.. --count K
"""

import argparse
import json
import sys
import time

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

TIMESTAMP_BASE_MS = 1_700_000_000_000
VALUE_PERIOD = 251
VALUE_SEQUENCE_FACTOR = 31
# How many produce() calls between two looks at the clock and the queue.
CHECK_EVERY_RECORDS = 256


def produce(args: argparse.Namespace) -> int:
    pattern = bytes(j % VALUE_PERIOD for j in range(args.record_bytes + VALUE_PERIOD))
    errors = []

    def on_error(error):
        errors.append(str(error))

    # librdkafka's own statistics: the mean size of the batches it sent.
    batch_stats = {}

    def on_stats(text):
        stats = json.loads(text)
        topic = stats.get("topics", {}).get(args.topic)
        if topic and topic.get("batchsize", {}).get("cnt", 0) > 0:
            batch_stats["batch_bytes_avg"] = topic["batchsize"]["avg"]
            batch_stats["batch_records_avg"] = topic["batchcnt"]["avg"]
        for broker in stats.get("brokers", {}).values():
            if broker.get("nodeid", -1) >= 0 and broker.get("rtt", {}).get("cnt", 0) > 0:
                # Produce round trip and time in librdkafka's queue, microseconds.
                batch_stats["rtt_us_avg"] = broker["rtt"]["avg"]
                batch_stats["queue_us_avg"] = broker["int_latency"]["avg"]

    producer = Producer(
        {
            "bootstrap.servers": args.bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "max.in.flight.requests.per.connection": 5,
            "linger.ms": 5,
            "batch.size": args.batch_bytes,
            "message.max.bytes": max(args.batch_bytes + 4096, 1_000_000),
            "compression.type": "none",
            # TCP_NODELAY, as weir's connections have it.
            "socket.nagle.disable": True,
            "queue.buffering.max.kbytes": 1 << 20,
            "queue.buffering.max.messages": 1_000_000,
            "error_cb": on_error,
            "stats_cb": on_stats,
            "statistics.interval.ms": 1000,
        }
    )
    # Connect and learn the partition's leader before the clock starts.
    producer.list_topics(args.topic, timeout=30)
    window_s = args.window_ms / 1000.0
    window_records = []
    window_started = None
    window_base = 0
    produced = 0
    payload_bytes = 0
    record_bytes = args.record_bytes
    started = time.monotonic()
    cpu_started = time.process_time()
    window_started = started
    last_progress = started
    for chunk_start in range(0, args.records_per_appender, args.records_per_append):
        chunk_end = min(chunk_start + args.records_per_append, args.records_per_appender)
        for appender in range(args.first_appender, args.first_appender + args.appenders):
            appender_text = str(appender).encode()
            for sequence in range(chunk_start, chunk_end):
                start = ((sequence % VALUE_PERIOD) * VALUE_SEQUENCE_FACTOR + appender % VALUE_PERIOD) % VALUE_PERIOD
                sequence_text = str(sequence).encode()
                key = appender_text + b":" + sequence_text
                value = pattern[start : start + record_bytes]
                while True:
                    try:
                        producer.produce(
                            args.topic,
                            value=value,
                            key=key,
                            partition=args.partition,
                            timestamp=TIMESTAMP_BASE_MS + sequence,
                            headers=[("appender", appender_text), ("seq", sequence_text), ("nothing", None)],
                        )
                        break
                    except BufferError:
                        producer.poll(0.005)
                produced += 1
                payload_bytes += len(key) + record_bytes + 8 + len(appender_text) + 3 + len(sequence_text) + 7
                if produced % CHECK_EVERY_RECORDS == 0:
                    producer.poll(0)
                    now = time.monotonic()
                    if now - window_started >= window_s:
                        acknowledged = produced - len(producer)
                        window_records.append(acknowledged - window_base)
                        window_base = acknowledged
                        window_started = now
                    if now - last_progress >= 0.2:
                        print(f"progress {produced - len(producer)}", flush=True)
                        last_progress = now
                    if errors:
                        break
    while len(producer) > 0 and not errors:
        producer.flush(window_s)
        now = time.monotonic()
        acknowledged = produced - len(producer)
        window_records.append(acknowledged - window_base)
        window_base = acknowledged
        window_started = now
        print(f"progress {acknowledged}", flush=True)
    elapsed = time.monotonic() - started
    cpu = time.process_time() - cpu_started
    producer.poll(1.1)  # one more statistics report, covering the end
    if errors:
        print(f"producer error: {errors[0]}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "records": produced,
                "payload_bytes": payload_bytes,
                "elapsed_s": elapsed,
                "cpu_s": cpu,
                "window_records": window_records,
                "batch_bytes_avg": batch_stats.get("batch_bytes_avg", 0),
                "batch_records_avg": batch_stats.get("batch_records_avg", 0),
                "rtt_us_avg": batch_stats.get("rtt_us_avg", 0),
                "queue_us_avg": batch_stats.get("queue_us_avg", 0),
            }
        ),
        flush=True,
    )
    return 0


def sample(args: argparse.Namespace) -> int:
    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": "weir-bench-sample",
            "enable.auto.commit": False,
            "check.crcs": True,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 50,
            "fetch.max.bytes": 4 << 20,
            "max.partition.fetch.bytes": 4 << 20,
        }
    )
    out = sys.stdout
    deadline = time.monotonic() + args.timeout
    for offset in [int(text) for text in args.offsets.split(",") if text]:
        consumer.assign([TopicPartition(args.topic, args.partition, offset)])
        seen = 0
        while seen < args.count:
            if time.monotonic() > deadline:
                print(f"timed out at offset {offset} after {seen} records", file=sys.stderr)
                return 3
            message = consumer.poll(0.2)
            if message is None:
                continue
            if message.error():
                if message.error().code() == KafkaError._PARTITION_EOF:
                    break
                raise KafkaException(message.error())
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
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    modes = parser.add_subparsers(dest="mode", required=True)
    for name in ("produce", "sample"):
        mode = modes.add_parser(name)
        mode.add_argument("bootstrap")
        mode.add_argument("topic")
        mode.add_argument("partition", type=int)
    producing = modes.choices["produce"]
    producing.add_argument("--record-bytes", type=int, required=True)
    producing.add_argument("--first-appender", type=int, required=True)
    producing.add_argument("--appenders", type=int, required=True)
    producing.add_argument("--records-per-appender", type=int, required=True)
    producing.add_argument("--records-per-append", type=int, required=True)
    producing.add_argument("--batch-bytes", type=int, required=True)
    producing.add_argument("--window-ms", type=int, default=100)
    sampling = modes.choices["sample"]
    sampling.add_argument("--offsets", required=True)
    sampling.add_argument("--count", type=int, required=True)
    sampling.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    return produce(args) if args.mode == "produce" else sample(args)


if __name__ == "__main__":
    sys.exit(main())
