"""Decode weir segment files with kafka-python (an independent Kafka implementation)
and compare every record with a manifest weir's test wrote.

usage: decode_segments.py PARTITION_DIR MANIFEST_JSON

Checks: every batch's CRC (validate_crc), magic 2, offsets contiguous from the first
segment's base across all segment files, segment names equal their first offset, and
every record's offset, key, value, timestamp and headers equal the manifest.
Exits 0 on success, 1 with a message on the first mismatch.
"""
import json
import os
import struct
import sys

from kafka.record.default_records import DefaultRecordBatch


def fail(message):
    print(f"decode_segments: {message}", file=sys.stderr)
    sys.exit(1)


def batches_of(path):
    data = open(path, "rb").read()
    position = 0
    while position + 12 <= len(data):
        base_offset, length = struct.unpack(">qi", data[position:position + 12])
        if length == 0 and base_offset == 0:
            if any(data[position:]):
                fail(f"{path}: byte {position}: non-zero bytes after the end of the data")
            return
        end = position + 12 + length
        if length < 49 or end > len(data):
            fail(f"{path}: byte {position}: bad batch length {length}")
        yield position, DefaultRecordBatch(bytearray(data[position:end]))
        position = end
    if position != len(data):
        fail(f"{path}: {len(data) - position} trailing bytes")


def unhex(value):
    return None if value is None else bytes.fromhex(value)


def main():
    directory, manifest_path = sys.argv[1], sys.argv[2]
    expected = json.load(open(manifest_path))
    segments = sorted(name for name in os.listdir(directory) if name.endswith(".log"))
    if not segments:
        fail(f"no segments in {directory}")
    decoded = []
    next_offset = int(segments[0][:-4])
    for name in segments:
        path = os.path.join(directory, name)
        if int(name[:-4]) != next_offset:
            fail(f"{path}: named {name} but the log continues at {next_offset}")
        for position, batch in batches_of(path):
            if batch.magic != 2:
                fail(f"{path}: byte {position}: magic {batch.magic}")
            if not batch.validate_crc():
                fail(f"{path}: byte {position}: CRC mismatch")
            if batch.base_offset != next_offset:
                fail(f"{path}: byte {position}: base offset {batch.base_offset}, expected {next_offset}")
            for record in batch:
                decoded.append(record)
            next_offset = batch.next_offset
    if len(decoded) != len(expected):
        fail(f"decoded {len(decoded)} records, the manifest has {len(expected)}")
    for record, want in zip(decoded, expected):
        got = {
            "offset": record.offset,
            "timestamp": record.timestamp,
            "key": record.key,
            "value": record.value,
            "headers": [[key, value] for key, value in record.headers],
        }
        want = {
            "offset": want["offset"],
            "timestamp": want["timestamp"],
            "key": unhex(want["key"]),
            "value": unhex(want["value"]),
            "headers": [[key, unhex(value)] for key, value in want["headers"]],
        }
        if got != want:
            fail(f"record at offset {want['offset']}: decoded {got!r}, expected {want!r}")
    print(f"decode_segments: {len(decoded)} records in {len(segments)} segments match")


if __name__ == "__main__":
    main()
