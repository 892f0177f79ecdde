"""A weir device at every in-flight limit, written with aioquic and weir_frames.py from
docs/PROTOCOL.md alone: it resends every frame refused with a retryable answer until it
is stored, the way sections 1 and 6 say.

usage: aioquic_window_device.py --server HOST:PORT --ca CA --cert CERT --key KEY
                                [--topic T] [--frames N] [--records R]
                                [--connections C] [--streams S] [--pipeline P]
                                [--window W] [--seconds-max T]

Frames 1..N (sequence = frame number, R records each, value "<sequence>/<index>") are
spread over C connections of S bidirectional streams each: frame s goes on stream
s mod (C*S). Each stream keeps up to P frames written and unanswered. A new frame is
written only while its sequence is below the oldest unacknowledged sequence + W (the
device's window, section 6). After a retryable error on a stream, the stream reads the
answers of every frame written behind the failed one (weir refuses them), waits
retry_after_ms, then writes its unacknowledged frames again in sequence order
(section 1). A non-retryable answer is kept and the frame given up.

Prints one JSON summary: {"acked", "frames", "answers": {code name: count}, "refused":
[non-retryable answers], "seconds"}; exit code 0 when every frame was acked, 1 otherwise.
"""
import argparse
import asyncio
import json
import os
import ssl
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from aioquic.asyncio import connect  # noqa: E402
from aioquic.quic.configuration import QuicConfiguration  # noqa: E402

import weir_frames  # noqa: E402

RETRYABLE = {5: "Backpressure", 6: "DiskFull", 7: "StorageFailed", 9: "QuotaExceeded", 10: "ShuttingDown"}
NAMES = {1: "MalformedFrame", 2: "FrameTooLarge", 3: "TopicNotAllowed", 4: "UnknownTopic", 8: "SequenceTooOld",
         11: "SequenceReused", **RETRYABLE}


class Device:
    def __init__(self, arguments):
        self.arguments = arguments
        self.unacked = set(range(1, arguments.frames + 1))
        self.answers = {}
        self.refused = []
        self.window_moved = asyncio.Condition()
        self.archives = {
            sequence: weir_frames.encode_produce(
                sequence,
                arguments.topic,
                [
                    {
                        "timestamp_ms": 1_700_000_000_000 + sequence,
                        "key": f"k{sequence}-{index}".encode(),
                        "value": f"{sequence}/{index}".encode(),
                        "headers": [],
                    }
                    for index in range(arguments.records)
                ],
            )
            for sequence in range(1, arguments.frames + 1)
        }

    def oldest_unacked(self):
        return min(self.unacked) if self.unacked else self.arguments.frames + 1

    async def done_with(self, sequence):
        async with self.window_moved:
            self.unacked.discard(sequence)
            self.window_moved.notify_all()

    async def stream(self, client, lane, lanes):
        arguments = self.arguments
        reader, writer = await client.create_stream()
        waiting = [sequence for sequence in range(1, arguments.frames + 1) if sequence % lanes == lane]
        written = []
        while waiting or written:
            # Write while the stream's pipeline and the device's window allow.
            while waiting and len(written) < arguments.pipeline:
                if waiting[0] >= self.oldest_unacked() + arguments.window:
                    break
                sequence = waiting.pop(0)
                writer.write(weir_frames.frame(self.archives[sequence]))
                written.append(sequence)
            if not written:
                async with self.window_moved:
                    await self.window_moved.wait_for(lambda: waiting[0] < self.oldest_unacked() + arguments.window)
                continue
            answer = await self.read_answer(reader)
            sequence = written.pop(0)
            assert answer["sequence"] == sequence, (answer, sequence)
            name = "ack" if answer["kind"] == "ack" else NAMES.get(answer["error_code"], str(answer["error_code"]))
            self.answers[name] = self.answers.get(name, 0) + 1
            if answer["kind"] == "ack":
                await self.done_with(sequence)
            elif answer["error_code"] in RETRYABLE:
                # Read the answers of the frames behind it (refused, or stored: then done).
                again = [sequence]
                for behind in written:
                    later = await self.read_answer(reader)
                    assert later["sequence"] == behind, (later, behind)
                    later_name = "ack" if later["kind"] == "ack" else NAMES.get(later["error_code"])
                    self.answers[later_name] = self.answers.get(later_name, 0) + 1
                    if later["kind"] == "ack":
                        await self.done_with(behind)
                    elif later["error_code"] in RETRYABLE:
                        again.append(behind)
                    else:
                        self.refused.append(later)
                        await self.done_with(behind)
                written = []
                await asyncio.sleep(max(answer["retry_after_ms"], 1) / 1000)
                waiting = sorted(again) + waiting
            else:
                self.refused.append(answer)
                await self.done_with(sequence)
        writer.write_eof()

    async def read_answer(self, reader):
        (length,) = struct.unpack(">I", await reader.readexactly(4))
        return weir_frames.decode_answer(await reader.readexactly(length))

    async def connection(self, index):
        arguments = self.arguments
        host, port = arguments.server.rsplit(":", 1)
        configuration = QuicConfiguration(is_client=True, alpn_protocols=["weir/1"])
        configuration.load_verify_locations(arguments.ca)
        configuration.load_cert_chain(arguments.cert, arguments.key)
        configuration.server_name = "localhost"
        configuration.verify_mode = ssl.CERT_REQUIRED
        lanes = arguments.connections * arguments.streams
        async with connect(host, int(port), configuration=configuration) as client:
            await asyncio.gather(
                *(self.stream(client, index * arguments.streams + stream, lanes) for stream in range(arguments.streams))
            )


async def run(arguments):
    device = Device(arguments)
    started = time.monotonic()
    await asyncio.wait_for(
        asyncio.gather(*(device.connection(index) for index in range(arguments.connections))), arguments.seconds_max
    )
    acked = arguments.frames - len(device.unacked) - len(device.refused)
    summary = {
        "acked": acked,
        "frames": arguments.frames,
        "answers": device.answers,
        "refused": device.refused[:20],
        "seconds": round(time.monotonic() - started, 3),
    }
    print(json.dumps(summary), flush=True)
    return 0 if acked == arguments.frames else 1


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--topic", default="telemetry")
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--records", type=int, default=4)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--pipeline", type=int, default=4, help="frames written and unanswered per stream")
    parser.add_argument("--window", type=int, default=64, help="sequences past the oldest unacknowledged one")
    parser.add_argument("--seconds-max", type=float, default=120)
    arguments = parser.parse_args()
    sys.exit(asyncio.run(run(arguments)))


if __name__ == "__main__":
    main()
