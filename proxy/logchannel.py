"""The logging channel: the primary proxy logs each reply to the backup proxy, and
writes it to the client only once the backup has acknowledged it.

One TCP connection from the primary to the backup (bind it to the private
link's address with local_host when there is one), authenticated both ways
with a shared key, every frame MACed with a per-session key (wire format and
handshake: proxy/logframe.py).

Primary, call order and ownership:

    channel = await PrimaryChannel.connect(host, port, key)    # handshake done
    await channel.log_reply(conn, n, offset, data, final)      # returns on the backup's ACK
    await channel.log_close(conn, offset)                      # returns on the backup's ACK
    await channel.close()

The channel owns its reader task (which resolves acknowledgements) and its
socket. log_reply may be called from many tasks at once: records are
pipelined over the one connection, and at most max_inflight unacknowledged
bytes are in flight (a caller beyond that waits, in FIFO order; a record
larger than the limit goes alone). If the backup goes away, every pending
and later call raises PeerLost: the caller treats the peer as failed.

Backup:

    listener = await LogListener.start(host, port, key)
    channel = await listener.accept()            # an authenticated primary
    async for record in channel:                 # REPLY and CLOSE records, in order
        ...write record.data into the client's socket...
        await channel.ack(record.conn, record.request_no)   # or ack_close(record.conn)

A split reply is reassembled into one record. ack acknowledges everything of
that request delivered so far; nothing is acknowledged by the channel itself,
so the backup proxy acknowledges only after its own write. Iteration ends when
the primary closes the channel, and raises ChannelError if the primary
misbehaved (bad MAC, malformed frame: counted, and the connection closed).

Priority (CoRAL 4.6.6): asyncio has no task priorities, and on the proxy's
loop an acknowledgement would wait behind every ready client callback, while
new requests keep being accepted: under overload logging falls behind and
throughput collapses. So the channel runs on its own event loop in its own
thread (ChannelThread); the proxy's tasks call it through ChannelThread.run.
That loop has nothing else to do, so acknowledgements are read as soon as the
thread holds the GIL (which the interpreter hands over every switch interval,
5 ms by default), however long the proxy loop's queue is. The in-flight bound
is the other half: when the backup falls behind, log_reply blocks, the
primary's connections stop reading further requests, and TCP pushes back on
the clients instead of the primary taking on work it cannot log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from proxy.logframe import (
    LENGTH_SIZE,
    MAX_PAYLOAD,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    TAG_SIZE,
    ConnId,
    ErrorCode,
    Flag,
    Frame,
    FrameError,
    FrameType,
    decode,
    encode,
    error_frame,
    error_reason,
    nonce,
    proof,
    session_keys,
    split_length,
    verify,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

MIN_KEY_SIZE = 16


class ChannelError(Exception):
    """The logging channel cannot be used; REMOTE if the peer said so in an ERROR frame."""

    code = ErrorCode.PROTOCOL

    def __init__(self, message: str, remote: bool = False) -> None:
        super().__init__(message)
        self.remote = remote


class AuthenticationError(ChannelError):
    """The peer does not hold the shared key (or refused ours)."""

    code = ErrorCode.AUTH


class VersionMismatch(ChannelError):
    """The peer speaks another protocol version."""

    code = ErrorCode.VERSION


class ProtocolError(ChannelError):
    """A malformed, unexpected or forged frame."""


class PeerLost(ChannelError):
    """The connection to the peer is gone: pending log calls cannot be acknowledged."""


def _peer_error(frame: Frame) -> ChannelError:
    """The error an ERROR frame reports; an unknown code means the peer gave up on us."""
    code, reason = error_reason(frame)
    kind: type[ChannelError] = PeerLost
    if code == ErrorCode.VERSION:
        kind = VersionMismatch
    elif code == ErrorCode.AUTH:
        kind = AuthenticationError
    return kind(f"peer refused: {reason}", remote=True)


@dataclass
class ChannelCounters:
    """What the channel has done, for metrics."""

    frames_in: int = 0
    frames_out: int = 0
    bytes_logged: int = 0
    acks: int = 0
    malformed: int = 0
    """Connections closed for a malformed, unexpected or forged frame."""
    bad_mac: int = 0
    auth_failures: int = 0
    version_mismatches: int = 0

    def count(self, error: ChannelError) -> None:
        if isinstance(error, AuthenticationError):
            self.auth_failures += 1
        elif isinstance(error, VersionMismatch):
            self.version_mismatches += 1
        elif isinstance(error, ProtocolError):
            self.malformed += 1


@dataclass(frozen=True)
class LogRecord:
    """A REPLY (the exact bytes at OFFSET of the reply stream) or a CLOSE at OFFSET."""

    type: FrameType
    conn: ConnId
    request_no: int
    offset: int
    data: bytes = b""
    final: bool = False
    digest: bool = False
    """DATA is a digest_payload (deterministic content), not the reply's bytes."""


async def _read_frame(reader: asyncio.StreamReader) -> tuple[Frame, bytes, bytes]:
    prefix = await reader.readexactly(LENGTH_SIZE)
    try:
        return decode(await reader.readexactly(split_length(prefix)))
    except FrameError as e:
        raise ProtocolError(f"malformed frame: {e}") from None


class _Link:
    """One authenticated connection: MACed frames in both directions."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        send_key: bytes,
        recv_key: bytes,
        counters: ChannelCounters,
    ) -> None:
        self.reader, self.writer = reader, writer
        self._send_key, self._recv_key = send_key, recv_key
        self._send_seq = self._recv_seq = 0
        self.counters = counters

    def write(self, frame: Frame) -> None:
        self.writer.write(encode(frame, self._send_key, self._send_seq))
        self._send_seq += 1
        self.counters.frames_out += 1

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except OSError as e:
            raise PeerLost(f"logging channel write failed: {e}") from e

    async def read(self) -> Frame:
        """The next frame; ProtocolError if forged or malformed, PeerLost at EOF."""
        try:
            frame, signed, tag = await _read_frame(self.reader)
        except (asyncio.IncompleteReadError, OSError) as e:
            raise PeerLost("peer closed the logging channel") from e
        return self.check(frame, signed, tag)

    def check(self, frame: Frame, signed: bytes, tag: bytes) -> Frame:
        """FRAME if its tag is right for the next sequence number, else ProtocolError."""
        if not verify(self._recv_key, self._recv_seq, signed, tag):
            self.counters.bad_mac += 1
            raise ProtocolError("frame with a bad MAC (forged, replayed or corrupted)")
        self._recv_seq += 1
        self.counters.frames_in += 1
        if frame.version != PROTOCOL_VERSION:
            raise ProtocolError(f"frame of version {frame.version} inside a version-1 session")
        return frame

    def abort(self, error: ChannelError) -> None:
        """Close, first telling the peer why unless the error is its own report or a loss."""
        if not error.remote and not isinstance(error, PeerLost):
            with contextlib.suppress(Exception):
                self.write(error_frame(error.code, str(error)))
        self.writer.close()


async def _handshake_frame(reader: asyncio.StreamReader, expect: FrameType, size: int) -> Frame:
    """A zero-tagged handshake frame of type EXPECT with a SIZE-byte payload."""
    try:
        frame, _, tag = await _read_frame(reader)
    except (asyncio.IncompleteReadError, OSError) as e:
        raise PeerLost("peer closed the logging channel during the handshake") from e
    if frame.version != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"peer speaks logging protocol version {frame.version}, "
            f"this side speaks {PROTOCOL_VERSION}"
        )
    if frame.type == FrameType.ERROR:
        raise _peer_error(frame)
    if frame.type != expect or len(frame.payload) != size or any(tag):
        raise ProtocolError(f"expected a {expect.name} frame in the handshake")
    return frame


async def _handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    key: bytes,
    primary: bool,
    counters: ChannelCounters,
) -> _Link:
    """Mutual challenge-response (see proxy/logframe.py). On failure the error is
    counted, the peer told why (unless it told us) and the connection closed."""
    try:
        side = _primary_handshake if primary else _backup_handshake
        return await side(reader, writer, key, counters)
    except ChannelError as e:
        counters.count(e)
        if not e.remote and not isinstance(e, PeerLost):
            with contextlib.suppress(Exception):
                writer.write(encode(error_frame(e.code, str(e))))
        writer.close()
        raise
    except BaseException:
        writer.close()
        raise


async def _primary_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    key: bytes,
    counters: ChannelCounters,
) -> _Link:
    nonce_p = nonce()
    writer.write(encode(Frame(FrameType.HELLO, payload=b"P" + nonce_p)))
    hello = await _handshake_frame(reader, FrameType.HELLO, 1 + NONCE_SIZE + TAG_SIZE)
    if hello.payload[:1] != b"B":
        raise ProtocolError("peer is not a backup")
    nonce_b, their_proof = hello.payload[1 : 1 + NONCE_SIZE], hello.payload[1 + NONCE_SIZE :]
    if not hmac.compare_digest(their_proof, proof(key, b"backup", nonce_p, nonce_b)):
        raise AuthenticationError("backup failed to prove the shared key (wrong key?)")
    writer.write(encode(Frame(FrameType.AUTH, payload=proof(key, b"primary", nonce_p, nonce_b))))
    send_key, recv_key = session_keys(key, nonce_p, nonce_b)
    link = _Link(reader, writer, send_key, recv_key, counters)
    try:
        ready, signed, tag = await _read_frame(reader)
    except (asyncio.IncompleteReadError, OSError) as e:
        raise PeerLost("backup closed the logging channel during the handshake") from e
    if ready.type == FrameType.ERROR and not any(tag):  # refused before its session began
        raise _peer_error(ready)
    try:
        ready = link.check(ready, signed, tag)
    except ProtocolError:
        raise AuthenticationError("backup's confirmation failed its MAC") from None
    if ready.type != FrameType.AUTH:
        raise ProtocolError("expected the backup's AUTH confirmation")
    return link


async def _backup_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    key: bytes,
    counters: ChannelCounters,
) -> _Link:
    hello = await _handshake_frame(reader, FrameType.HELLO, 1 + NONCE_SIZE)
    if hello.payload[:1] != b"P":
        raise ProtocolError("peer is not a primary")
    nonce_p, nonce_b = hello.payload[1:], nonce()
    my_proof = proof(key, b"backup", nonce_p, nonce_b)
    writer.write(encode(Frame(FrameType.HELLO, payload=b"B" + nonce_b + my_proof)))
    auth = await _handshake_frame(reader, FrameType.AUTH, TAG_SIZE)
    if not hmac.compare_digest(auth.payload, proof(key, b"primary", nonce_p, nonce_b)):
        raise AuthenticationError("primary failed to prove the shared key (wrong key?)")
    recv_key, send_key = session_keys(key, nonce_p, nonce_b)
    link = _Link(reader, writer, send_key, recv_key, counters)
    link.write(Frame(FrameType.AUTH))
    await link.drain()
    return link


def _check_key(key: bytes) -> None:
    if len(key) < MIN_KEY_SIZE:
        raise ValueError(f"the logging channel key needs at least {MIN_KEY_SIZE} bytes")


@dataclass
class _Pending:
    end: int
    """Reply-stream offset just past the record: an ACK at or beyond it covers it."""
    size: int
    future: asyncio.Future[bool] = field(repr=False)
    """Resolved with the ACK's Flag.MISMATCH."""


class PrimaryChannel:
    """The primary's end: logs replies and closes, each call returning on the backup's ACK."""

    def __init__(self, link: _Link, max_inflight: int) -> None:
        self._link = link
        self.counters = link.counters
        self._max_inflight = max_inflight
        self._inflight = 0
        self._admit = asyncio.Lock()
        """Held by the one caller waiting for room, so callers are admitted in order."""
        self._room = asyncio.Event()
        self._replies: dict[tuple[ConnId, int], deque[_Pending]] = {}
        self._closes: dict[ConnId, _Pending] = {}
        self._error: ChannelError | None = None
        self._reader = asyncio.create_task(self._read_loop(), name="logchannel-primary-reader")

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        key: bytes,
        *,
        local_host: str | None = None,
        max_inflight: int = 8 * 1024 * 1024,
        handshake_timeout: float = 5.0,
        counters: ChannelCounters | None = None,
    ) -> PrimaryChannel:
        """Connect to the backup at HOST:PORT (from LOCAL_HOST: the private link) and
        authenticate; AuthenticationError, VersionMismatch, or OSError/TimeoutError."""
        _check_key(key)
        counters = counters or ChannelCounters()
        local = (local_host, 0) if local_host else None
        async with asyncio.timeout(handshake_timeout):
            reader, writer = await asyncio.open_connection(host, port, local_addr=local)
            link = await _handshake(reader, writer, key, True, counters)
        return cls(link, max_inflight)

    @property
    def inflight(self) -> int:
        """Bytes logged and not yet acknowledged."""
        return self._inflight

    async def log_reply(
        self,
        conn: ConnId,
        request_no: int,
        offset: int,
        data: bytes,
        final: bool,
        digest: bool = False,
    ) -> bool:
        """Log DATA, the reply bytes of request REQUEST_NO at OFFSET of CONN's reply
        stream (FINAL: they end the reply; DIGEST: DATA is a digest_payload);
        returns once the backup acknowledged them: True if the backup asks for
        the body of a DIGEST record (its own differed)."""
        size = len(data)
        if digest and size > MAX_PAYLOAD:
            raise ValueError("a digest record must fit one frame")
        async with self._admit:
            while (
                self._error is None
                and self._inflight
                and self._inflight + size > self._max_inflight
            ):
                self._room.clear()
                await self._room.wait()
        if self._error is not None:
            raise self._error
        pending = _Pending(offset + size, size, asyncio.get_running_loop().create_future())
        self._replies.setdefault((conn, request_no), deque()).append(pending)
        self._inflight += size
        for start in range(0, max(size, 1), MAX_PAYLOAD):
            last = start + MAX_PAYLOAD >= size
            flags = Flag.FINAL if final and last else Flag.NONE
            if digest:
                flags |= Flag.DIGEST
            if not last:
                flags |= Flag.MORE
            chunk = data[start : start + MAX_PAYLOAD]
            self._link.write(Frame(FrameType.REPLY, conn, request_no, offset + start, chunk, flags))
        self.counters.bytes_logged += size
        return await self._send_and_wait(pending.future)

    async def log_close(self, conn: ConnId, offset: int) -> None:
        """Log that the primary closes CONN at OFFSET of its reply stream; returns on the ACK."""
        if self._error is not None:
            raise self._error
        if conn in self._closes:
            raise ValueError(f"a close of {conn} is already being logged")
        pending = _Pending(offset, 0, asyncio.get_running_loop().create_future())
        self._closes[conn] = pending
        self._link.write(Frame(FrameType.CLOSE, conn, offset=offset))
        await self._send_and_wait(pending.future)

    async def close(self) -> None:
        """Close the channel; pending calls raise PeerLost."""
        self._fail(PeerLost("logging channel closed by this side"))
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

    async def _send_and_wait(self, future: asyncio.Future[bool]) -> bool:
        try:
            await self._link.drain()
        except PeerLost as e:
            self._fail(e)
        return await future

    async def _read_loop(self) -> None:
        try:
            while True:
                frame = await self._link.read()
                if frame.type == FrameType.ACK:
                    self._on_ack(frame)
                elif frame.type == FrameType.ERROR:
                    raise _peer_error(frame)
                else:
                    raise ProtocolError(f"unexpected {frame.type.name} frame from the backup")
        except ChannelError as e:
            self.counters.count(e)
            self._fail(e)

    def _on_ack(self, frame: Frame) -> None:
        if frame.flags & Flag.CLOSE:
            close = self._closes.get(frame.conn)
            if close is None or close.end != frame.offset:
                raise ProtocolError(f"ACK for a close of {frame.conn} that was not logged")
            del self._closes[frame.conn]
            _resolve(close.future, False)
        else:
            key = (frame.conn, frame.request_no)
            queue = self._replies.get(key)
            if not queue or queue[0].end > frame.offset:
                raise ProtocolError(
                    f"ACK for request {frame.request_no} of {frame.conn} not logged"
                )
            while queue and queue[0].end <= frame.offset:
                done = queue.popleft()
                self._inflight -= done.size
                _resolve(done.future, bool(frame.flags & Flag.MISMATCH))
            if not queue:
                del self._replies[key]
            self._room.set()
        self.counters.acks += 1

    def _fail(self, error: ChannelError) -> None:
        """Fail every pending and later call with ERROR, and close the connection."""
        if self._error is not None:
            return
        self._error = error
        if not isinstance(error, PeerLost):
            log.warning("logging channel to the backup failed: %s", error)
        pending = [p for q in self._replies.values() for p in q] + list(self._closes.values())
        for p in pending:
            if not p.future.done():
                p.future.set_exception(error)
        self._replies.clear()
        self._closes.clear()
        self._inflight = 0
        self._room.set()
        self._link.abort(error)


def _resolve(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():  # its caller may have been cancelled
        future.set_result(value)


class BackupChannel:
    """The backup's end of one authenticated connection: an async iterator of LogRecords."""

    def __init__(self, link: _Link, queue_size: int) -> None:
        self._link = link
        self.counters = link.counters
        self._queue: asyncio.Queue[LogRecord | ChannelError | None] = asyncio.Queue(queue_size)
        """Bounded: a backup that stops consuming stops reading, and TCP pushes back."""
        self._delivered: dict[tuple[ConnId, int], int] = {}
        """Per request, the end offset of what was delivered and not yet acknowledged."""
        self._closes: dict[ConnId, int] = {}
        self._error: ChannelError | None = None
        self._reader = asyncio.create_task(self._read_loop(), name="logchannel-backup-reader")

    def __aiter__(self) -> BackupChannel:
        return self

    async def __anext__(self) -> LogRecord:
        item = await self._queue.get()
        if item is None or isinstance(item, ChannelError):
            self._queue.put_nowait(item)  # every later call ends the same way
            if item is None:
                raise StopAsyncIteration
            raise item
        if item.type == FrameType.CLOSE:
            self._closes[item.conn] = item.offset
        else:
            self._delivered[item.conn, item.request_no] = item.offset + len(item.data)
        return item

    async def ack(self, conn: ConnId, request_no: int, mismatch: bool = False) -> None:
        """Acknowledge every delivered record of request REQUEST_NO on CONN (MISMATCH:
        ask for the body of the DIGEST record just delivered)."""
        try:
            end = self._delivered.pop((conn, request_no))
        except KeyError:
            raise ValueError(f"no reply to request {request_no} of {conn} to acknowledge") from None
        flags = Flag.MISMATCH if mismatch else Flag.NONE
        await self._send_ack(Frame(FrameType.ACK, conn, request_no, end, flags=flags))

    async def ack_close(self, conn: ConnId) -> None:
        """Acknowledge the delivered CLOSE of CONN."""
        try:
            offset = self._closes.pop(conn)
        except KeyError:
            raise ValueError(f"no close of {conn} to acknowledge") from None
        await self._send_ack(Frame(FrameType.ACK, conn, offset=offset, flags=Flag.CLOSE))

    async def close(self) -> None:
        """Close the channel: the primary's pending calls fail, later acks here raise."""
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        self._error = self._error or PeerLost("logging channel closed by this side")
        self._link.writer.close()

    async def _send_ack(self, frame: Frame) -> None:
        if self._error is not None:
            raise self._error
        self._link.write(frame)
        self.counters.acks += 1
        await self._link.drain()

    async def _read_loop(self) -> None:
        parts: list[Frame] = []
        end: ChannelError | None
        try:
            while True:
                frame = await self._link.read()
                if frame.type == FrameType.REPLY:
                    if parts and not _continues(parts, frame):
                        raise ProtocolError("a split record was interrupted")
                    parts.append(frame)
                    if not frame.flags & Flag.MORE:
                        await self._queue.put(_record(parts))
                        parts = []
                elif frame.type == FrameType.CLOSE and not parts:
                    await self._queue.put(LogRecord(FrameType.CLOSE, frame.conn, 0, frame.offset))
                elif frame.type == FrameType.ERROR:
                    raise _peer_error(frame)
                else:
                    raise ProtocolError(f"unexpected {frame.type.name} frame from the primary")
        except PeerLost as e:
            end = e if e.remote else None  # None: the primary closed the channel
        except ChannelError as e:
            self.counters.count(e)
            log.warning("logging channel from the primary failed: %s", e)
            end = e
        if end is not None:
            self._error = end
            self._link.abort(end)
        else:
            self._error = PeerLost("primary closed the logging channel")
            self._link.writer.close()
        await self._queue.put(end)


def _continues(parts: list[Frame], frame: Frame) -> bool:
    first, last = parts[0], parts[-1]
    return (frame.conn, frame.request_no) == (
        first.conn,
        first.request_no,
    ) and frame.offset == last.offset + len(last.payload)


def _record(parts: list[Frame]) -> LogRecord:
    first = parts[0]
    data = b"".join(p.payload for p in parts)
    final = bool(parts[-1].flags & Flag.FINAL)
    digest = bool(first.flags & Flag.DIGEST)
    return LogRecord(
        FrameType.REPLY, first.conn, first.request_no, first.offset, data, final, digest
    )


class LogListener:
    """The backup's listening socket: authenticates each primary that connects.

    Failed handshakes are counted, answered with an ERROR frame and closed;
    accept() returns only authenticated channels.
    """

    def __init__(self, key: bytes, handshake_timeout: float, queue_size: int) -> None:
        _check_key(key)
        self._key = key
        self._handshake_timeout = handshake_timeout
        self._queue_size = queue_size
        self.counters = ChannelCounters()
        self._accepted: asyncio.Queue[BackupChannel] = asyncio.Queue()
        self._server: asyncio.Server | None = None

    @classmethod
    async def start(
        cls,
        host: str,
        port: int,
        key: bytes,
        *,
        handshake_timeout: float = 5.0,
        queue_size: int = 1024,
    ) -> LogListener:
        listener = cls(key, handshake_timeout, queue_size)
        listener._server = await asyncio.start_server(
            listener._handle, host, port, reuse_address=True
        )
        return listener

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def accept(self) -> BackupChannel:
        return await self._accepted.get()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self._handshake_timeout):
                link = await _handshake(reader, writer, self._key, False, self.counters)
        except (ChannelError, TimeoutError) as e:
            log.warning("logging channel peer %s refused: %s", writer.get_extra_info("peername"), e)
            writer.close()
            return
        self._accepted.put_nowait(BackupChannel(link, self._queue_size))


class ChannelThread:
    """A dedicated event loop in its own thread, so the channel's I/O is never queued
    behind request handling (see the module docstring).

    Create the channel with run(PrimaryChannel.connect(...)), call it with
    run(channel.log_reply(...)) from the proxy's loop, and run(channel.close())
    before stop().
    """

    def __init__(self, name: str = "coral-logchannel") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run CORO on the channel's loop and await its result from the caller's loop
        (cancelling the caller cancels CORO)."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()
