"""A SASL front for a Kafka broker that has none (tansu 0.6 here): answers the
SaslHandshake (v0-v1) / SaslAuthenticate (v0-v2) exchange itself -- PLAIN, and
SCRAM-SHA-256 / SCRAM-SHA-512 with the independent `scramp` implementation as the
server -- and once a client is authenticated, relays its connection to the broker
byte for byte. ApiVersions is relayed to the broker (it is allowed before
authentication, as in Kafka); any other request before authentication closes the
connection, as Kafka does. A failed authentication is answered with
SASL_AUTHENTICATION_FAILED (58), then the connection is closed.

Used by tests/ship_secure.rs as the SASL peer. Run the broker with
--advertised-listener-url pointing at this proxy so that every connection comes here.

usage: sasl_proxy.py --target PORT --user NAME:PASSWORD [--user ...]
                     [--mechanisms PLAIN,SCRAM-SHA-256,SCRAM-SHA-512]
                     [--iterations 4096] [--forge-server-signature]
                     [--session-lifetime-ms N --expire-user NAME ...]
--session-lifetime-ms N tells the users named by --expire-user a session lifetime of
N ms and closes their connections N ms after authentication (a Kafka broker with
connections.max.reauth.ms closes a connection that did not re-authenticate).
Prints "listening PORT" once, then one line per authentication:
"authenticated MECHANISM NAME", "refused MECHANISM NAME REASON" or "session expired".
"""

import argparse
import asyncio
import struct
import sys

from scramp import ScramException, ScramMechanism

API_VERSIONS = 18
SASL_HANDSHAKE = 17
SASL_AUTHENTICATE = 36
UNSUPPORTED_SASL_MECHANISM = 33
ILLEGAL_SASL_STATE = 34
SASL_AUTHENTICATION_FAILED = 58
FRAME_BYTES_MAX = 1 << 20


def say(line):
    print(line, flush=True)


def read_uvarint(data, at):
    value, shift = 0, 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7


def uvarint(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def parse_header(payload):
    """(api_key, api_version, correlation_id, offset of the body)."""
    api_key, api_version, correlation = struct.unpack_from(">hhi", payload, 0)
    (client_id_length,) = struct.unpack_from(">h", payload, 8)
    at = 10 + max(client_id_length, 0)
    flexible = api_key == SASL_AUTHENTICATE and api_version >= 2
    if flexible:
        tags, at = read_uvarint(payload, at)
        assert tags == 0, "no tagged fields expected"
    return api_key, api_version, correlation, at


async def read_frame(reader):
    size_bytes = await reader.readexactly(4)
    (size,) = struct.unpack(">i", size_bytes)
    if not 0 < size <= FRAME_BYTES_MAX:
        raise ValueError(f"frame size {size}")
    return size_bytes + await reader.readexactly(size)


def frame(body):
    return struct.pack(">i", len(body)) + body


def handshake_response(correlation, error_code, mechanisms):
    body = struct.pack(">ih", correlation, error_code) + struct.pack(">i", len(mechanisms))
    for name in mechanisms:
        encoded = name.encode()
        body += struct.pack(">h", len(encoded)) + encoded
    return frame(body)


def authenticate_response(correlation, version, error_code, message, auth_bytes, lifetime_ms):
    if version >= 2:
        body = struct.pack(">i", correlation) + b"\x00"  # response header v1: no tags
        body += struct.pack(">h", error_code)
        if message is None:
            body += uvarint(0)
        else:
            encoded = message.encode()
            body += uvarint(len(encoded) + 1) + encoded
        body += uvarint(len(auth_bytes) + 1) + auth_bytes
        body += struct.pack(">q", lifetime_ms) + b"\x00"
        return frame(body)
    body = struct.pack(">ih", correlation, error_code)
    if message is None:
        body += struct.pack(">h", -1)
    else:
        encoded = message.encode()
        body += struct.pack(">h", len(encoded)) + encoded
    body += struct.pack(">i", len(auth_bytes)) + auth_bytes
    if version >= 1:
        body += struct.pack(">q", lifetime_ms)
    return frame(body)


def scram_user(client_first):
    """The user name of a SCRAM client-first message (for the log only)."""
    for attribute in client_first.split(",")[2:]:
        if attribute.startswith("n="):
            return attribute[2:].replace("=2C", ",").replace("=3D", "=")
    return "?"


def authenticate_request_bytes(payload, version, at):
    if version >= 2:
        length, at = read_uvarint(payload, at)
        return payload[at : at + length - 1]
    (length,) = struct.unpack_from(">i", payload, at)
    return payload[at + 4 : at + 4 + length]


class Proxy:
    def __init__(self, args):
        self.target = args.target
        self.mechanisms = args.mechanisms.split(",")
        self.passwords = {}
        self.forge = args.forge_server_signature
        self.session_lifetime_ms = args.session_lifetime_ms
        self.expiring_users = set(args.expire_user)
        self.scram = {name: ScramMechanism(name) for name in self.mechanisms if name.startswith("SCRAM-")}
        self.credentials = {}
        for user in args.user:
            name, password = user.split(":", 1)
            self.passwords[name] = password
            for mechanism_name, mechanism in self.scram.items():
                self.credentials[(mechanism_name, name)] = mechanism.make_auth_info(
                    password, iteration_count=args.iterations
                )

    async def serve(self, client_reader, client_writer):
        try:
            broker_reader, broker_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            client_writer.close()
            return
        try:
            user = await self.authenticate(client_reader, client_writer, broker_reader, broker_writer)
            if user is not None:
                relay = asyncio.gather(
                    self.pump(client_reader, broker_writer), self.pump(broker_reader, client_writer)
                )
                if self.lifetime_ms(user) > 0:
                    # As a Kafka broker with connections.max.reauth.ms does to a client
                    # that does not re-authenticate: the connection ends at expiry.
                    try:
                        await asyncio.wait_for(relay, self.lifetime_ms(user) / 1000)
                    except asyncio.TimeoutError:
                        say("session expired")
                else:
                    await relay
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            client_writer.close()
            broker_writer.close()

    def lifetime_ms(self, user):
        return self.session_lifetime_ms if user in self.expiring_users else 0

    async def pump(self, reader, writer):
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def authenticate(self, client_reader, client_writer, broker_reader, broker_writer):
        """The exchange before the relay: the user once authenticated, else None."""
        mechanism = None
        scram_server = None
        user = "?"
        while True:
            request = await read_frame(client_reader)
            payload = request[4:]
            api_key, version, correlation, at = parse_header(payload)
            if api_key == API_VERSIONS:
                broker_writer.write(request)
                await broker_writer.drain()
                client_writer.write(await read_frame(broker_reader))
                await client_writer.drain()
            elif api_key == SASL_HANDSHAKE:
                (length,) = struct.unpack_from(">h", payload, at)
                wanted = payload[at + 2 : at + 2 + length].decode()
                ok = wanted in self.mechanisms and version == 1
                client_writer.write(
                    handshake_response(correlation, 0 if ok else UNSUPPORTED_SASL_MECHANISM, self.mechanisms)
                )
                await client_writer.drain()
                if not ok:
                    say(f"refused {wanted} ? mechanism not offered (or handshake v{version})")
                    return None
                mechanism = wanted
            elif api_key == SASL_AUTHENTICATE and mechanism is not None:
                message = authenticate_request_bytes(payload, version, at)
                reply, done, failure = self.step(mechanism, message, scram_server)
                if isinstance(reply, tuple):  # a SCRAM server was started
                    scram_server, reply, user = reply
                elif mechanism == "PLAIN":
                    user = message.split(b"\x00")[1].decode(errors="replace") if message.count(b"\x00") == 2 else "?"
                if failure is not None:
                    text = (
                        "Authentication failed during authentication due to invalid credentials "
                        f"with SASL mechanism {mechanism}"
                    )
                    client_writer.write(
                        authenticate_response(correlation, version, SASL_AUTHENTICATION_FAILED, text, b"", 0)
                    )
                    await client_writer.drain()
                    say(f"refused {mechanism} {user} {failure}")
                    return None
                lifetime_ms = self.lifetime_ms(user) if done else 0
                client_writer.write(authenticate_response(correlation, version, 0, None, reply, lifetime_ms))
                await client_writer.drain()
                if done:
                    say(f"authenticated {mechanism} {user}")
                    return user
            else:
                say(f"refused ? ? request {api_key} before authentication")
                return None

    def step(self, mechanism, message, scram_server):
        """(reply bytes or (server, reply, user), authenticated, failure reason)."""
        if mechanism == "PLAIN":
            parts = message.split(b"\x00")
            if len(parts) != 3:
                return b"", False, "malformed PLAIN message"
            _, name, password = (part.decode(errors="replace") for part in parts)
            if self.passwords.get(name) != password:
                return b"", False, "wrong password"
            return b"", True, None
        text = message.decode()
        if scram_server is None:
            credentials = self.credentials

            def auth_fn(name):
                info = credentials.get((mechanism, name))
                if info is None:
                    raise ScramException(f"unknown user {name}")
                return info

            server = self.scram[mechanism].make_server(auth_fn)
            try:
                server.set_client_first(text)
            except ScramException as error:
                return b"", False, f"client-first: {error}"
            return (server, server.get_server_first().encode(), scram_user(text)), False, None
        try:
            scram_server.set_client_final(text)
        except ScramException as error:
            return b"", False, f"client-final: {error}"
        final = scram_server.get_server_final()
        if self.forge:
            # A broker that accepts any proof but cannot prove it knows the credential.
            final = "v=" + ("A" * (len(final) - 3)) + "="
        return final.encode(), True, None


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", type=int, required=True)
    parser.add_argument("--user", action="append", default=[])
    parser.add_argument("--mechanisms", default="PLAIN,SCRAM-SHA-256,SCRAM-SHA-512")
    parser.add_argument("--iterations", type=int, default=4096)
    parser.add_argument("--forge-server-signature", action="store_true")
    parser.add_argument("--session-lifetime-ms", type=int, default=0)
    parser.add_argument("--expire-user", action="append", default=[])
    args = parser.parse_args()
    proxy = Proxy(args)
    server = await asyncio.start_server(proxy.serve, "127.0.0.1", 0)
    say(f"listening {server.sockets[0].getsockname()[1]}")
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
