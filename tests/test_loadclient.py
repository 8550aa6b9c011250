"""The verifying load client against a small server that misbehaves on purpose.

The server serves the lab's content (coral.content) correctly, except for the
requests it is told to get wrong: it corrupts a byte, truncates, resets,
duplicates, stalls or closes. Each fault must land in the right outcome class.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast
from urllib.parse import parse_qs, urlsplit

import httptools
import pytest

from coral import content
from coral.loadclient import (
    CORRUPTED,
    FAILED,
    OK,
    LoadConfig,
    LoadReport,
    RequestRecord,
    add_parser,
    parse_mix,
    run,
)

STATIC = [("/static/1k.bin", 1.0)]
MIXED = [
    ("/static/1k.bin", 2.0),
    ("/static/15k.bin", 1.0),
    ("/cgi-bin/random?n=4096", 1.0),
    ("/cgi-bin/echo", 1.0),
]
RANDOM = [("/cgi-bin/random?n=2000", 1.0)]
BAD = 5
"""The index (in serving order, across connections) of the request the server gets wrong."""


@dataclass
class Behaviour:
    """What the server does: MODE for the requests in BAD_AT, right for the rest."""

    mode: str = "correct"
    bad_at: frozenset[int] = frozenset()
    served: int = 0
    port: int = 0
    connections: int = 0
    peers: set[str] = field(default_factory=set)


def _reply(target: str, request_body: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body per coral.content for TARGET."""
    url = urlsplit(target)
    query = {k: v[-1] for k, v in parse_qs(url.query).items()}
    headers: dict[str, str] = {}
    if url.path.startswith("/static/"):
        return 200, headers, content.static_body(url.path[len("/static/") : -len(".bin")])
    if url.path == "/cgi-bin/random":
        body = os.urandom(int(query["n"]))
    elif url.path == "/cgi-bin/echo":
        body = content.echo_body(request_body)
    else:
        return 404, headers, b"not found\n"
    headers["X-Coral-Digest"] = hashlib.sha256(body).hexdigest()
    headers["X-Coral-Rid"] = query.get("rid", "")
    headers["Transfer-Encoding"] = "chunked"
    return 200, headers, body


def _wire(status: int, headers: dict[str, str], body: bytes, framed: bool = True) -> bytes:
    """The reply as bytes: chunked (two chunks) if the headers say so, else with
    Content-Length, or if not FRAMED with neither (the body ends at EOF)."""
    head = f"HTTP/1.1 {status} X\r\n"
    if not framed:
        headers = {k: v for k, v in headers.items() if k != "Transfer-Encoding"}
        payload = body
    elif headers.get("Transfer-Encoding") == "chunked":
        half = len(body) // 2
        payload = b"".join(
            b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:half], body[half:]) if part
        )
        payload += b"0\r\n\r\n"
    else:
        headers = {**headers, "Content-Length": str(len(body))}
        payload = body
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (head + "\r\n").encode() + payload


class _Handler(asyncio.Protocol):
    """One server-side connection; parses requests with httptools and answers in order."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body = b""
        self.deaf = False
        """After a fault that ends the exchange: ignore further requests."""
        self.late = b""
        """A reply to send again when the client half-closes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.behaviour.connections += 1
        self.behaviour.peers.add(transport.get_extra_info("peername")[0])

    def data_received(self, data: bytes) -> None:
        if not self.deaf:
            self.parser.feed_data(data)

    def eof_received(self) -> bool:
        if self.late:
            self.transport.write(self.late)
        return False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        if self.deaf:
            return
        b = self.behaviour
        index, b.served = b.served, b.served + 1
        status, headers, body = _reply(self.url.decode(), self.body)
        self.url, self.body = b"", b""
        mode = b.mode if index in b.bad_at else "correct"
        if mode == "corrupt":
            body = body[:100] + bytes([body[100] ^ 0x01]) + body[101:]
        if mode == "close":
            headers["Connection"] = "close"
        wire = _wire(status, headers, body, framed=mode != "unframed")
        if mode in ("truncate", "reset"):
            wire = wire[: len(wire) - len(body) // 2]
        if mode == "stall":
            self.deaf = True
            return
        self.transport.write(wire * 2 if mode == "duplicate" else wire)
        if mode == "duplicate_late":
            self.late = wire
        elif mode in ("truncate", "close", "unframed"):
            self.deaf = True
            self.transport.write_eof()
        elif mode == "reset":
            self.deaf = True
            sock = self.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()


@pytest.fixture
def server() -> Iterator[Behaviour]:
    """The misbehaving server on 127.0.0.1, in its own thread; set its mode before loading it."""
    behaviour = Behaviour()
    loop = asyncio.new_event_loop()
    srv = loop.run_until_complete(
        loop.create_server(lambda: _Handler(behaviour), "127.0.0.1", 0, reuse_address=True)
    )
    behaviour.port = srv.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield behaviour
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        srv.close()
        loop.run_until_complete(srv.wait_closed())
        loop.close()


def _load(server: Behaviour, **kwargs: object) -> LoadReport:
    settings: dict[str, object] = {"connections": 2, "requests": 40, "timeout": 2.0, "seed": 1}
    settings.update(kwargs)
    return run(LoadConfig("127.0.0.1", server.port, **settings))  # type: ignore[arg-type]


def _problems(report: LoadReport) -> list[RequestRecord]:
    return [r for r in report.records if r.outcome != OK]


@pytest.mark.parametrize("pipeline", [1, 4])
def test_correct_server_all_ok(server: Behaviour, pipeline: int) -> None:
    report = _load(server, mix=MIXED, connections=4, requests=200, pipeline=pipeline)
    summary = json.loads(report.to_json())
    assert summary["counts"] == {OK: 200, FAILED: 0, CORRUPTED: 0}
    assert summary["connection_errors"] == 0 and summary["resets"] == 0
    assert summary["problems"] == []
    assert 0 < summary["latency_ms"]["p50"] <= summary["latency_ms"]["max"]
    assert summary["longest_gap_ms"] >= 0 and summary["throughput_rps"] > 0
    assert server.served == 200
    assert len({r.target for r in report.records if "rid=" in r.target}) == sum(
        "rid=" in r.target for r in report.records
    ), "every dynamic request has its own rid"


@pytest.mark.parametrize("mix", [STATIC, RANDOM])
@pytest.mark.parametrize("pipeline", [1, 4])
def test_corrupted_byte_flagged(
    server: Behaviour, pipeline: int, mix: list[tuple[str, float]]
) -> None:
    server.mode, server.bad_at = "corrupt", frozenset({BAD})
    report = _load(server, pipeline=pipeline, mix=mix)
    assert report.counts() == {OK: 39, FAILED: 0, CORRUPTED: 1}
    (bad,) = _problems(report)
    expected = "wrong byte at offset 100" if mix is STATIC else "body does not match its digest"
    assert bad.detail == expected


@pytest.mark.parametrize("pipeline", [1, 4])
def test_truncated_reply_flagged(server: Behaviour, pipeline: int) -> None:
    server.mode, server.bad_at = "truncate", frozenset({BAD})
    report = _load(server, pipeline=pipeline, mix=MIXED)
    counts = report.counts()
    assert counts[CORRUPTED] == 0 and counts[FAILED] >= 1
    assert counts[OK] + counts[FAILED] == 40
    assert report.resets == 0
    truncated = [r for r in _problems(report) if "mid-reply (truncated after" in r.detail]
    assert len(truncated) == 1 and truncated[0].outcome == FAILED
    assert truncated[0].detail.startswith("connection closed")
    if pipeline == 1:
        assert counts[FAILED] == 1
    else:
        others = [r for r in _problems(report) if r not in truncated]
        assert all(r.detail == "connection closed before reply" for r in others)


@pytest.mark.parametrize("pipeline", [1, 4])
def test_reset_flagged(server: Behaviour, pipeline: int) -> None:
    server.mode, server.bad_at = "reset", frozenset({BAD})
    report = _load(server, pipeline=pipeline, mix=STATIC)
    counts = report.counts()
    assert report.resets == 1 and report.connection_errors == 0
    assert counts[CORRUPTED] == 0 and 1 <= counts[FAILED] <= pipeline
    assert all(r.detail.startswith("connection reset") for r in _problems(report))
    assert counts[OK] + counts[FAILED] == 40


@pytest.mark.parametrize("mode", ["duplicate", "duplicate_late"])
@pytest.mark.parametrize("pipeline", [1, 4])
def test_duplicated_reply_flagged(server: Behaviour, pipeline: int, mode: str) -> None:
    """With identical static replies, a duplicate is caught when it answers no request."""
    server.mode, server.bad_at = mode, frozenset({BAD})
    report = _load(server, pipeline=pipeline, mix=STATIC)
    assert report.counts() == {OK: 40, FAILED: 0, CORRUPTED: 1}
    (bad,) = _problems(report)
    assert bad.target == "" and bad.detail.startswith("unsolicited reply")


@pytest.mark.parametrize("pipeline", [1, 4])
def test_duplicated_dynamic_reply_caught_by_rid(server: Behaviour, pipeline: int) -> None:
    """A duplicate taken as the next request's reply carries the wrong request id."""
    server.mode, server.bad_at = "duplicate", frozenset({BAD})
    report = _load(server, pipeline=pipeline, mix=RANDOM, connections=1)
    counts = report.counts()
    assert counts[FAILED] == 0 and counts[CORRUPTED] >= 1
    assert all(
        r.detail.startswith(("unsolicited reply", "reply for request id"))
        for r in _problems(report)
    )


@pytest.mark.parametrize("mode", ["close", "unframed"])
@pytest.mark.parametrize("pipeline", [1, 4])
def test_connection_close_reconnects(server: Behaviour, pipeline: int, mode: str) -> None:
    """A close the server announces (Connection: close, or a body that ends at EOF) is no
    error: the requests it left unanswered go on a new connection."""
    server.mode, server.bad_at = mode, frozenset(range(2, 40, 3))
    report = _load(server, pipeline=pipeline, mix=MIXED, connections=2)
    assert report.counts() == {OK: 40, FAILED: 0, CORRUPTED: 0}
    assert server.connections > 10


def test_timeout_flagged(server: Behaviour) -> None:
    server.mode, server.bad_at = "stall", frozenset({BAD})
    report = _load(server, mix=STATIC, timeout=0.3)
    assert report.counts() == {OK: 39, FAILED: 1, CORRUPTED: 0}
    (bad,) = _problems(report)
    assert bad.detail == "timeout before reply"
    assert 0.29 <= bad.end - bad.start < 1.0, "timer granularity: 1 ms"
    assert report.summary()["longest_gap_ms"] < 1000


def test_refused_connection_flagged() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    report = run(LoadConfig("127.0.0.1", port, connections=2, requests=6, timeout=1.0))
    assert report.counts() == {OK: 0, FAILED: 6, CORRUPTED: 0}
    assert report.connection_errors == 6
    assert all(r.detail.startswith("connect: ConnectionRefusedError") for r in report.records)


def test_duration_bounds_run(server: Behaviour) -> None:
    report = _load(server, requests=None, duration=0.3, mix=STATIC, bind="127.0.0.1")
    counts = report.counts()
    assert counts[OK] > 0 and counts[FAILED] == counts[CORRUPTED] == 0
    assert max(r.start for r in report.records) < 0.3
    assert report.duration < 0.3 + 1.0
    assert server.peers == {"127.0.0.1"}


def test_config_needs_a_bound() -> None:
    with pytest.raises(ValueError, match="bound"):
        LoadConfig("127.0.0.1", 80)
    with pytest.raises(ValueError, match="weight"):
        LoadConfig("127.0.0.1", 80, requests=1, mix=[("/static/1k.bin", 0.0)])


def test_parse_mix() -> None:
    assert parse_mix("/static/1k.bin=3, /cgi-bin/random?n=4096,/cgi-bin/slow?ms=5&n=10=2") == [
        ("/static/1k.bin", 3.0),
        ("/cgi-bin/random?n=4096", 1.0),
        ("/cgi-bin/slow?ms=5&n=10", 2.0),
    ]


def test_summary_statistics() -> None:
    records = [RequestRecord(0.0, 0.010 * (i + 1), 0, "/static/1k.bin", OK) for i in range(10)] + [
        RequestRecord(0.2, 0.6, 1, "/static/1k.bin", OK),
        RequestRecord(0.3, 0.35, 1, "/static/1k.bin", FAILED, "connection reset before reply"),
    ]
    summary = LoadReport(records, connection_errors=0, resets=1, duration=1.0).summary()
    assert summary["counts"] == {OK: 11, FAILED: 1, CORRUPTED: 0}
    assert summary["latency_ms"]["p50"] == 60.0  # nearest rank: 6th of 11
    assert summary["latency_ms"]["max"] == 400.0
    assert summary["longest_gap_ms"] == 500.0 and summary["longest_gap_start_s"] == 0.1
    assert summary["problems"] == [
        {
            "outcome": FAILED,
            "target": "/static/1k.bin",
            "detail": "connection reset before reply",
            "time": 0.35,
        }
    ]


def _cli(args: list[str]) -> Callable[[], int]:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args(args)
    return lambda: parsed.func(parsed)


def test_cli_exit_status_and_records(
    server: Behaviour, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{server.port}"
    records = tmp_path / "records.jsonl"
    assert _cli(["load", url, "--requests", "30", "--records", str(records)])() == 0
    assert json.loads(capsys.readouterr().out)["counts"][OK] == 30
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(lines) == 30 and {line["outcome"] for line in lines} == {OK}
    assert set(lines[0]) == {"start", "end", "conn", "target", "outcome", "detail"}

    server.mode, server.bad_at = "corrupt", frozenset({server.served + 3})
    assert _cli(["load", url, "--requests", "10", "--mix", "/static/15k.bin"])() == 1
    assert json.loads(capsys.readouterr().out)["counts"][CORRUPTED] == 1

    assert _cli(["load", url])() == 2
    assert "bound" in capsys.readouterr().err
