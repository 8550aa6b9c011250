"""The backup's side of a replicated connection: mirror the primary's log.

While the pair stands, the backup's proxy never answers on its own and runs
no timers: it reads the client's requests from its replicated socket and
keeps them, and writes each logged reply into the socket at the logged
offset (the data plane suppresses the backup's output, so its kernel's send
queue mirrors what the primary sends), then acknowledges the record. A
request is dropped once its whole reply is in the socket: from there the
kernel holds the reply until the client acknowledges it, and retransmits it
if the primary fails first. A logged close ends the connection gracefully.

When this host is left alone, mirror() returns and the connection carries on
as a standalone one: requests without a logged reply are executed against
this host's backend (with the same request ids), a reply logged only in part
is regenerated and continued only if its new bytes start with exactly the
logged prefix (Resume), and an input error the primary never answered is
answered here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from proxy.http import Request, RequestError
from proxy.logchannel import BackupChannel, LogRecord
from proxy.logframe import FrameType, split_digest_payload

if TYPE_CHECKING:
    from proxy.replication import Replication
    from proxy.server import ClientConnection

log = logging.getLogger(__name__)

READ_SIZE = 65536
MAX_AHEAD = 64
"""Complete requests the backup keeps at most before it stops reading (TCP then
holds the client back: the primary's window is clamped to the backup's)."""


class Resume:
    """The logged prefix of request REQUEST_NO's reply (LENGTH bytes, SHA-256
    DIGEST): a regenerated reply continues only if it starts with exactly these
    bytes; otherwise two generations would mix, and the connection is aborted."""

    def __init__(self, request_no: int, length: int, digest: bytes) -> None:
        self.request_no = request_no
        self.remaining = length
        self.digest = digest
        self._hash = hashlib.sha256()
        self.done = False

    def past_prefix(self, data: bytes, final: bool) -> bytes:
        """The bytes of DATA beyond the logged prefix; ConnectionAbortedError if the
        regenerated reply does not start with it."""
        take = min(self.remaining, len(data))
        self._hash.update(data[:take])
        self.remaining -= take
        if self.remaining == 0 and not self.done:
            self.done = True
            if self._hash.digest() != self.digest:
                raise RegeneratedMismatch(self.request_no)
        elif final and self.remaining:
            raise RegeneratedMismatch(self.request_no)
        return data[take:]


class Diverged(ConnectionAbortedError):
    """This host's copy of the reply stream differs from what the client may have
    received (a deterministic body that was not): the connection is aborted."""

    def __init__(self, conn: object) -> None:
        super().__init__(f"{conn}: the backup's reply stream diverged; not continued")


class RegeneratedMismatch(ConnectionAbortedError):
    """A re-executed request's reply differs from the part already logged."""

    def __init__(self, request_no: int) -> None:
        super().__init__(f"request {request_no}: regenerated reply differs from the logged one")


async def mirror(c: ClientConnection, rep: Replication) -> bool:
    """Mirror the primary's log onto C until the primary closes it (True) or this
    host is alone (False: C carries on alone from the state left here)."""
    assert c.conn is not None
    box = rep.mailbox(c.conn)
    room = asyncio.Event()
    room.set()
    parsed = asyncio.Event()
    replied_through = 0
    partial: _Prefix | None = None
    reading = asyncio.create_task(_read_ahead(c, room, parsed, lambda: replied_through))
    alone = asyncio.create_task(rep.alone.wait())
    try:
        while True:
            record_task = asyncio.create_task(box.get())
            await asyncio.wait({record_task, alone}, return_when=asyncio.FIRST_COMPLETED)
            if not record_task.done():
                record_task.cancel()
                break
            channel, record = record_task.result()
            if record.type == FrameType.CLOSE:
                await rep.ack_close(channel, record)
                return True
            if record.offset != c.offset and not c.diverged:
                log.error(
                    "%s: record of request %d at offset %d, but %d bytes are written",
                    c.conn, record.request_no, record.offset, c.offset,
                )  # fmt: skip
            if c.diverged:
                await rep.ack(channel, record)  # the primary goes on; this host cannot
            elif record.digest:
                await _generate(c, rep, channel, record, parsed)
            else:
                _write(c, record.data)
                await rep.ack(channel, record)
            if record.final:
                replied_through, partial = record.request_no, None
                _drop_replied(c, replied_through)
                room.set()
            else:
                if partial is None or partial.request_no != record.request_no:
                    partial = _Prefix(record.request_no)
                partial.add(record.data)
    finally:
        alone.cancel()
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
    # Alone: carry on from where the log ends.
    if c.diverged:
        raise Diverged(c.conn)
    _drop_replied(c, replied_through)
    if partial is not None:
        c.resume = Resume(partial.request_no, partial.length, partial.hash.digest())
    # True if the primary answered a bad request and only its close was lost.
    return c.pending_error is not None and c.failing_request_no <= replied_through


class _Prefix:
    """What has been logged of a reply not logged whole yet."""

    def __init__(self, request_no: int) -> None:
        self.request_no = request_no
        self.length = 0
        self.hash = hashlib.sha256()

    def add(self, data: bytes) -> None:
        self.length += len(data)
        self.hash.update(data)


def _drop_replied(c: ClientConnection, replied_through: int) -> None:
    while c.parser.complete and c.parser.complete[0].number <= replied_through:
        c.parser.complete.popleft()


async def _read_ahead(
    c: ClientConnection,
    room: asyncio.Event,
    parsed: asyncio.Event,
    replied_through: Callable[[], int],
) -> None:
    """Read and parse the client's requests as they come, MAX_AHEAD at most; PARSED
    is set on every new request and when reading ends."""
    try:
        while True:
            await room.wait()
            data = await c.reader.read(READ_SIZE)
            if not data:
                return
            c.counters.bytes_in += len(data)
            try:
                c.parser.feed(data)
            except RequestError as e:
                c.pending_error = e.status
                return
            _drop_replied(c, replied_through())
            if c.parser.complete:
                parsed.set()
            if len(c.parser.complete) >= MAX_AHEAD:
                room.clear()
    finally:
        c.reading_done = True
        parsed.set()


def _write(c: ClientConnection, data: bytes) -> None:
    c.writer.write(data)
    c.offset += len(data)
    c.counters.bytes_out += len(data)


async def _generate(
    c: ClientConnection,
    rep: Replication,
    channel: BackupChannel,
    record: LogRecord,
    parsed: asyncio.Event,
) -> None:
    """Deterministic content: the logged head, then the body from this host's own
    backend, checked against the logged digest and length, and never written
    unless it matches.

    With cfg.sync_static the record is acknowledged after the check, and a body
    that differs is asked for (Flag.MISMATCH): the primary logs the real one as
    the next record. Otherwise the head is acknowledged at once and the primary
    does not wait; a body that differs then leaves this host without a true
    copy: the connection is marked diverged, mirroring stops, and a failover
    aborts it (Diverged) rather than send another generation's bytes."""
    head, digest, length = split_digest_payload(record.data)
    _write(c, head)
    sync = rep.cfg.sync_static
    if not sync:
        await rep.ack(channel, record)
    request = await _parsed_request(c, record.request_no, parsed)
    body = None if request is None else await c.generate(request)
    rep.counters["generated"] += 1
    same = body is not None and len(body) == length and hashlib.sha256(body).digest() == digest
    if same:
        assert body is not None
        _write(c, body)
    else:
        rep.counters["generated_mismatch"] += 1
        log.error("%s: request %d: generated body differs from the primary's", c.conn,
                  record.request_no)  # fmt: skip
        c.diverged = not sync
    if sync:
        await rep.ack(channel, record, mismatch=not same)


async def _parsed_request(
    c: ClientConnection, number: int, parsed: asyncio.Event
) -> Request | None:
    """Request NUMBER once this host has read it; None if the input ends first."""
    while True:
        for request in c.parser.complete:
            if request.number == number:
                return request
        if c.reading_done:
            return None
        parsed.clear()
        await parsed.wait()
