"""Deterministic bulk streams, to prove connection replication byte by byte.

`coral stream serve` runs the same program on both server hosts. A client
sends a header (upload size, download size, seed), then streams the upload
while the server streams the download; both byte streams are a pure function
of the seed, so the primary and the backup write identical bytes without any
application logging. When the upload is complete the server sends its
SHA-256, then closes gracefully (marking the connection closing in the data
plane first, when given the pinned map, so its FIN is allowed out).

`coral stream run` opens several such streams at once and checks every
downloaded byte in place (a gap, a duplicate or a wrong byte is reported at
its offset) and the server's digest of the upload.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

MAGIC = b"CRLS"
HEADER = struct.Struct("!4sQQI")
PATTERN_LEN = 1_048_583
"""Prime length of the repeating pattern: a misplaced chunk never lines up with itself."""
CHUNK = 256 * 1024
Marker = Callable[[socket.socket], None]
"""Marks an accepted socket's connection as closing in the data plane (before its FIN)."""


@functools.cache
def _pattern() -> bytes:
    blocks = (hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(PATTERN_LEN // 32 + 2))
    pattern = b"".join(blocks)[:PATTERN_LEN]
    return pattern + pattern[:CHUNK]  # so any CHUNK-long slice is contiguous


def stream_bytes(seed: int, direction: str, offset: int, length: int) -> memoryview:
    """Bytes [OFFSET, OFFSET+LENGTH) of the stream (SEED, DIRECTION); LENGTH <= CHUNK."""
    start = (offset + seed * 7919 + (0 if direction == "down" else 524_287)) % PATTERN_LEN
    return memoryview(_pattern())[start : start + length]


def _send_stream(sock: socket.socket, seed: int, direction: str, total: int) -> None:
    sent = 0
    while sent < total:
        n = min(CHUNK, total - sent)
        sock.sendall(stream_bytes(seed, direction, sent, n))
        sent += n


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


# ---- server ----------------------------------------------------------------


def _serve_one(conn: socket.socket, mark_closing: Marker | None) -> None:
    peer = conn.getpeername()
    with conn:
        try:
            magic, up, down, seed = HEADER.unpack(_recv_exact(conn, HEADER.size))
        except (ConnectionError, struct.error, OSError) as e:
            print(f"stream: {peer}: no header: {e!r}", file=sys.stderr, flush=True)
            return
        if magic != MAGIC:
            print(f"stream: {peer}: bad magic {magic!r}", file=sys.stderr, flush=True)
            return
        writer = threading.Thread(target=_send_stream, args=(conn, seed, "down", down), daemon=True)
        writer.start()
        digest = hashlib.sha256()
        got = 0
        try:
            while got < up:
                chunk = conn.recv(min(CHUNK, up - got))
                if not chunk:
                    return
                digest.update(chunk)
                got += len(chunk)
            writer.join()
            conn.sendall(digest.digest())
            if mark_closing is not None:
                mark_closing(conn)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):  # drain until the client closes: no RST for unread data
                pass
        except OSError as e:
            print(f"stream: {peer}: {e!r}", file=sys.stderr, flush=True)
            return


def serve(host: str, port: int, mark_closing: Marker | None = None) -> None:
    """Serve streams on HOST:PORT forever (one thread pair per connection)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # The service address may not be configured yet (the backup owns the VIP later).
    srv.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND
    srv.bind((host, port))
    srv.listen(512)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_serve_one, args=(conn, mark_closing), daemon=True).start()


# ---- client ----------------------------------------------------------------


@dataclass
class StreamResult:
    """What one stream saw; ``ok`` only if every byte both ways was right."""

    index: int
    up: int
    down: int
    received: int = 0
    upload_digest_ok: bool = False
    error: str | None = None
    longest_stall_ms: float = 0.0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and self.received == self.down and self.upload_digest_ok


def run_stream(
    index: int, host: str, port: int, up: int, down: int, seed: int, timeout: float
) -> StreamResult:
    """One stream: upload and download at once, verify every byte."""
    res = StreamResult(index, up, down)
    t0 = time.monotonic()
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        res.error = f"connect: {e}"
        return res
    upload_error: list[str] = []

    def upload() -> None:
        try:
            sock.sendall(HEADER.pack(MAGIC, up, down, seed))
            _send_stream(sock, seed, "up", up)
        except OSError as e:
            upload_error.append(f"upload: {e}")

    sender = threading.Thread(target=upload, daemon=True)
    with sock:
        sender.start()
        last = time.monotonic()
        try:
            while res.received < down:
                chunk = sock.recv(min(CHUNK, down - res.received))
                now = time.monotonic()
                res.longest_stall_ms = max(res.longest_stall_ms, (now - last) * 1000)
                last = now
                if not chunk:
                    raise ConnectionError(f"EOF at byte {res.received} of {down}")
                want = stream_bytes(seed, "down", res.received, len(chunk))
                if chunk != want:
                    bad = next(i for i in range(len(chunk)) if chunk[i] != want[i])
                    raise ValueError(f"wrong byte in download at offset {res.received + bad}")
                res.received += len(chunk)
            expected = hashlib.sha256()
            for off in range(0, up, CHUNK):
                expected.update(stream_bytes(seed, "up", off, min(CHUNK, up - off)))
            res.upload_digest_ok = _recv_exact(sock, 32) == expected.digest()
            if not res.upload_digest_ok:
                res.error = "server's digest of the upload is wrong"
            sock.shutdown(socket.SHUT_WR)
            extra = sock.recv(1)
            if extra:
                res.error = "bytes after the end of the stream (duplicate data)"
        except (OSError, ValueError) as e:
            res.error = f"{type(e).__name__}: {e} (download at byte {res.received} of {down})"
        sender.join(timeout)
    if upload_error and res.error is None:
        res.error = upload_error[0]
    res.seconds = time.monotonic() - t0
    return res


@dataclass
class StreamReport:
    results: list[StreamResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "streams": [asdict(r) | {"ok": r.ok} for r in self.results],
            "longest_stall_ms": max((r.longest_stall_ms for r in self.results), default=0.0),
        }


def run_streams(
    host: str, port: int, streams: int, up: int, down: int, timeout: float
) -> StreamReport:
    """STREAMS concurrent streams; every one is checked in full."""
    results: list[StreamResult] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        r = run_stream(i, host, port, up, down, seed=i + 1, timeout=timeout)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return StreamReport(sorted(results, key=lambda r: r.index))


# ---- CLI -------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    p = sub.add_parser("stream", help="deterministic bulk streams (replication tests)")
    s = p.add_subparsers(dest="stream_command", required=True)
    srv = s.add_parser("serve", help="serve streams (run the same on both server hosts)")
    srv.add_argument("address", help="HOST:PORT to listen on")
    srv.add_argument(
        "--pin-dir", help="the host's data-plane pin dir: closes are marked there before a FIN"
    )
    srv.set_defaults(func=_serve_cli)
    run = s.add_parser("run", help="stream and verify; prints JSON, exit 1 on any bad byte")
    run.add_argument("address", help="HOST:PORT")
    run.add_argument("--streams", type=int, default=4)
    run.add_argument("--up", type=int, default=50 * 2**20, help="bytes each stream uploads")
    run.add_argument("--down", type=int, default=50 * 2**20, help="bytes each stream downloads")
    run.add_argument("--timeout", type=float, default=60.0, help="socket timeout, seconds")
    run.set_defaults(func=_run_cli)


def split_address(address: str) -> tuple[str, int]:
    """HOST:PORT as the tools' command lines take it."""
    host, _, port = address.rpartition(":")
    return host, int(port)


def serve_marking(pin_dir: str | None, serve_fn: Callable[[Marker | None], None]) -> None:
    """Run a server, giving it the data plane's closing marker for PIN_DIR (None: no
    data plane, nothing to mark), so its FINs may leave."""
    if pin_dir is None:
        serve_fn(None)
        return
    from coral.dataplane import closing_marker

    with closing_marker(pin_dir) as mark:
        serve_fn(mark)


def _serve_cli(args: argparse.Namespace) -> int:
    host, port = split_address(args.address)
    serve_marking(args.pin_dir, lambda mark: serve(host, port, mark))
    return 0


def _run_cli(args: argparse.Namespace) -> int:
    report = run_streams(
        *split_address(args.address), args.streams, args.up, args.down, args.timeout
    )
    print(json.dumps(report.to_json()))
    return 0 if report.ok else 1
