"""weir-bench's segments, decoded by an independent Kafka implementation.

`weir-bench log --data-dir DIR` keeps the weir phase's partitions in DIR/bench-<p>.
Its records are a pure function of (appender, sequence), so every byte can be checked
without a manifest: kafka-python walks every batch of every segment, checks its CRC,
magic and offsets, and compares every record with the rule; every acknowledged append
must be there exactly once, in each appender's order. `weir inspect` must agree.

Needs WEIR_BENCH_BIN (target/release/weir-bench) and WEIR_BIN (target/release/weir).
"""

import json
import os
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
from kafka.record.default_records import DefaultRecordBatch

REQUIRED_KEYS = {
    "mb_per_s",
    "raw_mb_per_s",
    "ratio",
    "p50_us",
    "p99_us",
    "p999_us",
    "raw_fsync_p50_us",
    "raw_fsync_p99_us",
    "plain_mb_per_s",
    "ratio_plain",
    "plain_fsync_p99_us",
    "plain_write_fsync_p99_us",
    "plain_writes",
    "flush_p50_us",
    "flush_p99_us",
    "sync_p50_us",
    "sync_p99_us",
    "batch_bytes_avg",
    "records",
    "cores",
    "partitions",
    "appenders",
    "seconds",
}
TIMESTAMP_BASE_MS = 1_700_000_000_000
VALUE_PERIOD = 251
BATCH_PREFIX_BYTES = 12  # baseOffset (8) + batchLength (4)
RUN_TIMEOUT_S = 300


def binary(variable):
    path = os.environ.get(variable)
    if not path:
        pytest.fail(f"{variable} is not set: point it at the release build (e.g. target/release/...)")
    if not os.access(path, os.X_OK):
        pytest.fail(f"{variable}={path} is not an executable file")
    return path


def expected_value(appender, sequence, record_bytes):
    """The rule, literally: value byte i = (s * 31 + a + i) % 251."""
    return bytes((sequence * 31 + appender + i) % VALUE_PERIOD for i in range(record_bytes))


class ValueRule:
    """The rule through one shared pattern (a window of `j % 251`): fast enough for
    every record, and checked against the literal rule before use."""

    def __init__(self, record_bytes):
        self.record_bytes = record_bytes
        self.pattern = bytes(j % VALUE_PERIOD for j in range(record_bytes + VALUE_PERIOD))
        for appender, sequence in [(0, 0), (1, 250), (7, 12345), (250, 251)]:
            assert self.value(appender, sequence) == expected_value(appender, sequence, record_bytes)

    def value(self, appender, sequence):
        start = (sequence * 31 + appender) % VALUE_PERIOD
        return self.pattern[start:start + self.record_bytes]


def run_bench(data_dir, *extra):
    command = [binary("WEIR_BENCH_BIN"), "log", "--data-dir", str(data_dir), "--seconds", "1", "--appenders", "8"]
    completed = subprocess.run(
        command + list(extra), capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    assert completed.returncode == 0, f"{command} exited {completed.returncode}:\n{completed.stderr}"
    lines = completed.stdout.strip().splitlines()
    assert lines, f"{command} printed nothing"
    try:
        summary = json.loads(lines[-1])
    except json.JSONDecodeError as error:
        pytest.fail(f"the last stdout line is not JSON ({error}): {lines[-1]!r}")
    missing = REQUIRED_KEYS - summary.keys()
    assert not missing, f"summary lacks {sorted(missing)}: {summary}"
    return summary


def walk_segment(path, next_offset):
    """Yields (offset, record) for every record of one segment file, checking every
    batch; returns after the last batch. The file must be exact: the bench closes its
    logs cleanly, and a clean close trims preallocation."""
    data = path.read_bytes()
    position = 0
    first = True
    while position < len(data):
        prefix = data[position:position + BATCH_PREFIX_BYTES]
        if len(prefix) == BATCH_PREFIX_BYTES and not any(prefix):
            rest = data[position:]
            assert not any(rest), f"{path}: non-zero bytes after the zero header at byte {position}"
            pytest.fail(
                f"{path}: {len(rest)} bytes of zero preallocation after byte {position}, "
                "but the bench closed the log cleanly, so the file should be exact"
            )
        assert len(prefix) == BATCH_PREFIX_BYTES, f"{path}: torn batch header at byte {position}"
        base_offset = int.from_bytes(prefix[0:8], "big", signed=True)
        batch_length = int.from_bytes(prefix[8:12], "big", signed=True)
        end = position + BATCH_PREFIX_BYTES + batch_length
        assert batch_length > 0 and end <= len(data), f"{path}: batch at byte {position} runs past the file end"
        batch = DefaultRecordBatch(data[position:end])
        assert batch.validate_crc(), f"{path}: CRC mismatch in the batch at byte {position}"
        assert batch.magic == 2, f"{path}: magic {batch.magic} at byte {position}"
        assert base_offset == next_offset, f"{path}: batch at byte {position} has base offset {base_offset}, expected {next_offset}"
        if first:
            assert path.name == f"{base_offset:020d}.log", f"{path}: named for another base offset than {base_offset}"
            first = False
        count = 0
        for record in batch:
            assert record.offset == next_offset + count, f"{path}: offset {record.offset} out of order at byte {position}"
            yield record
            count += 1
        assert count == batch.records_count and count > 0
        assert batch.last_offset_delta == count - 1
        next_offset += count
        position = end


def decode_partition(directory, rule, seen):
    """Checks one partition's segments; records each (appender, sequence) in `seen`.
    Returns the partition's record count."""
    segments = sorted(directory.glob("*.log"))
    assert segments, f"{directory} holds no segment"
    next_offset = 0
    last_sequence = {}
    for segment in segments:
        for record in walk_segment(segment, next_offset):
            next_offset = record.offset + 1
            appender_text, sequence_text = record.key.decode("utf-8").split(":")
            appender, sequence = int(appender_text), int(sequence_text)
            where = f"{segment} offset {record.offset}"
            assert record.key == f"{appender}:{sequence}".encode(), where
            assert record.value == rule.value(appender, sequence), f"{where}: value differs from the rule"
            assert record.timestamp == TIMESTAMP_BASE_MS + sequence, where
            assert record.headers == [
                ("appender", str(appender).encode()),
                ("seq", str(sequence).encode()),
                ("nothing", None),
            ], f"{where}: headers {record.headers}"
            assert (appender, sequence) not in seen, f"{where}: ({appender}, {sequence}) also at {seen[(appender, sequence)]}"
            seen[(appender, sequence)] = where
            assert sequence > last_sequence.get(appender, -1), f"{where}: appender {appender} sequence went back"
            last_sequence[appender] = sequence
    return next_offset


def test_bench_segments_decode_with_kafka_python_and_pass_inspect(tmp_path):
    data_dir = tmp_path / "data"
    summary = run_bench(data_dir)
    assert summary["cores"] == 1 and summary["partitions"] == 1 and summary["appenders"] == 8
    assert summary["seconds"] == 1
    # The default 5 rounds: the appenders' sequences carry on from round to round,
    # which the gap check below proves.
    assert summary["rounds"] == 5
    assert summary["records"] > 0 and summary["mb_per_s"] > 0 and summary["raw_mb_per_s"] > 0
    assert summary["ratio"] == pytest.approx(summary["mb_per_s"] / summary["raw_mb_per_s"], rel=0.01, abs=0.002)
    assert 0 < summary["p50_us"] <= summary["p99_us"] <= summary["p999_us"]
    assert 0 < summary["raw_fsync_p50_us"] <= summary["raw_fsync_p99_us"]
    # The plain io_uring ceiling (issue 14) ran in the same rounds: pairs written, a
    # ratio that is what it says, and write+fdatasync at least the fdatasync alone.
    assert summary["plain_writes"] > 0 and summary["plain_mb_per_s"] > 0
    assert summary["ratio_plain"] == pytest.approx(summary["mb_per_s"] / summary["plain_mb_per_s"], rel=0.01, abs=0.002)
    assert 0 < summary["plain_fsync_p99_us"] <= summary["plain_write_fsync_p99_us"]
    # weir's flush split (issue 14): every flush includes its fdatasync, so each
    # quantile of the flushes is at least the same quantile of the syncs.
    assert 0 < summary["sync_p50_us"] <= summary["flush_p50_us"]
    assert 0 < summary["sync_p99_us"] <= summary["flush_p99_us"]

    rule = ValueRule(summary.get("record_bytes", 1024))
    partitions = sorted(path for path in data_dir.iterdir() if path.is_dir())
    assert [path.name for path in partitions] == ["bench-0"], f"unexpected entries in {data_dir}: {partitions}"
    seen = {}
    total = sum(decode_partition(directory, rule, seen) for directory in partitions)

    # Every acknowledged append is durable exactly once, and nothing else is there:
    # each appender's sequences are 0..n-1 with no gap.
    assert total == len(seen) == summary["records"]
    by_appender = defaultdict(list)
    for appender, sequence in seen:
        by_appender[appender].append(sequence)
    assert sorted(by_appender) == list(range(8)), f"appenders seen: {sorted(by_appender)}"
    for appender, sequences in by_appender.items():
        assert sorted(sequences) == list(range(len(sequences))), f"appender {appender} has gaps"

    inspected = subprocess.run(
        [binary("WEIR_BIN"), "inspect", str(data_dir)], capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    assert inspected.returncode == 0, f"weir inspect exited {inspected.returncode}:\n{inspected.stdout}{inspected.stderr}"


@pytest.mark.parametrize(
    "flags",
    [
        ["--cores", "0"],
        ["--cores", "100000"],
        ["--record-bytes", "0"],
        ["--record-bytes", str((1 << 20) + 1)],
        ["--seconds", "0"],
        ["--rounds", "0"],
        ["--rounds", "51"],
        ["--appenders", "0"],
        ["--partitions", "0"],
        ["--flush-delay-us", "2000000"],
    ],
)
def test_bench_refuses_bad_flags_with_exit_2(tmp_path, flags):
    completed = subprocess.run(
        [binary("WEIR_BENCH_BIN"), "log", "--data-dir", str(tmp_path / "data"), *flags],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert completed.returncode == 2, f"{flags}: exit {completed.returncode}\n{completed.stdout}{completed.stderr}"
    assert flags[0] in completed.stderr or "log." in completed.stderr, completed.stderr
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())
