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
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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
from proxy.requestid import request_id

if TYPE_CHECKING:
    from coral.dataplane.plane import ClosingMarker

log = logging.getLogger(__name__)

_READ_SIZE = 65536
_RETRYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"})
"""Idempotent methods (RFC 9110 9.2.2): sent again when a reused backend
connection turns out closed before any reply byte (a keep-alive race)."""

Marker = Callable[[socket.socket], None]


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
    """The front proxy: listens on cfg.listen, forwards to cfg.backend."""

    def __init__(self, cfg: ProxyConfig) -> None:
        self.cfg = cfg
        self.counters = Counters()
        self._server: asyncio.Server | None = None
        self._marker: ClosingMarker | None = None

    async def start(self) -> None:
        if self.cfg.pin_dir is not None:
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

    def stats(self) -> dict[str, Any]:
        return self.counters.snapshot()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.counters.connections += 1
        await ClientConnection(self, reader, writer).run()


class ClientConnection:
    """One client connection and its backend connection."""

    def __init__(
        self, proxy: Proxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.cfg = proxy.cfg
        self.counters = proxy.counters
        self.mark: Marker | None = proxy._marker
        self.reader = reader
        self.writer = writer
        self.client_ip, self.client_port = writer.get_extra_info("peername")[:2]
        self.parser = RequestParser(self.cfg.max_header_bytes, self.cfg.max_body_bytes)
        self.backend: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def run(self) -> None:
        try:
            await self._serve()
        except (OSError, TimeoutError):
            self.counters.aborted += 1  # the client went away, or stopped reading
        except Exception:
            self.counters.internal_errors += 1
            log.exception("connection from %s:%s", self.client_ip, self.client_port)
        finally:
            self._close_backend()
            await self.close()

    async def _serve(self) -> None:
        while True:
            error = await self._read_requests()
            if error is None and not self.parser.complete:
                return
            while self.parser.complete:
                request = self.parser.complete.popleft()
                if not await self._forward(request):
                    return
            if error is not None:
                self._send_error(error)
                return

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

    async def _forward(self, request: Request) -> bool:
        """Send REQUEST to the backend and relay its reply; False once the connection must close."""
        self.counters.requests += 1
        rid = request_id(self.client_ip, self.client_port, request.number)
        wire = backend_request(request, self.client_ip, rid)
        close_after = not request.keep_alive or request.version == "1.0"
        try:
            try:
                framer = await self._exchange(request, wire, close_after)
            except _BackendClosed:
                if request.method not in _RETRYABLE:
                    raise _ProxyReply(502) from None
                self.counters.backend_retries += 1
                framer = await self._exchange(request, wire, close_after)
        except _ProxyReply as e:
            self._close_backend()
            self._send_error(e.status)
            return False
        if not framer.keep_alive or framer.until_eof:
            self._close_backend()
        return not (close_after or framer.until_eof)

    async def _exchange(self, request: Request, wire: bytes, close_after: bool) -> ReplyFramer:
        """One attempt: returns the relayed reply's framer. _BackendClosed if a reused
        backend connection was closed before any reply byte (safe to retry)."""
        reused = self.backend is not None
        reader, writer = await self._backend()
        framer = ReplyFramer(request.method == b"HEAD")
        received = sent = False
        writer.write(wire)
        while not framer.done:
            try:
                async with asyncio.timeout(self.cfg.backend_timeout):
                    data = await reader.read(_READ_SIZE)
                if not data:
                    if framer.until_eof:
                        self.counters.replies[framer.status] += 1
                        break
                    raise _BackendClosed
                received = True
                out = framer.feed(data, close_after)
                if framer.done:  # counted before its last bytes go out, so a client sees it
                    self.counters.replies[framer.status] += 1
            except (TimeoutError, OSError, _BackendClosed, BackendProtocolError) as e:
                self._close_backend()
                if sent:
                    raise ConnectionAbortedError("backend failed mid-reply") from e
                if reused and not received and isinstance(e, (OSError, _BackendClosed)):
                    raise _BackendClosed from e
                raise _ProxyReply(504 if isinstance(e, TimeoutError) else 502) from e
            if out:
                sent = True
                self.writer.write(out)
                self.counters.bytes_out += len(out)
                async with asyncio.timeout(self.cfg.idle_timeout):
                    await self.writer.drain()  # a client that stops reading times out
        return framer

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

    def _send_error(self, status: int) -> None:
        self.counters.errors[status] += 1
        reply = error_reply(status)
        self.counters.bytes_out += len(reply)
        self.writer.write(reply)

    async def close(self) -> None:
        """Close gracefully: mark the connection closing in the data plane, shut
        the write side, read the client's input until EOF (bounded), then close.

        The mark comes first so the data plane knows this FIN is a legitimate
        close; draining means no unread data is left, so the kernel sends no RST."""
        writer = self.writer
        try:
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
