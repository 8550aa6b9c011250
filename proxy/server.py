"""The proxy's asyncio server: one task per client connection, one backend
connection per client connection (opened lazily, reused), requests answered
strictly in order.

A connection is read until at least one request is complete; complete
requests are then forwarded one at a time, each reply relayed before the
next request goes out, and only then is the client read again (TCP holds
further pipelined requests back). The proxy alone decides when a
connection closes, and every close is graceful (see ClientConnection.close).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from coral.bpf.structs import Role
from proxy.config import ProxyConfig
from proxy.http import (
    BackendProtocolError,
    ReplyFramer,
    Request,
    RequestError,
    RequestParser,
    backend_request,
    error_reply,
)
from proxy.logframe import ConnId, digest_payload
from proxy.mirror import Diverged, RegeneratedMismatch, Resume, mirror
from proxy.replication import Era, Phase, Replication
from proxy.requestid import request_id

if TYPE_CHECKING:
    from coral.dataplane.plane import ClosingMarker

log = logging.getLogger(__name__)

_READ_SIZE = 65536
ARRIVED_WAIT_S = 0.005
"""How long a finishing connection waits for bytes already on their way in."""
_RETRYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"})
"""Idempotent methods (RFC 9110 9.2.2): sent again when a reused backend
connection turns out closed before any reply byte (a keep-alive race)."""

Marker = Callable[[socket.socket], None]
Emit = Callable[[bytes, bool, ReplyFramer], Awaitable[None]]
"""Where a backend reply's client bytes go: (data, final, framer)."""


@dataclass
class Counters:
    """What the proxy has done, for metrics."""

    connections: int = 0
    requests: int = 0
    replies: Counter[int] = field(default_factory=Counter)
    """Backend replies relayed, by status."""
    errors: Counter[int] = field(default_factory=Counter)
    """The proxy's own error replies, by status."""
    bytes_in: int = 0
    bytes_out: int = 0
    backend_retries: int = 0
    aborted: int = 0
    """Connections closed without a reply they were owed (backend died mid-reply, client gone)."""
    mark_failures: int = 0
    internal_errors: int = 0

    def snapshot(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "requests": self.requests,
            "replies": {str(k): v for k, v in sorted(self.replies.items())},
            "errors": {str(k): v for k, v in sorted(self.errors.items())},
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "backend_retries": self.backend_retries,
            "aborted": self.aborted,
            "mark_failures": self.mark_failures,
            "internal_errors": self.internal_errors,
        }


class _BackendClosed(Exception):
    """The backend closed its connection before its reply was complete."""


class _ProxyReply(Exception):
    """Answer the current request with the proxy's own error STATUS, then close."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class Proxy:
    """The front proxy: listens on cfg.listen, forwards to cfg.backend; with
    cfg.log_key, one of a replicated pair (proxy/replication.py)."""

    def __init__(self, cfg: ProxyConfig) -> None:
        self.cfg = cfg
        self.counters = Counters()
        self._server: asyncio.Server | None = None
        self._marker: ClosingMarker | None = None
        self.replication: Replication | None = None

    async def start(self) -> None:
        """Listen; ReplicationError if the data plane does not know the service."""
        if self.cfg.replicated:
            self.replication = Replication(self.cfg)
            await self.replication.start()
        elif self.cfg.pin_dir is not None:
            from coral.dataplane import closing_marker

            self._marker = closing_marker(self.cfg.pin_dir)
        host, port = self.cfg.listen
        self._server = await asyncio.start_server(
            self._handle, host, port, reuse_address=True, limit=_READ_SIZE
        )

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the real port when cfg.listen asked for port 0)."""
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._marker is not None:
            self._marker.close()
            self._marker = None
        if self.replication is not None:
            await self.replication.close()
            self.replication = None

    def stats(self) -> dict[str, Any]:
        stats = self.counters.snapshot()
        if self.replication is not None:
            stats["replication"] = {"role": self.replication.role.name.lower()}
            stats["replication"].update(self.replication.counters)
        return stats

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.counters.connections += 1
        await ClientConnection(self, reader, writer).run()


class ClientConnection:
    """One client connection and its backend connection.

    Alone (a standalone proxy, a connection this host serves alone, or any
    connection once the peer failed) it forwards and relays. The primary of
    a replicated connection logs every reply and the close before the client
    sees them (_emit, close). The backup mirrors the primary's log
    (proxy/mirror.py) until the primary closes the connection or fails, then
    carries on alone from where the log ends.
    """

    def __init__(
        self, proxy: Proxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.cfg = proxy.cfg
        self.counters = proxy.counters
        self.replication = proxy.replication
        self.mark: Marker | None = (
            proxy._marker if self.replication is None else self.replication.mark_closing
        )
        self.reader = reader
        self.writer = writer
        self.client_ip, self.client_port = writer.get_extra_info("peername")[:2]
        self.parser = RequestParser(self.cfg.max_header_bytes, self.cfg.max_body_bytes)
        self.backend: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.conn: ConnId | None = None
        """The replicated connection's identity; None when served alone from the start."""
        self.offset = 0
        """Bytes of the reply stream written to the client's socket."""
        self.pending_error: int | None = None
        """An error status the input called for, not answered yet (the backup leaves
        answers to the primary)."""
        self.resume: Resume | None = None
        """After a failover, the logged prefix of a reply this host regenerates."""
        self._held = bytearray()
        self.diverged = False
        """The backup's copy of the reply stream is wrong (see proxy/mirror.py)."""
        self.reading_done = False
        """The backup's read-ahead ended (EOF or bad input)."""
        self._reply_start = 0
        """self.offset where the reply being relayed began."""
        rep = self.replication
        self.era = rep.era if rep is not None else Era()
        """The pair this connection was accepted in (proxy.replication.Era)."""
        self.role = rep.role if rep is not None else Role.PRIMARY

    @property
    def logging(self) -> bool:
        """This host is the primary of a replicated connection, and its pair stands."""
        return self.conn is not None and self.role is Role.PRIMARY and not self.era.alone.is_set()

    @property
    def finishing(self) -> bool:
        """A new pair formed after this connection's pair dissolved: the reply to the
        last request received carries Connection: close, so the client reconnects
        into the new pair. An idle connection is not closed meanwhile (a request may
        be on its way: closing would drop it); it finishes at its next request, or
        at the idle timeout."""
        return self.era.superseded.is_set()

    async def run(self) -> None:
        try:
            if self.replication is not None:
                rep = self.replication
                self.conn = rep.conn_id(self.writer.get_extra_info("socket"))
                if self.conn is not None:  # of the pair standing now (conn_id caught up)
                    self.era, self.role = rep.era, rep.role
                backup = self.conn is not None and self.role is Role.BACKUP
                if backup and await mirror(self, rep):
                    return  # the primary closed the connection
            await self._serve()
        except (Diverged, RegeneratedMismatch) as e:
            self._abort(e)
        except (OSError, TimeoutError):
            self.counters.aborted += 1  # the client went away, or stopped reading
        except Exception:
            self.counters.internal_errors += 1
            log.exception("connection from %s:%s", self.client_ip, self.client_port)
        finally:
            if self.replication is not None and self.conn is not None:
                self.replication.release(self.conn)
            self._close_backend()
            await self.close()

    async def _serve(self) -> None:
        while True:
            error, self.pending_error = self.pending_error, None
            if error is None:
                error = await self._read_requests()
            if error is None and not self.parser.complete:
                return
            while self.parser.complete:
                request = self.parser.complete.popleft()
                last = False
                if self.finishing and not self.parser.complete and error is None:
                    await self._take_arrived()
                    last = not (self.parser.complete or self.parser.in_request)
                    last = last and self.pending_error is None
                if not await self._forward(request, last):
                    return
            if error is not None:
                await self._send_error(self.failing_request_no, error)
                return

    async def _take_arrived(self) -> None:
        """Feed the parser what has already arrived (the kernel acknowledged it), without
        waiting for more: a finishing connection answers exactly that, then closes."""
        while True:
            try:
                async with asyncio.timeout(ARRIVED_WAIT_S):
                    data = await self.reader.read(_READ_SIZE)
            except TimeoutError:
                return
            if not data:
                return
            self.counters.bytes_in += len(data)
            try:
                self.parser.feed(data)
            except RequestError as e:
                self.pending_error = e.status
                return

    @property
    def failing_request_no(self) -> int:
        """The number of the request the input error belongs to (both hosts agree:
        they parse the same bytes)."""
        return self.parser.count if self.parser.in_request else self.parser.count + 1

    async def _read_requests(self) -> int | None:
        """Read until a request is complete; the error status if the input calls for one.

        None with no request complete means the connection ends quietly
        (the client closed, or stayed idle too long)."""
        started: float | None = None
        number = 0
        while not self.parser.complete:
            if self.parser.in_request:
                if started is None or number != self.parser.count:
                    started, number = time.monotonic(), self.parser.count
                timeout = started + self.cfg.request_timeout - time.monotonic()
            else:
                started, timeout = None, self.cfg.idle_timeout
            try:
                async with asyncio.timeout(max(timeout, 0)):
                    data = await self.reader.read(_READ_SIZE)
            except TimeoutError:
                return 408 if self.parser.in_request else None
            if not data:
                return None
            self.counters.bytes_in += len(data)
            try:
                self.parser.feed(data)
            except RequestError as e:
                return e.status
        return None

    async def _forward(self, request: Request, last: bool = False) -> bool:
        """Send REQUEST to the backend and relay its reply (LAST: with Connection:
        close); False once the connection must close."""
        self.counters.requests += 1
        close_after = last or not request.keep_alive or request.version == "1.0"
        await self._pause(Phase.REQUEST_READ, request.number)
        try:
            framer = await self._fetch(request, close_after, functools.partial(self._emit, request))
        except _ProxyReply as e:
            self._close_backend()
            if self.logging:
                await asyncio.sleep(self.cfg.backend_failure_grace)  # a host going down?
            await self._send_error(request.number, e.status)
            return False
        return not (close_after or framer.until_eof)

    async def generate(self, request: Request) -> bytes | None:
        """The body this host's backend gives for REQUEST (deterministic content the
        backup generates itself); None if the backend failed."""
        chunks: list[bytes] = []

        async def collect(data: bytes, final: bool, framer: ReplyFramer) -> None:
            chunks.append(data)

        try:
            framer = await self._fetch(request, False, collect)
        except (_ProxyReply, ConnectionAbortedError):
            self._close_backend()
            return None
        return b"".join(chunks)[framer.head_length :]

    async def _fetch(self, request: Request, close_after: bool, emit: Emit) -> ReplyFramer:
        """REQUEST's reply from the backend, its client bytes handed to EMIT. A reused
        backend connection found closed is tried again, for idempotent methods."""
        isn = self.conn.isn if self.conn is not None else 0
        rid = request_id(self.client_ip, self.client_port, isn, request.number)
        wire = backend_request(request, self.client_ip, rid)
        try:
            framer = await self._exchange(request, wire, close_after, emit)
        except _BackendClosed:
            if request.method not in _RETRYABLE:
                raise _ProxyReply(502) from None
            self.counters.backend_retries += 1
            framer = await self._exchange(request, wire, close_after, emit)
        if not framer.keep_alive or framer.until_eof:
            self._close_backend()
        return framer

    async def _exchange(
        self, request: Request, wire: bytes, close_after: bool, emit: Emit
    ) -> ReplyFramer:
        """One attempt: returns the relayed reply's framer. _BackendClosed if a reused
        backend connection was closed before any reply byte (safe to retry)."""
        reused = self.backend is not None
        reader, writer = await self._backend()
        framer = ReplyFramer(request.method == b"HEAD")
        received = False
        self._reply_start = start = self.offset
        writer.write(wire)
        while not framer.done:
            try:
                async with asyncio.timeout(self.cfg.backend_timeout):
                    data = await reader.read(_READ_SIZE)
                if not data:
                    if framer.until_eof:
                        self.counters.replies[framer.status] += 1
                        await emit(b"", True, framer)
                        break
                    raise _BackendClosed
                received = True
                out = framer.feed(data, close_after)
                if framer.done:  # counted before its last bytes go out, so a client sees it
                    self.counters.replies[framer.status] += 1
            except (TimeoutError, OSError, _BackendClosed, BackendProtocolError) as e:
                self._close_backend()
                self._held.clear()
                if self.offset > start or self.resume is not None:
                    raise ConnectionAbortedError("backend failed mid-reply") from e
                if reused and not received and isinstance(e, (OSError, _BackendClosed)):
                    raise _BackendClosed from e
                raise _ProxyReply(504 if isinstance(e, TimeoutError) else 502) from e
            await emit(out, framer.done, framer)
        return framer

    async def _emit(
        self, request: Request, data: bytes, final: bool, framer: ReplyFramer | None = None
    ) -> None:
        """Reply bytes toward the client (FINAL: they end the reply). The primary logs
        them first: the whole reply up to cfg.max_buffered_reply, pieces of that
        size beyond it; deterministic content as its head and the body's digest."""
        if self.resume is not None:
            data = self.resume.past_prefix(data, final, framer)
            if self.resume.done:
                self.resume = None
        if self._held and not self.logging:
            # The pair dissolved while this reply was being held for the log: what
            # is held goes first, never skipped.
            data = bytes(self._held) + data
            self._held.clear()
        if self.logging:
            assert self.replication is not None and self.conn is not None
            self._held += data
            if not final and len(self._held) < self.cfg.max_buffered_reply:
                return
            data = bytes(self._held)
            self._held.clear()
            await self._pause(Phase.REPLY_RECEIVED, request.number)
            whole = final and self.offset == self._reply_start
            if not final and self.offset == self._reply_start:
                self.replication.counters["streamed_replies"] += 1  # cfg.max_buffered_reply
            if whole and framer is not None and self._deterministic(request, framer):
                await self._log_digest(request.number, data, framer.head_length)
            else:
                await self.replication.log_reply(
                    self.conn, request.number, self.offset, data, final, self.era
                )
            await self._pause(Phase.REPLY_LOGGED, request.number)
            if self.cfg.pause_at == Phase.REPLY_PARTIAL and len(data) > 1:
                await self._write(data[: len(data) // 2])
                await self._pause(Phase.REPLY_PARTIAL, request.number)
                data = data[len(data) // 2 :]
        await self._write(data)

    def _deterministic(self, request: Request, framer: ReplyFramer) -> bool:
        """Both hosts' backends give this reply's body alike (cfg.deterministic_prefixes),
        and its framing lets the backup know where it ends."""
        if not self.cfg.deterministic_prefixes or request.method not in (b"GET", b"HEAD"):
            return False
        path = bytes(request.target).split(b"?", 1)[0].decode("latin-1")
        return framer.sized and path.startswith(self.cfg.deterministic_prefixes)

    async def _log_digest(self, request_no: int, reply: bytes, head_length: int) -> None:
        assert self.replication is not None and self.conn is not None
        body = reply[head_length:]
        payload = digest_payload(reply[:head_length], hashlib.sha256(body).digest(), len(body))
        rep, conn = self.replication, self.conn
        if await rep.log_reply(conn, request_no, self.offset, payload, True, self.era, True):
            # The backup's own body differed (sync_static): it gets the real one.
            await rep.log_reply(conn, request_no, self.offset + head_length, body, True, self.era)

    async def _write(self, data: bytes) -> None:
        if not data:
            return
        if self.writer.transport.is_closing():  # uvloop raises on a closed transport
            raise ConnectionResetError("the client's connection is gone")
        self.writer.write(data)
        self.offset += len(data)
        self.counters.bytes_out += len(data)
        async with asyncio.timeout(self.cfg.idle_timeout):
            await self.writer.drain()  # a client that stops reading times out

    async def _pause(self, phase: Phase, request_no: int) -> None:
        if self.logging and self.cfg.pause_at == phase:
            assert self.replication is not None and self.conn is not None
            await self.replication.pause(phase, self.conn, request_no, self.era)

    async def _backend(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.backend is None:
            host, port = self.cfg.backend
            try:
                async with asyncio.timeout(self.cfg.backend_connect_timeout):
                    self.backend = await asyncio.open_connection(host, port, limit=_READ_SIZE)
            except (OSError, TimeoutError):
                raise _ProxyReply(502) from None
        return self.backend

    def _close_backend(self) -> None:
        if self.backend is not None:
            self.backend[1].close()
            self.backend = None

    async def _send_error(self, request_no: int, status: int) -> None:
        self.counters.errors[status] += 1
        await self._emit(Request(request_no), error_reply(status), True)

    def _abort(self, why: Exception) -> None:
        """End the connection with a reset: what this host would send is wrong."""
        assert self.replication is not None
        key = "regenerated_mismatch" if isinstance(why, RegeneratedMismatch) else "diverged"
        self.replication.counters[key] += 1
        log.error("%s:%s aborted: %s", self.client_ip, self.client_port, why)
        if self.mark is not None:
            self.mark(self.writer.get_extra_info("socket"))
        self.writer.transport.abort()

    async def close(self) -> None:
        """Close gracefully: log the close (primary), mark the connection closing in
        the data plane, shut the write side, read the client's input until EOF
        (bounded), then close.

        The mark comes first so the data plane knows this FIN is a legitimate
        close; draining means no unread data is left, so the kernel sends no RST."""
        writer = self.writer
        if writer.transport.is_closing():
            return  # aborted
        try:
            if self.logging:
                assert self.replication is not None and self.conn is not None
                await self.replication.log_close(self.conn, self.offset, self.era)
            async with asyncio.timeout(self.cfg.drain_timeout):
                await writer.drain()
                if self.mark is not None:
                    try:
                        self.mark(writer.get_extra_info("socket"))
                    except Exception:
                        self.counters.mark_failures += 1
                        log.exception("marking %s:%s closing", self.client_ip, self.client_port)
                if writer.can_write_eof():
                    writer.write_eof()
                while await self.reader.read(_READ_SIZE):
                    pass
        except (OSError, TimeoutError):
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()  # the client stopped reading: nothing graceful is left
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
