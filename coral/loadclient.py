"""A verifying HTTP/1.1 load client: load that also proves every reply right.

wrk and ab measure how fast a server answers; they cannot tell a right reply
from a wrong one, nor which request a stall hit. This client checks each reply
against coral.content (status, length, digest or known bytes, request id),
matches replies to requests in order on each keep-alive connection, and keeps
a record per request, so a failover that resets, truncates, corrupts or
duplicates even one reply shows up in the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import random
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httptools

from coral import content

OK = "ok"
FAILED = "failed"
CORRUPTED = "corrupted"

DEFAULT_MIX: tuple[tuple[str, float], ...] = (
    ("/static/1k.bin", 4.0),
    ("/static/15k.bin", 2.0),
    ("/static/50k.bin", 1.0),
    ("/cgi-bin/random?n=4096", 2.0),
    ("/cgi-bin/echo", 1.0),
)

_METHODS = {urlsplit(ep.path).path: ep.method for ep in content.ENDPOINTS}
_READ_SIZE = 65536
_PROBLEMS_SHOWN = 20
_RECONNECT_PAUSE = 0.01
"""Pause after a failed connect, so a dead server costs records, not a busy loop."""
_RESET_ERRORS = (ConnectionResetError, BrokenPipeError)
"""What the socket reports once the peer has sent a RST."""


def check_run_bound(requests: int | None, duration: float | None) -> None:
    """Every load run is bounded: by a request count, a duration, or both."""
    if requests is None and duration is None:
        raise ValueError("the run needs a bound: requests, duration or both")
    if requests is not None and requests < 1:
        raise ValueError("requests must be at least 1")
    if duration is not None and duration <= 0:
        raise ValueError("duration must be positive")


@dataclass
class LoadConfig:
    """What load to send and where; at least one of requests and duration bounds the run."""

    host: str
    port: int
    connections: int = 8
    pipeline: int = 1
    """Requests in flight per connection; 1 means no pipelining."""
    mix: Sequence[tuple[str, float]] = DEFAULT_MIX
    """(target, weight) pairs; targets under /cgi-bin/ get a unique rid= appended."""
    requests: int | None = None
    duration: float | None = None
    timeout: float = 5.0
    """Seconds from sending a request (or connecting) to its complete reply."""
    post_size: int = 1024
    """Random request body size for POST targets (/cgi-bin/echo)."""
    bind: str | None = None
    """Source address, for clients on a host with several addresses."""
    seed: int | None = None
    close_timeout: float = 1.0
    """How long to wait for the server's EOF after our half-close at the end of a connection."""

    def __post_init__(self) -> None:
        check_run_bound(self.requests, self.duration)
        if self.connections < 1 or self.pipeline < 1:
            raise ValueError("connections and pipeline must be at least 1")
        if self.timeout <= 0 or self.close_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if self.post_size < 0:
            raise ValueError("post_size must not be negative")
        if not self.mix:
            raise ValueError("the URL mix is empty")
        for target, weight in self.mix:
            if not (target.startswith("/") and target.isascii() and target.isprintable()):
                raise ValueError(f"bad target {target!r}: need a printable ASCII path")
            if " " in target:
                raise ValueError(f"bad target {target!r}: contains a space")
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"bad weight {weight} for {target}: must be positive")


@dataclass(slots=True)
class RequestRecord:
    """One request's fate; times are seconds since the run started (monotonic clock)."""

    start: float
    end: float
    conn: int
    """The connection slot (0..connections-1); a slot reconnects after a close."""
    target: str
    """As sent; empty for an unsolicited reply, which answers no request."""
    outcome: str
    detail: str = ""


def _percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of ORDERED (ascending, non-empty)."""
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass
class LoadReport:
    """Every request's record and what the connections saw, with the summary derived from them."""

    records: list[RequestRecord]
    connection_errors: int
    """Failed connects and socket errors other than resets."""
    resets: int
    """Connections that ended in a RST from the peer (ECONNRESET or EPIPE)."""
    duration: float
    started: float = 0.0
    """time.monotonic() when the run began: record times are relative to it (the
    clock is the host's, so another process can align its own events)."""

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys((OK, FAILED, CORRUPTED), 0)
        for r in self.records:
            counts[r.outcome] += 1
        return counts

    def summary(self) -> dict[str, Any]:
        ok = [r for r in self.records if r.outcome == OK]
        ms = sorted((r.end - r.start) * 1000 for r in ok)
        latency = (
            {
                "p50": _percentile(ms, 50),
                "p90": _percentile(ms, 90),
                "p99": _percentile(ms, 99),
                "max": ms[-1],
                "mean": sum(ms) / len(ms),
            }
            if ms
            else {}
        )
        gap, gap_start = 0.0, None
        for before, after in itertools.pairwise(sorted(r.end for r in ok)):
            if after - before > gap:
                gap, gap_start = after - before, before
        problems = [
            {"outcome": r.outcome, "target": r.target, "detail": r.detail, "time": round(r.end, 6)}
            for r in self.records
            if r.outcome != OK
        ][:_PROBLEMS_SHOWN]
        return {
            "counts": self.counts(),
            "connection_errors": self.connection_errors,
            "resets": self.resets,
            "latency_ms": {
                k: round(latency[k], 3) if latency else None
                for k in ("p50", "p90", "p99", "max", "mean")
            },
            "longest_gap_ms": round(gap * 1000, 3),
            "longest_gap_start_s": None if gap_start is None else round(gap_start, 6),
            "throughput_rps": round(len(ok) / self.duration, 1) if self.duration > 0 else 0.0,
            "duration_s": round(self.duration, 3),
            "started_monotonic": round(self.started, 6),
            "problems": problems,
        }

    def to_json(self) -> str:
        return json.dumps(self.summary(), indent=2)

    def write_records(self, path: Path) -> None:
        """All records as JSON lines, for analysis the summary does not do."""
        with path.open("w") as f:
            for r in self.records:
                f.write(json.dumps(asdict(r)) + "\n")


@dataclass(slots=True)
class _Request:
    target: str
    body: bytes
    wire: bytes
    start: float


@dataclass(slots=True)
class _Reply:
    """A reply being parsed, and the request it answers (None: unsolicited)."""

    request: _Request | None
    begun: float
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    headers_done: bool = False
    body: bytearray = field(default_factory=bytearray)


class _Run:
    """State shared by all connections of one run: the work left, the clock and the records."""

    def __init__(self, cfg: LoadConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.token = f"{self.rng.getrandbits(32):08x}"
        self.targets = [t for t, _ in cfg.mix]
        self.weights = [w for _, w in cfg.mix]
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        self.host_header = f"{host}:{cfg.port}"
        self.issued = 0
        self.records: list[RequestRecord] = []
        self.connection_errors = 0
        self.resets = 0
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def work_left(self, now: float) -> bool:
        cfg = self.cfg
        return (cfg.requests is None or self.issued < cfg.requests) and (
            cfg.duration is None or now < cfg.duration
        )

    def next_request(self) -> _Request | None:
        """The next request to send, or None once the run's bound is reached."""
        start = self.now()
        if not self.work_left(start):
            return None
        self.issued += 1
        target = self.rng.choices(self.targets, self.weights)[0]
        path = urlsplit(target).path
        method = _METHODS.get(path, "GET")
        if path.startswith("/cgi-bin/"):
            target += f"{'&' if '?' in target else '?'}rid={self.token}-{self.issued}"
        body = self.rng.randbytes(self.cfg.post_size) if method == "POST" else b""
        head = f"{method} {target} HTTP/1.1\r\nHost: {self.host_header}\r\n"
        if method == "POST":
            head += f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n"
        wire = (head + "\r\n").encode("ascii") + body
        return _Request(target, body, wire, start)

    def finish(self, conn: int, request: _Request, outcome: str, detail: str = "") -> None:
        self.records.append(
            RequestRecord(request.start, self.now(), conn, request.target, outcome, detail)
        )

    def unsolicited(self, conn: int, begun: float, detail: str) -> None:
        """A reply nobody asked for: a duplicate, so the stream of replies is corrupted."""
        self.records.append(RequestRecord(begun, self.now(), conn, "", CORRUPTED, detail))

    async def worker(self, conn: int) -> None:
        """Keep one connection slot busy, reconnecting whenever a connection ends."""
        cfg = self.cfg
        retry: deque[_Request] = deque()
        local_addr = (cfg.bind, 0) if cfg.bind else None
        while retry or self.work_left(self.now()):
            try:
                async with asyncio.timeout(cfg.timeout):
                    reader, writer = await asyncio.open_connection(
                        cfg.host, cfg.port, local_addr=local_addr
                    )
            except OSError as e:
                self.connection_errors += 1
                request = retry.popleft() if retry else self.next_request()
                if request is None:
                    return
                self.finish(conn, request, FAILED, f"connect: {_describe(e)}")
                await asyncio.sleep(_RECONNECT_PAUSE)
                continue
            await _Connection(self, conn, reader, writer, retry).serve()


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


class _Connection:
    """One TCP connection: sends requests, parses replies and pairs them with requests in order.

    The httptools parser calls the on_* methods. A reply that begins while no
    request waits for one is unsolicited (a duplicate). Requests the server
    will not answer because it announced Connection: close go back to RETRY,
    for the slot's next connection.
    """

    def __init__(
        self,
        run: _Run,
        conn: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        retry: deque[_Request],
    ) -> None:
        self.run = run
        self.conn = conn
        self.reader = reader
        self.writer = writer
        self.retry = retry
        self.parser = httptools.HttpResponseParser(self)
        self.waiting: deque[_Request] = deque()
        """Sent, and no reply to them has begun."""
        self.reply: _Reply | None = None
        self.complete: list[_Reply] = []
        self.server_closes = False

    def on_message_begin(self) -> None:
        request = self.waiting.popleft() if self.waiting else None
        self.reply = _Reply(request, self.run.now())

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.reply is not None
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        headers = self.reply.headers
        headers[key] = f"{headers[key]}, {text}" if key in headers else text

    def on_headers_complete(self) -> None:
        assert self.reply is not None
        self.reply.status = self.parser.get_status_code()
        self.reply.headers_done = True

    def on_body(self, body: bytes) -> None:
        assert self.reply is not None
        self.reply.body += body

    def on_message_complete(self) -> None:
        assert self.reply is not None
        if not self.parser.should_keep_alive():
            self.server_closes = True
        self.complete.append(self.reply)
        self.reply = None

    def _in_flight(self) -> _Request | None:
        """The oldest request still owed a reply."""
        if self.reply is not None and self.reply.request is not None:
            return self.reply.request
        return self.waiting[0] if self.waiting else None

    def _fill(self) -> None:
        """Send requests until the pipeline is full or the run has no more work."""
        replying = self.reply is not None and self.reply.request is not None
        while len(self.waiting) + replying < self.run.cfg.pipeline:
            request = self.retry.popleft() if self.retry else self.run.next_request()
            if request is None:
                return
            self.writer.write(request.wire)
            self.waiting.append(request)

    async def serve(self) -> None:
        try:
            await self._exchange()
        finally:
            self.writer.transport.abort()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()

    async def _exchange(self) -> None:
        run = self.run
        while not self.server_closes:
            self._fill()
            oldest = self._in_flight()
            if oldest is None:
                break
            try:
                async with asyncio.timeout(oldest.start + run.cfg.timeout - run.now()):
                    data = await self.reader.read(_READ_SIZE)
            except TimeoutError:
                self._abandon("timeout")
                return
            except _RESET_ERRORS:
                run.resets += 1
                self._abandon("connection reset")
                return
            except OSError as e:
                run.connection_errors += 1
                self._abandon(f"connection error ({_describe(e)})")
                return
            if not data:
                self._eof()
                return
            if not self._feed(data):
                return
        self.retry.extend(self.waiting)
        self.waiting.clear()
        await self._close_gracefully()

    async def _close_gracefully(self) -> None:
        """Half-close and read to EOF: any reply now answers nothing, so it is a duplicate."""
        run = self.run
        try:
            async with asyncio.timeout(run.cfg.close_timeout):
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                while data := await self.reader.read(_READ_SIZE):
                    if not self._feed(data):
                        return
            self._eof()
        except TimeoutError:
            self._abandon("no EOF from server")
        except _RESET_ERRORS:
            run.resets += 1
            self._abandon("connection reset")
        except OSError as e:
            run.connection_errors += 1
            self._abandon(f"connection error ({_describe(e)})")

    def _feed(self, data: bytes) -> bool:
        """Parse DATA and judge the replies it completes; False if the reply stream is broken."""
        error: Exception | None = None
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
            error = e
        for done in self.complete:
            self._judge(done)
        self.complete.clear()
        if error is None:
            return True
        detail = f"bad HTTP: {_describe(error)}"
        reply, self.reply = self.reply, None
        if reply is not None and reply.request is not None:
            self.run.finish(self.conn, reply.request, CORRUPTED, detail)
        else:
            begun = self.run.now() if reply is None else reply.begun
            self.run.unsolicited(self.conn, begun, f"unsolicited data: {detail}")
        self._abandon("connection abandoned after a bad reply")
        return False

    def _judge(self, reply: _Reply) -> None:
        body = bytes(reply.body)
        if reply.request is None:
            self.run.unsolicited(
                self.conn,
                reply.begun,
                f"unsolicited reply (duplicate?): status {reply.status}, {len(body)} body bytes",
            )
            return
        request = reply.request
        why = content.verify_reply(request.target, request.body, reply.status, reply.headers, body)
        self.run.finish(self.conn, request, CORRUPTED if why else OK, why or "")

    def _eof(self) -> None:
        """The server closed its side: a reply without length or chunking ends here."""
        reply = self.reply
        if (
            reply is not None
            and reply.headers_done
            and "content-length" not in reply.headers
            and "transfer-encoding" not in reply.headers
        ):
            self.reply = None
            self._judge(reply)
            self.server_closes = True
        self._abandon("connection closed", retry=self.server_closes)

    def _abandon(self, cause: str, retry: bool = False) -> None:
        """Settle what is in flight as the connection ends: the reply begun is truncated,
        requests not answered yet fail (or, if the server announced its close, RETRY)."""
        reply, self.reply = self.reply, None
        if reply is not None:
            got = f"{len(reply.body)} body bytes" if reply.headers_done else "in the headers"
            if reply.request is None:
                self.run.unsolicited(self.conn, reply.begun, f"unsolicited partial reply ({cause})")
            else:
                detail = f"{cause} mid-reply (truncated after {got})"
                self.run.finish(self.conn, reply.request, FAILED, detail)
        if retry:
            self.retry.extend(self.waiting)
        else:
            for request in self.waiting:
                self.run.finish(self.conn, request, FAILED, f"{cause} before reply")
        self.waiting.clear()


async def run_load(cfg: LoadConfig) -> LoadReport:
    """Run the load CFG describes on the running event loop; every reply is verified."""
    run = _Run(cfg)
    async with asyncio.TaskGroup() as tasks:
        for conn in range(cfg.connections):
            tasks.create_task(run.worker(conn))
    return LoadReport(run.records, run.connection_errors, run.resets, run.now(), run.t0)


def run(cfg: LoadConfig) -> LoadReport:
    """run_load on a fresh event loop (uvloop's when installed: it parses and switches faster)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run_load(cfg))
    return uvloop.run(run_load(cfg))


def parse_mix(text: str) -> list[tuple[str, float]]:
    """Parse 'TARGET[=WEIGHT],...'.

    A trailing =NUMBER is a weight unless it is the value of the target's last
    query parameter: '/cgi-bin/random?n=4096' has weight 1,
    '/cgi-bin/random?n=4096=3' has weight 3.
    """
    mix = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        target, weight = item, 1.0
        head, sep, tail = item.rpartition("=")
        last_param = head.partition("?")[2].rpartition("&")[2]
        if sep and ("?" not in head or "=" in last_param):
            with contextlib.suppress(ValueError):
                target, weight = head, float(tail)
        mix.append((target, weight))
    if not mix:
        raise argparse.ArgumentTypeError("empty URL mix")
    return mix


def _parse_url(text: str) -> tuple[str, int]:
    url = urlsplit(text)
    if url.scheme != "http" or not url.hostname or url.path not in ("", "/"):
        raise argparse.ArgumentTypeError(f"need http://HOST[:PORT], not {text!r}")
    return url.hostname, url.port or 80


def add_parser(sub: Any) -> None:
    """Add `load` to the subparsers SUB."""
    mix_text = ",".join(f"{t}={w:g}" for t, w in DEFAULT_MIX)
    p = sub.add_parser(
        "load",
        help="verifying HTTP/1.1 load client",
        description="Send keep-alive (optionally pipelined) HTTP/1.1 load, verify every reply "
        "and print a JSON summary. Exit status 1 if any request failed or was corrupted.",
    )
    p.add_argument("url", type=_parse_url, help="http://HOST:PORT")
    p.add_argument("--connections", type=int, default=8, help="concurrent connections (8)")
    p.add_argument("--pipeline", type=int, default=1, help="requests in flight per connection (1)")
    p.add_argument(
        "--mix", type=parse_mix, default=list(DEFAULT_MIX), help=f"TARGET[=WEIGHT],... ({mix_text})"
    )
    p.add_argument("--requests", type=int, help="stop after this many requests")
    p.add_argument("--duration", type=float, help="stop sending after this many seconds")
    p.add_argument("--timeout", type=float, default=5.0, help="per-request timeout, s (5)")
    p.add_argument("--post-size", type=int, default=1024, help="POST body bytes (1024)")
    p.add_argument("--bind", help="source address")
    p.add_argument("--seed", type=int, help="random seed for the mix and bodies")
    p.add_argument("--records", type=Path, help="write every request's record here (JSON lines)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    host, port = args.url
    try:
        cfg = LoadConfig(
            host,
            port,
            connections=args.connections,
            pipeline=args.pipeline,
            mix=args.mix,
            requests=args.requests,
            duration=args.duration,
            timeout=args.timeout,
            post_size=args.post_size,
            bind=args.bind,
            seed=args.seed,
        )
    except ValueError as e:
        print(f"coral load: {e}", file=sys.stderr)
        return 2
    report = run(cfg)
    print(report.to_json())
    if args.records:
        report.write_records(args.records)
    counts = report.counts()
    return 0 if counts[FAILED] == 0 and counts[CORRUPTED] == 0 else 1
