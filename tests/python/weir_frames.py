"""weir device protocol v1 frames, written from docs/PROTOCOL.md alone (no Rust, no rkyv).

encode_produce(sequence, topic, records) -> archive bytes
decode_answer(archive bytes) -> dict
frame(archive) -> length-prefixed bytes for the stream

A record is a dict: timestamp_ms (int), key (bytes or None), value (bytes or None),
headers (list of (str, bytes or None)).

Run as a script: `weir_frames.py encode SPEC.json OUT_DIR` writes one archive per
frame in the spec; `weir_frames.py decode-answer FILE` prints the answer as JSON.
"""
import json
import os
import struct
import sys

PROTOCOL_VERSION = 1
KIND_PRODUCE, KIND_ACK, KIND_ERROR = 1, 2, 3


class Writer:
    """Lays out an archive: data first, depth-first in field order, root last."""

    def __init__(self):
        self.buffer = bytearray()

    def align(self, alignment):
        while len(self.buffer) % alignment:
            self.buffer.append(0)

    def put(self, data):
        position = len(self.buffer)
        self.buffer += data
        return position

    @staticmethod
    def vec(field_position, data_position, length):
        # Relative pointer: offset from the field's own position, then the length.
        return struct.pack("<iI", data_position - field_position, length)


def _header_struct(writer, position, key_at, key, value_at, value, flags):
    return (
        Writer.vec(position + 0, key_at, len(key))
        + Writer.vec(position + 8, value_at, len(value))
        + struct.pack("<B3x", flags)
    )


def encode_produce(sequence, topic, records):
    writer = Writer()
    topic_bytes = topic.encode()
    topic_at = writer.put(topic_bytes)
    # Out-of-line data of every record, in field order: key, value, headers.
    laid_out = []
    for record in records:
        key = record["key"] if record["key"] is not None else b""
        value = record["value"] if record["value"] is not None else b""
        key_at = writer.put(key)
        value_at = writer.put(value)
        header_data = []
        for header_key, header_value in record["headers"]:
            encoded_key = header_key.encode()
            encoded_value = header_value if header_value is not None else b""
            header_key_at = writer.put(encoded_key)
            header_value_at = writer.put(encoded_value)
            header_data.append((header_key_at, encoded_key, header_value_at, encoded_value, 1 if header_value is not None else 0))
        # The array is aligned even when empty; an empty one points where its
        # elements would have started.
        writer.align(4)
        headers_at = len(writer.buffer)
        if header_data:
            for index, (hk_at, hk, hv_at, hv, flags) in enumerate(header_data):
                position = headers_at + 20 * index
                writer.put(_header_struct(writer, position, hk_at, hk, hv_at, hv, flags))
        flags = (1 if record["key"] is not None else 0) | (2 if record["value"] is not None else 0)
        laid_out.append((record["timestamp_ms"], key_at, key, value_at, value, headers_at, len(header_data), flags))
    writer.align(8)
    records_at = len(writer.buffer)
    for index, (timestamp, key_at, key, value_at, value, headers_at, header_count, flags) in enumerate(laid_out):
        position = records_at + 40 * index
        writer.put(
            struct.pack("<q", timestamp)
            + Writer.vec(position + 8, key_at, len(key))
            + Writer.vec(position + 16, value_at, len(value))
            + Writer.vec(position + 24, headers_at, header_count)
            + struct.pack("<B7x", flags)
        )
    writer.align(8)
    root = len(writer.buffer)
    writer.put(
        struct.pack("<HHIQ", PROTOCOL_VERSION, KIND_PRODUCE, 0, sequence)
        + Writer.vec(root + 16, topic_at, len(topic_bytes))
        + Writer.vec(root + 24, records_at, len(records))
    )
    return bytes(writer.buffer)


def frame(archive):
    return struct.pack(">I", len(archive)) + archive


def _read_vec(buffer, field_position):
    offset, length = struct.unpack_from("<iI", buffer, field_position)
    start = field_position + offset
    return start, length


def decode_answer(archive):
    if len(archive) < 40 or len(archive) % 8:
        raise ValueError(f"answer archive of {len(archive)} bytes")
    root = len(archive) - 40
    version, kind, error_code, _reserved, sequence, retry_after_ms, _reserved2 = struct.unpack_from("<HHHHQII", archive, root)
    if version != PROTOCOL_VERSION or kind not in (KIND_ACK, KIND_ERROR):
        raise ValueError(f"version {version} kind {kind}")
    parts_at, parts_count = _read_vec(archive, root + 24)
    parts = []
    for index in range(parts_count):
        position = parts_at + 24 * index
        if position < 0 or position + 24 > root:
            raise ValueError("ack part out of bounds")
        base_offset, partition, first_record, record_count, _ = struct.unpack_from("<qIIII", archive, position)
        parts.append({"base_offset": base_offset, "partition": partition, "first_record": first_record, "record_count": record_count})
    message_at, message_length = _read_vec(archive, root + 32)
    if message_length and (message_at < 0 or message_at + message_length > root):
        raise ValueError("message out of bounds")
    message = archive[message_at:message_at + message_length].decode() if message_length else ""
    return {
        "kind": {KIND_ACK: "ack", KIND_ERROR: "error"}[kind],
        "error_code": error_code,
        "sequence": sequence,
        "retry_after_ms": retry_after_ms,
        "parts": parts,
        "message": message,
    }


def _record_from_json(record):
    unhex = lambda value: None if value is None else bytes.fromhex(value)
    return {
        "timestamp_ms": record["timestamp_ms"],
        "key": unhex(record["key"]),
        "value": unhex(record["value"]),
        "headers": [(key, unhex(value)) for key, value in record["headers"]],
    }


def main():
    if sys.argv[1] == "encode":
        spec = json.load(open(sys.argv[2]))
        out = sys.argv[3]
        for index, item in enumerate(spec):
            records = [_record_from_json(record) for record in item["records"]]
            with open(os.path.join(out, f"frame-{index}.bin"), "wb") as file:
                file.write(encode_produce(item["sequence"], item["topic"], records))
    elif sys.argv[1] == "decode-answer":
        print(json.dumps(decode_answer(open(sys.argv[2], "rb").read())))
    else:
        sys.exit(f"unknown command {sys.argv[1]}")


if __name__ == "__main__":
    main()
