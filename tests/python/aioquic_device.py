"""A weir device written with aioquic (an independent QUIC stack) and the frame codec
in weir_frames.py (written from docs/PROTOCOL.md alone).

usage: aioquic_device.py --server HOST:PORT --ca CA --cert CERT --key KEY
                         [--topic T] [--frames N] [--records R] [--sequence S]
                         [--key-prefix P] [--first-frame K] [--resend-last]

Sends N produce frames of R records each on one bidirectional stream, reads one answer
per frame, prints one JSON object per answer (one per line). With --resend-last the
last frame is sent twice (same sequence, same bytes), as after a lost answer.
With --no-cert the device offers no client certificate; with --truncate the stream
ends in the middle of its last frame. When weir closes the connection, one JSON object
{"kind": "closed", "error_code", "reason"} is printed and the exit code is 3.
--header KEY=VALUE adds a header to every record (repeatable). --connections K opens K
connections at once, each sending its own N frames (connection i starts at sequence
S + i*N); each answer then carries "connection": i, and a connection whose handshake
fails prints {"kind": "failed", "connection": i} without stopping the others. --hold-ms M keeps every
connection open, idle, for M ms after its answers (with --frames 0: an idle device).
"""
import argparse
import asyncio
import json
import os
import ssl
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from aioquic.asyncio import connect  # noqa: E402
from aioquic.quic.configuration import QuicConfiguration  # noqa: E402

import weir_frames  # noqa: E402


def records_for(prefix, frame_index, count, extra_headers=()):
    return [
        {
            "timestamp_ms": 1_700_000_000_000 + frame_index * 1000 + index,
            "key": f"{prefix}{frame_index}-{index}".encode(),
            "value": bytes((frame_index * 7 + index + position) % 251 for position in range(100)),
            "headers": [("frame", str(frame_index).encode()), ("empty", None)] + list(extra_headers),
        }
        for index in range(count)
    ]


def configuration_of(arguments):
    configuration = QuicConfiguration(is_client=True, alpn_protocols=["weir/1"])
    configuration.load_verify_locations(arguments.ca)
    if not arguments.no_cert:
        configuration.load_cert_chain(arguments.cert, arguments.key)
    configuration.server_name = "localhost"
    configuration.verify_mode = ssl.CERT_REQUIRED
    return configuration


async def one_connection(arguments, connection_index):
    host, port = arguments.server.rsplit(":", 1)
    configuration = configuration_of(arguments)
    extra_headers = [(pair.split("=", 1)[0], pair.split("=", 1)[1].encode()) for pair in arguments.header]
    first_sequence = arguments.sequence + connection_index * arguments.frames
    prefix = arguments.key_prefix if arguments.connections == 1 else f"{arguments.key_prefix}c{connection_index}-"
    archives = [
        weir_frames.encode_produce(
            first_sequence + index,
            arguments.topic,
            records_for(prefix, arguments.first_frame + index, arguments.records, extra_headers),
        )
        for index in range(arguments.frames)
    ]
    if arguments.resend_last:
        archives.append(archives[-1])
    if arguments.garbage:
        # Bytes that pass the framing but are no valid archive.
        archives = [bytes(range(64))]
    tag = {} if arguments.connections == 1 else {"connection": connection_index}
    async with connect(host, int(port), configuration=configuration) as client:
        reader, writer = await client.create_stream()
        if arguments.declare_length is not None:
            writer.write(struct.pack(">I", arguments.declare_length) + b"x" * 16)
        for archive in archives:
            writer.write(weir_frames.frame(archive))
        if arguments.truncate:
            whole = weir_frames.frame(archives[-1])
            writer.write(whole[: len(whole) // 2])
        if archives or arguments.truncate or arguments.declare_length is not None:
            writer.write_eof()
        try:
            for _ in archives + ([None] if arguments.truncate else []):
                (length,) = struct.unpack(">I", await asyncio.wait_for(reader.readexactly(4), 10))
                answer = weir_frames.decode_answer(await asyncio.wait_for(reader.readexactly(length), 10))
                print(json.dumps({**answer, **tag}), flush=True)
            if arguments.hold_ms:
                await asyncio.sleep(arguments.hold_ms / 1000)
                closed = getattr(client._quic, "_close_event", None)
                if closed is not None:
                    raise ConnectionError("closed while idle")
        except (asyncio.IncompleteReadError, ConnectionError):
            closed = getattr(client._quic, "_close_event", None)
            if closed is None:
                raise
            print(
                json.dumps({"kind": "closed", "error_code": closed.error_code, "reason": closed.reason_phrase, **tag}),
                flush=True,
            )
            return 3
    return 0


async def run(arguments):
    if arguments.connections == 1:
        return await one_connection(arguments, 0)
    # Several connections: one that fails its handshake does not stop the others.
    results = await asyncio.gather(
        *(one_connection(arguments, index) for index in range(arguments.connections)), return_exceptions=True
    )
    for index, result in enumerate(results):
        if isinstance(result, BaseException):
            print(json.dumps({"kind": "failed", "connection": index, "error": repr(result)}), flush=True)
    return 3 if any(result != 0 for result in results) else 0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--topic", default="telemetry")
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--records", type=int, default=4)
    parser.add_argument("--sequence", type=int, default=1)
    parser.add_argument("--key-prefix", default="k")
    parser.add_argument("--first-frame", type=int, default=0, help="frame index of the first frame (record contents)")
    parser.add_argument("--resend-last", action="store_true")
    parser.add_argument("--garbage", action="store_true", help="send one frame that is not an archive")
    parser.add_argument("--declare-length", type=int, help="first send a frame header declaring this length")
    parser.add_argument("--no-cert", action="store_true", help="offer no client certificate")
    parser.add_argument("--truncate", action="store_true", help="end the stream inside one more frame")
    parser.add_argument("--header", action="append", default=[], help="KEY=VALUE header on every record")
    parser.add_argument("--connections", type=int, default=1, help="connections opened at once")
    parser.add_argument("--hold-ms", type=int, default=0, help="stay connected, idle, this long after the answers")
    arguments = parser.parse_args()
    sys.exit(asyncio.run(asyncio.wait_for(run(arguments), 30 + arguments.hold_ms / 1000)))


if __name__ == "__main__":
    main()
