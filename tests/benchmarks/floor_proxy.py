"""The floor: the least work a Python process can do to proxy a request with a bearer header.

Not a proxy anyone should run. It measures what the benchmark machine allows Python at all, so
that squirro-proxy's figures can be read against it rather than only against nginx:

- each client connection is paired with one connection to the upstream, opened once;
- the request head is parsed with httptools (llhttp) and written again with the bearer header
  put in place of any Authorization; the body goes through as it arrives;
- the upstream's answer is copied back byte for byte, unparsed and unchanged;
- no token refresh, no limits, no logging, no metrics, no error handling, no pipelining.

Whatever squirro-proxy does on top (header rules, the guard, the pool, 401 retries, access log,
metrics, limits) costs more than this, so its requests/s can only be lower.

    python tests/benchmarks/floor_proxy.py --upstream http://127.0.0.1:8081 --port 8082 \
        --token TOKEN
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

import httptools
from yarl import URL

SKIP = frozenset({b"authorization", b"connection", b"keep-alive", b"proxy-connection"})


class Upstream(asyncio.Protocol):
    """The upstream half of a pair: whatever it answers goes to the client as it is."""

    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class Client(asyncio.Protocol):
    def __init__(self, host: str, port: int, bearer: bytes) -> None:
        self.host, self.port, self.bearer = host, port, bearer
        self.parser = httptools.HttpRequestParser(self)
        self.upstream: asyncio.Transport | None = None
        self.pending: list[bytes] = []
        self.url = b""
        self.head: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio subclass
        self.opening = asyncio.ensure_future(self._open())

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_connection(
                lambda: Upstream(self.transport), self.host, self.port)
        except OSError:
            self.transport.close()
            return
        self.upstream = transport
        transport.writelines(self.pending)
        self.pending.clear()

    def _send(self, data: bytes) -> None:
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in SKIP:
            self.head += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        method = self.parser.get_method()
        self._send(b"".join((method, b" ", self.url, b" HTTP/1.1\r\n", *self.head,
                             b"Authorization: ", self.bearer, b"\r\n\r\n")))
        self.url = b""
        self.head = []

    def on_body(self, body: bytes) -> None:
        self._send(body)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()
        else:
            self.opening.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", required=True)
    args = parser.parse_args()
    upstream = URL(args.upstream)
    assert upstream.host is not None and upstream.port is not None
    bearer = b"Bearer " + args.token.encode()
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(
        lambda: Client(upstream.host, upstream.port, bearer), "127.0.0.1", args.port,
        backlog=1024))
    try:
        loop.run_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


if __name__ == "__main__":
    main()
