"""Deterministic request-reply, to measure latency and CPU per request through the data plane.

`coral reqrep serve` runs the same program on both server hosts, as `coral
stream serve` does. A request names its reply's size and id; the reply is a
pure function of the two (a slice of coral.stream's pattern), so the primary
and the backup write identical bytes without application logging.
Connections are keep-alive. On the client's EOF the server marks the
connection closing (when given the pinned map), half-closes and closes, so
its FIN is allowed out.

`coral reqrep run` keeps C connections with one request outstanding each,
checks every reply byte for byte and reports latency percentiles and
throughput as JSON. There is no HTTP: what is measured is the network path
and the data plane on it, not a parser. Both sides are asyncio protocols
(uvloop when installed), so one process keeps up with thousands of
requests per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import socket
import struct
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from coral import stream
from coral.loadclient import check_run_bound

MAGIC = b"CRQR"
REQUEST = struct.Struct("!4sIQ")
"""magic, reply size, request id; a request is exactly this, nothing follows."""
MAX_SIZE = stream.CHUNK
"""A reply is one contiguous slice of the stream pattern."""
OK = "ok"
FAILED = "failed"
CORRUPTED = "corrupted"
_PROBLEMS_SHOWN = 20
_RECONNECT_PAUSE = 0.01
"""Pause after a failed connection, so a dead server costs records, not a busy loop."""
_IP_FREEBIND = 15

T = TypeVar("T")


def reply_bytes(size: int, rid: int) -> memoryview:
    """The reply to request RID of SIZE bytes (SIZE <= MAX_SIZE): what both hosts send."""
    return stream.stream_bytes(rid, "down", 0, size)


def _run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """CORO on a fresh event loop, uvloop's when installed (faster switches, less CPU)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# ---- server ----------------------------------------------------------------


class _ServerConn(asyncio.Protocol):
    """One client connection: answer each complete request, close gracefully on EOF."""

    def __init__(self, mark_closing: stream.Marker | None) -> None:
        self._mark = mark_closing
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._buf += data
        n = len(self._buf) // REQUEST.size
        for i in range(n):
            magic, size, rid = REQUEST.unpack_from(self._buf, i * REQUEST.size)
            if magic != MAGIC or size > MAX_SIZE:
                self._transport.close()  # not our client: no reply is right
                return
            self._transport.write(reply_bytes(size, rid))
        del self._buf[: n * REQUEST.size]

    def eof_received(self) -> bool:
        assert self._transport is not None
        if self._mark is not None:
            self._mark(self._transport.get_extra_info("socket"))
        # Nothing is left to read after EOF, so closing sends no RST; the FIN
        # leaves after the pending replies.
        self._transport.write_eof()
        return False


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening socket on HOST:PORT, which need not be configured yet
    (IP_FREEBIND: the backup claims the VIP after its server starts)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.setsockopt(socket.SOL_IP, _IP_FREEBIND, 1)
    srv.bind((host, port))
    srv.listen(512)
    srv.setblocking(False)
    return srv


async def _serve(srv: socket.socket, mark_closing: stream.Marker | None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _ServerConn(mark_closing), sock=srv)
    async with server:
        await server.serve_forever()


def serve(srv: socket.socket, mark_closing: stream.Marker | None = None) -> None:
    """Serve requests on the listening socket SRV forever."""
    reply_bytes(1, 0)  # builds the pattern now, not during the first request
    _run_loop(_serve(srv, mark_closing))


# ---- client ----------------------------------------------------------------


@dataclass
class ReqRepConfig:
    """What to send and where; at least one of requests and duration bounds the run."""

    host: str
    port: int
    connections: int = 4
    size: int = 1024
    requests: int | None = None
    duration: float | None = None
    timeout: float = 5.0
    """Seconds from sending a request (or connecting, or half-closing) to its end."""

    def __post_init__(self) -> None:
        check_run_bound(self.requests, self.duration)
        if self.connections < 1:
            raise ValueError("connections must be at least 1")
        if not 1 <= self.size <= MAX_SIZE:
            raise ValueError(f"size must be between 1 and {MAX_SIZE}")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")


def _percentile(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of ORDERED (ascending, non-empty)."""
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass
class ReqRepReport:
    """Outcome of a run. ``failed`` also counts connections that ended badly
    after their last reply (no EOF, a reset), so a close is checked too."""

    cfg: ReqRepConfig
    latencies: list[float] = field(default_factory=list)
    """Seconds from request sent to last reply byte, of each correct reply."""
    failed: int = 0
    corrupted: int = 0
    problems: list[str] = field(default_factory=list)
    duration: float = 0.0
    cpu_s: float = 0.0
    """CPU time of this process during the run (client cost)."""

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.corrupted == 0

    def note(self, outcome: str, detail: str) -> None:
        if outcome == FAILED:
            self.failed += 1
        else:
            self.corrupted += 1
        if len(self.problems) < _PROBLEMS_SHOWN:
            self.problems.append(f"{outcome}: {detail}")

    def to_json(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        latency = (
            {
                **{f"p{p}": _percentile(lat, p) * 1000 for p in (50, 90, 99)},
                "max": lat[-1] * 1000,
                "mean": sum(lat) / len(lat) * 1000,
            }
            if lat
            else None
        )
        return {
            "target": f"{self.cfg.host}:{self.cfg.port}",
            "connections": self.cfg.connections,
            "size": self.cfg.size,
            "counts": {OK: len(lat), FAILED: self.failed, CORRUPTED: self.corrupted},
            "latency_ms": latency,
            "throughput_rps": len(lat) / self.duration if self.duration else 0.0,
            "duration_s": self.duration,
            "client_cpu_ms": self.cpu_s * 1000,
            "problems": self.problems,
        }


class _Run:
    """What all connections of a run share: the next request id, the report."""

    def __init__(self, cfg: ReqRepConfig) -> None:
        self.cfg = cfg
        self.report = ReqRepReport(cfg)
        self.issued = 0
        self.deadline = None if cfg.duration is None else time.monotonic() + cfg.duration

    def more(self) -> bool:
        if self.cfg.requests is not None and self.issued >= self.cfg.requests:
            return False
        return self.deadline is None or time.monotonic() < self.deadline

    def take(self) -> int | None:
        """The next request id, or None when the run is over."""
        if not self.more():
            return None
        self.issued += 1
        return self.issued - 1


class _ClientConn(asyncio.Protocol):
    """One keep-alive connection, one request outstanding; half-closes at the end."""

    def __init__(self, run: _Run, loop: asyncio.AbstractEventLoop) -> None:
        self._run = run
        self._loop = loop
        self._size = run.cfg.size
        self.done: asyncio.Future[bool] = loop.create_future()
        """True for a clean end, False after a failure."""
        self._transport: asyncio.Transport | None = None
        self._rid: int | None = None
        self._buf = bytearray()
        self._t0 = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._send_next()

    def _arm(self, why: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(self._run.cfg.timeout, self._end, FAILED, why)

    def _send_next(self) -> None:
        assert self._transport is not None
        self._rid = self._run.take()
        if self._rid is None:
            self._arm("no EOF from the server after the half-close")
            self._transport.write_eof()
            return
        self._buf.clear()
        self._arm(f"timeout on request {self._rid}")
        self._t0 = time.perf_counter()
        self._transport.write(REQUEST.pack(MAGIC, self._size, self._rid))

    def data_received(self, data: bytes) -> None:
        if self._rid is None:
            self._end(CORRUPTED, f"{len(data)} bytes after the last reply (a duplicate?)")
            return
        self._buf += data
        if len(self._buf) < self._size:
            return
        latency = time.perf_counter() - self._t0
        want = reply_bytes(self._size, self._rid)
        got = self._buf if len(self._buf) == self._size else self._buf[: self._size]
        if got != want:
            bad = next(i for i in range(self._size) if got[i] != want[i])
            self._end(CORRUPTED, f"request {self._rid}: wrong byte at offset {bad}")
        elif len(self._buf) > self._size:
            extra = len(self._buf) - self._size
            self._end(CORRUPTED, f"request {self._rid}: {extra} bytes beyond the reply")
        else:
            self._run.report.latencies.append(latency)
            self._send_next()

    def eof_received(self) -> bool:
        if self._rid is None:
            self._end(None, "")
        else:
            self._end(FAILED, f"request {self._rid}: EOF after {len(self._buf)} bytes")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._rid is None:
            self._end(FAILED if exc else None, f"connection lost after the last reply: {exc}")
        else:
            self._end(FAILED, f"request {self._rid}: connection lost: {exc}")

    def _end(self, outcome: str | None, detail: str) -> None:
        """Finish this connection once; OUTCOME None is a clean end."""
        if self.done.done():
            return
        if self._timer is not None:
            self._timer.cancel()
        if outcome is not None:
            self._run.report.note(outcome, detail)
            assert self._transport is not None
            self._transport.abort()
        self.done.set_result(outcome is None)


async def _slot(run: _Run) -> None:
    """One connection slot: reconnects after a failure until the run is over."""
    loop = asyncio.get_running_loop()
    cfg = run.cfg
    while run.more():
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _ClientConn(run, loop), cfg.host, cfg.port),
                cfg.timeout,
            )
        except (OSError, TimeoutError) as e:
            if run.take() is not None:
                run.report.note(FAILED, f"connect: {e!r}")
            await asyncio.sleep(_RECONNECT_PAUSE)
            continue
        if not await conn.done:
            await asyncio.sleep(_RECONNECT_PAUSE)


async def run_reqrep(cfg: ReqRepConfig) -> ReqRepReport:
    """Run CFG's load to its bound; every reply is verified."""
    run = _Run(cfg)
    reply_bytes(1, 0)  # builds the pattern before the clock starts
    cpu0, t0 = time.process_time(), time.monotonic()
    await asyncio.gather(*(_slot(run) for _ in range(cfg.connections)))
    run.report.duration = time.monotonic() - t0
    run.report.cpu_s = time.process_time() - cpu0
    return run.report


def run(cfg: ReqRepConfig) -> ReqRepReport:
    """run_reqrep on a fresh event loop (callable from any thread)."""
    return _run_loop(run_reqrep(cfg))


# ---- CLI -------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """Add `reqrep` to the subparsers SUB."""
    p = sub.add_parser("reqrep", help="deterministic request-reply (latency benchmarks)")
    s = p.add_subparsers(dest="reqrep_command", required=True)
    srv = s.add_parser("serve", help="answer requests (run the same on both server hosts)")
    srv.add_argument("address", help="HOST:PORT to listen on")
    srv.add_argument(
        "--pin-dir", help="the host's data-plane pin dir: closes are marked there before a FIN"
    )
    srv.set_defaults(func=_serve_cli)
    r = s.add_parser("run", help="send requests, verify replies; prints JSON, exit 1 on any error")
    r.add_argument("address", help="HOST:PORT")
    r.add_argument("--connections", type=int, default=4, help="concurrent connections (4)")
    r.add_argument("--requests", type=int, help="stop after this many requests")
    r.add_argument("--size", type=int, default=1024, help="reply bytes (1024)")
    r.add_argument("--duration", type=float, help="stop sending after this many seconds")
    r.add_argument("--timeout", type=float, default=5.0, help="per-request timeout, s (5)")
    r.set_defaults(func=_run_cli)


def _serve_cli(args: argparse.Namespace) -> int:
    srv = listen_socket(*stream.split_address(args.address))
    stream.serve_marking(args.pin_dir, lambda mark: serve(srv, mark))
    return 0


def _run_cli(args: argparse.Namespace) -> int:
    try:
        cfg = ReqRepConfig(
            *stream.split_address(args.address),
            connections=args.connections,
            size=args.size,
            requests=args.requests,
            duration=args.duration,
            timeout=args.timeout,
        )
    except ValueError as e:
        print(f"coral reqrep: {e}", file=sys.stderr)
        return 2
    report = run(cfg)
    print(json.dumps(report.to_json()))
    return 0 if report.ok else 1
