"""The front proxy: framing relayed intact, headers added, bad input contained, closes graceful."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import httptools
import pytest
from httpwire import get, read_replies

from coral import netns
from coral.lab import Lab
from coral.lab.topology import SERVER_LAN_IPS
from proxy.config import ProxyConfig
from proxy.requestid import request_id
from proxy.server import Proxy

T = TypeVar("T")

BIG = hashlib.sha256(b"big").digest() * (2 * 1024 * 1024 // 32)
CHUNKED_BODY = b"5\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n"
LIMITS: dict[str, Any] = {"max_header_bytes": 1024, "max_body_bytes": 4096, "idle_timeout": 0.5}


@dataclass
class Seen:
    """A request as the backend received it."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes


class _BackendConn:
    """The test backend's side of one connection: replies chosen by target."""

    def __init__(self, seen: list[Seen], writer: asyncio.StreamWriter) -> None:
        self.seen, self.writer = seen, writer
        self.parser = httptools.HttpRequestParser(self)
        self.target, self.headers, self.body = b"", {}, b""  # type: ignore[var-annotated]
        self.closing = False

    def on_message_begin(self) -> None:
        self.target, self.headers, self.body = b"", {}, b""

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        target = self.target.decode()
        self.seen.append(Seen(self.parser.get_method().decode(), target, self.headers, self.body))
        w = self.writer
        if target == "/chunked":
            head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nKeep-Alive: timeout=5\r\n"
            w.write(head + b"Connection: keep-alive\r\n\r\n" + CHUNKED_BODY)
        elif target == "/big":
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG))
            for i in range(0, len(BIG), 100_000):
                w.write(BIG[i : i + 100_000])
        else:
            body = self.body if target == "/echo" else target.encode()
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            if self.parser.get_method() != b"HEAD":
                w.write(body)


class Harness:
    """An event loop in a thread running the test backend and proxies; tests use plain sockets."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.seen: list[Seen] = []
        self.proxies: list[Proxy] = []
        self.backend = self.call(asyncio.start_server(self._serve_backend, "127.0.0.1", 0))
        self.backend_port: int = self.backend.sockets[0].getsockname()[1]

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _serve_backend(self, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conn = _BackendConn(self.seen, w)
        while data := await reader.read(65536):
            conn.parser.feed_data(data)
            await w.drain()
        w.close()

    def proxy(self, *, backend_port: int | None = None, **limits: Any) -> tuple[str, int]:
        port = self.backend_port if backend_port is None else backend_port
        proxy = Proxy(ProxyConfig(("127.0.0.1", 0), ("127.0.0.1", port), **limits))
        self.call(proxy.start())
        self.proxies.append(proxy)
        return proxy.address

    def close(self) -> None:
        async def stop() -> None:
            for proxy in self.proxies:
                await proxy.close()
            self.backend.close()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        h.close()


def connect(addr: tuple[str, int]) -> socket.socket:
    return socket.create_connection(addr, timeout=5)


def test_keep_alive_and_forwarding_headers(harness: Harness) -> None:
    addr = harness.proxy(**LIMITS)
    with connect(addr) as s:
        port = s.getsockname()[1]
        for n in (1, 2, 3):
            s.sendall(get(f"/k{n}", "X-Forwarded-For: 10.0.0.1\r\nX-Request-Id: forged\r\n"))
            (reply,) = read_replies(s, 1).items
            assert (reply.status, reply.body) == (200, f"/k{n}".encode())
            seen = harness.seen[-1]
            assert seen.headers["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
            assert seen.headers["forwarded"] == "for=127.0.0.1"
            assert seen.headers["x-request-id"] == request_id("127.0.0.1", port, 0, n)
    assert request_id("127.0.0.1", port, 0, 1) == request_id("127.0.0.1", port, 0, 1)
    assert request_id("127.0.0.1", port, 0, 1) != request_id("127.0.0.1", port + 1, 0, 1)
    assert request_id("127.0.0.1", port, 0, 1) != request_id("127.0.0.1", port, 7, 1)
    stats = harness.proxies[0].stats()
    assert stats["requests"] == 3 and stats["replies"] == {"200": 3}


def test_head_reply_has_no_body(harness: Harness) -> None:
    addr = harness.proxy(**LIMITS)
    with connect(addr) as s:
        s.sendall(b"HEAD /h HTTP/1.1\r\nHost: t\r\n\r\n" + get("/after"))
        raw = b""
        while not raw.endswith(b"/after"):
            raw += s.recv(65536)
    # httptools cannot be told a reply answers HEAD, so the raw bytes are checked
    assert b"Content-Length: 2\r\n\r\nHTTP/1.1 200 OK\r\n" in raw
    assert raw.endswith(b"Content-Length: 6\r\n\r\n/after")


def test_pipelined_requests_answered_in_order(harness: Harness) -> None:
    addr = harness.proxy(**LIMITS)
    with connect(addr) as s:
        s.sendall(b"".join(get(f"/p{i}") for i in range(5)))
        replies = read_replies(s, 5).items
    assert [r.body for r in replies] == [f"/p{i}".encode() for i in range(5)]
    with connect(addr) as s:  # a deep pipeline is not mistaken for one oversized head
        s.sendall(b"".join(get(f"/q{i}") for i in range(300)))
        replies = read_replies(s, 300).items
    assert [r.body for r in replies] == [f"/q{i}".encode() for i in range(300)]


def test_chunked_request_and_reply_relayed_intact(harness: Harness) -> None:
    addr = harness.proxy(**LIMITS)
    with connect(addr) as s:
        chunked = b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)
        (echo,) = read_replies(s, 1).items
        assert echo.body == b"abcdefg"
        assert harness.seen[-1].body == b"abcdefg"
        s.sendall(get("/chunked"))
        got = read_replies(s, 1)
    assert got.raw.endswith(b"\r\n\r\n" + CHUNKED_BODY)
    headers = got.items[0].headers
    assert headers["transfer-encoding"] == "chunked"
    assert "keep-alive" not in headers and "connection" not in headers


def test_two_megabyte_reply_intact(harness: Harness) -> None:
    addr = harness.proxy(**LIMITS)
    with connect(addr) as s:
        s.sendall(get("/big") + get("/after"))
        big, after = read_replies(s, 2).items
    assert big.body == BIG
    assert after.body == b"/after"


def _working(conn: socket.socket, n: int) -> None:
    conn.sendall(get(f"/alive{n}"))
    (reply,) = read_replies(conn, 1).items
    assert reply.body == f"/alive{n}".encode()


BAD_INPUT = [
    pytest.param(get("/first") + b"GARBAGE\x01 / HTTP/1.1\r\n\r\n", [200, 400], id="bad-line"),
    pytest.param(get("/first") + get("/x", "X-Big: " + "a" * 2000 + "\r\n"), [200, 431], id="431"),
    pytest.param([b"GET /x HTTP/1.1\r\nX-Endless: ", b"a" * 3000], [431], id="431-unfinished"),
    pytest.param(
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n", [413], id="413-length"
    ),
    pytest.param(
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"1000\r\n"
        + b"x" * 4096
        + b"\r\n1\r\nx\r\n0\r\n\r\n",
        [413],
        id="413-chunked",
    ),
    pytest.param(b"GET /slow HTTP/1.1\r\nHost", [408], id="slow-client"),
    pytest.param(b"", [], id="idle-client"),
]


@pytest.mark.parametrize(("data", "statuses"), BAD_INPUT)
def test_bad_input_answered_and_closed_others_unharmed(
    harness: Harness, data: bytes | list[bytes], statuses: list[int]
) -> None:
    addr = harness.proxy(**LIMITS, request_timeout=0.5)
    with connect(addr) as good, connect(addr) as bad:
        _working(good, 1)
        for part in data if isinstance(data, list) else [data]:
            bad.sendall(part)
            time.sleep(0.05)  # separate reads
        _working(good, 2)
        got = read_replies(bad, len(statuses), until_eof=True)
    with connect(addr) as later:
        _working(later, 3)
    assert [r.status for r in got.items] == statuses
    assert got.eof
    if statuses and statuses[-1] != 200:
        assert got.items[-1].headers["connection"] == "close"


def test_backend_down_gives_502(harness: Harness) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead_port = unused.getsockname()[1]
    dead = harness.proxy(backend_port=dead_port, **LIMITS)
    alive = harness.proxy(**LIMITS)
    with connect(alive) as good, connect(dead) as bad:
        _working(good, 1)
        bad.sendall(get("/x"))
        got = read_replies(bad, 1, until_eof=True)
        _working(good, 2)
    assert got.items[0].status == 502 and got.eof


def test_close_with_unread_pipelined_data_sends_no_rst(harness: Harness) -> None:
    """The proxy closes after the request asking it to; the requests behind it are unread
    input, which it drains, so the client sees its reply and a clean EOF, not a reset."""
    addr = harness.proxy(**LIMITS)
    unread = get("/c") * 40_000  # more than the proxy's read buffer: some stays in the kernel
    with connect(addr) as s:
        sender = threading.Thread(
            target=s.sendall, args=(get("/a") + get("/b", "Connection: close\r\n") + unread,)
        )
        sender.start()
        got = read_replies(s, 2, until_eof=True)  # ConnectionResetError on a RST
        sender.join(5)
    assert [r.body for r in got.items] == [b"/a", b"/b"]
    assert got.items[1].headers["connection"] == "close"
    assert got.eof


@pytest.mark.root
def test_lab_load_through_proxy_to_apache(lab: Lab) -> None:
    """Every URL path of coral.content through the proxy to the lab's real Apache."""
    primary = SERVER_LAN_IPS["primary"]
    argv = [sys.executable, "-m", "coral", "proxy", "--listen", f"{primary}:80"]
    proc = lab.popen("primary", [*argv, "--backend", "127.0.0.1:8080"], stdout=subprocess.PIPE)
    try:
        assert netns.wait_tcp(lab.namespace("primary"), primary, 80, 10), "proxy not listening"
        mix = "/static/1k.bin,/static/15k.bin,/static/50k.bin,/static/1m.bin,"
        mix += "/cgi-bin/random?n=4096,/cgi-bin/slow?ms=5&n=100,/cgi-bin/echo"
        run = lab.start_tool(
            "client1", "load", f"http://{primary}:80", "--requests", "300",
            "--connections", "4", "--pipeline", "2", "--mix", mix,
        )  # fmt: skip
        report = run.result(timeout=120)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert report["counts"] == {"ok": 300, "failed": 0, "corrupted": 0}, report["problems"]
    assert report["resets"] == 0
    stats = json.loads(out)
    assert stats["replies"] == {"200": 300} and stats["errors"] == {}, stats
