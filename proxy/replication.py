"""A proxy's part in a replicated pair: its role, the logging channel, and knowing
when it is alone.

Both hosts run the same proxy on the service address. The data plane decides
who is who: this host's role for the service (cfg.listen) is read from its
coral_services entry at start, the connection's identity (client address,
port, initial sequence number) from coral_conns, and whether the pair still
stands from the service's mode, polled every cfg.mode_poll_interval and read
again whenever a replicated connection is accepted. The agent (or the lab's
Pair) writes that mode; once it is no longer duplex this proxy is alone and
stays so (re-integration starts a new pair).

The primary logs every reply and every close before the client sees it
(PrimaryChannel, on its own thread: proxy/logchannel.py). If the channel
fails, logging calls wait until the pair is dissolved: the peer is failed
only on the agent's word, never on the proxy's own guess.

The backup accepts the primary's channel and hands each record to the
connection it belongs to (a mailbox per connection, created by whichever
comes first: the record or the accepted connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import sys
from collections.abc import Awaitable, Coroutine
from concurrent.futures import Future
from typing import Any

from coral.bpf.structs import Mode, Role
from coral.dataplane import ClosingMarker, DataPlaneError, PlaneView, closing_marker, open_view
from proxy.config import ProxyConfig
from proxy.logchannel import (
    BackupChannel,
    ChannelError,
    ChannelThread,
    LogListener,
    LogRecord,
    PrimaryChannel,
)
from proxy.logframe import ConnId

log = logging.getLogger(__name__)

CONNECT_RETRY_S = 0.2
"""Between attempts to reach the backup's logging channel."""

Delivery = tuple[BackupChannel, LogRecord]


class Phase(enum.StrEnum):
    """Points in the primary's handling of a request where a test can stop it
    (cfg.pause_at), so that a crash lands in exactly that phase."""

    REQUEST_READ = "request-read"
    """A complete request, not yet sent to the backend."""
    REPLY_RECEIVED = "reply-received"
    """The backend's whole reply, not yet logged."""
    REPLY_LOGGED = "reply-logged"
    """The backup acknowledged the reply; no byte of it sent to the client."""
    REPLY_PARTIAL = "reply-partial"
    """Half of the reply written to the client."""


class Era:
    """One pair's lifetime as this proxy sees it. A connection belongs to the era it
    was accepted in: ALONE once that pair dissolved (this host serves it alone from
    then on), SUPERSEDED once a new pair formed (it then finishes: its received
    requests answered, then closed at the HTTP level, so the client reconnects
    into the new pair)."""

    def __init__(self) -> None:
        self.alone = asyncio.Event()
        self.superseded = asyncio.Event()


class ReplicationError(Exception):
    """The proxy cannot take its part (no service in the data plane, no role)."""


class Replication:
    """Shared by all connections of one replicating proxy. Call start() on the
    proxy's loop, close() at the end."""

    def __init__(self, cfg: ProxyConfig) -> None:
        assert cfg.log_key is not None and cfg.pin_dir is not None
        self.cfg = cfg
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "channel_failures",
                "records",
                "digest_records",
                "diverged",
                "generated",
                "generated_mismatch",
                "regenerated_mismatch",
                "streamed_replies",
                "takeovers",
                "rejoins",
            ),
            0,
        )
        self.era = Era()
        self.role = Role.PRIMARY
        self._view: PlaneView | None = None
        self._marker: ClosingMarker | None = None
        self._thread: ChannelThread | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._remote: list[Future[Any]] = []
        self._primary: PrimaryChannel | None = None
        self._connected = asyncio.Event()
        self._listener: LogListener | None = None
        self._mailboxes: dict[ConnId, asyncio.Queue[Delivery]] = {}
        self._paused = False
        self._mode = Mode.FENCED
        """The service's mode when last read."""

    async def start(self) -> None:
        """Read this host's role and mode; start the channel's side of the role."""
        cfg = self.cfg
        assert cfg.pin_dir is not None and cfg.log_key is not None
        vip, port = cfg.listen
        try:
            self._view = open_view(cfg.pin_dir)
            service = self._view.service(vip, port)
            self._marker = closing_marker(cfg.pin_dir)
        except DataPlaneError as e:
            raise ReplicationError(f"cannot replicate {vip}:{port}: {e}") from None
        if service.role is None:
            raise ReplicationError(f"service {vip}:{port} has no role in the data plane")
        self.role, self._mode = service.role, service.mode
        if service.mode is Mode.SIMPLEX:
            self.era.alone.set()  # FENCED is not alone: the host may not serve at all yet
        self._thread = ChannelThread()
        # Either role may come later (a re-integration swaps them): listen always.
        host, lport = cfg.log_listen or ("", 0)
        self._listener = await self._thread.run(LogListener.start(host, lport, cfg.log_key))
        loop = asyncio.get_running_loop()
        self._remote.append(
            asyncio.run_coroutine_threadsafe(self._serve_channels(loop), self._thread.loop)
        )
        self._tasks.append(asyncio.create_task(self._watch_mode(), name="replication-mode"))
        if self.role is Role.PRIMARY and service.mode is Mode.DUPLEX:
            self._start_connector()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for remote in self._remote:
            remote.cancel()
        if self._thread is not None:
            if self._primary is not None:
                await self._on_thread(self._primary.close())
            if self._listener is not None:
                await self._on_thread(self._listener.close())
            self._thread.stop()
        if self._marker is not None:
            self._marker.close()
        if self._view is not None:
            self._view.close()

    # ---- what every connection asks

    def conn_id(self, sock: socket.socket) -> ConnId | None:
        """SOCK's connection as both hosts name it; None if this host serves it alone.

        A replicated connection belongs to the pair standing now, so the mode is
        read at once rather than at the next poll: a re-integration may have
        formed a new pair (this host in another role) a moment before the
        client's SYN, and a connection taken into the ended era with the old
        role would wait for a peer that never answers (its request timed out)."""
        assert self._view is not None
        conn = self._view.connection_of(sock)
        if conn is None or conn.mode is not Mode.DUPLEX:
            return None
        self._follow_mode()
        return ConnId(conn.client_ip, conn.client_port, conn.client_isn)

    def mark_closing(self, sock: socket.socket) -> None:
        assert self._marker is not None
        self._marker(sock)

    async def pause(self, phase: Phase, conn: ConnId, request_no: int, era: Era) -> None:
        """The test hook: the first time PHASE is reached, say so and wait until ERA
        (the connection's) is alone."""
        if self.cfg.pause_at != phase or self._paused:
            return
        self._paused = True
        print(
            f"coral proxy: paused at {phase} (request {request_no} of {conn.ip}:{conn.port})",
            file=sys.stderr,
            flush=True,
        )
        await era.alone.wait()

    # ---- the primary

    async def log_reply(
        self,
        conn: ConnId,
        request_no: int,
        offset: int,
        data: bytes,
        final: bool,
        era: Era,
        digest: bool = False,
    ) -> bool:
        """Returns once the backup holds DATA (the reply bytes at OFFSET, or with
        DIGEST a digest_payload), or once ERA (the connection's) is alone. True:
        the backup asks for the body of the DIGEST record (its own differed)."""
        if digest:
            self.counters["digest_records"] += 1
        mismatch = await self._logged(
            lambda ch: ch.log_reply(conn, request_no, offset, data, final, digest), era
        )
        return bool(mismatch)

    async def log_close(self, conn: ConnId, offset: int, era: Era) -> None:
        """Returns once the backup knows CONN closes at OFFSET, or once ERA is alone."""
        await self._logged(lambda ch: ch.log_close(conn, offset), era)

    async def _logged(self, call: Any, era: Era) -> Any:
        """CALL(channel)'s result once it succeeds; None once ERA is alone (also while
        the call is under way: a backup whose link died never answers, its channel
        only times out minutes later)."""
        while not era.alone.is_set():
            channel = self._primary
            if channel is None:
                await _first(self._connected.wait(), era.alone.wait())
                continue
            logged = asyncio.ensure_future(self._on_thread(call(channel)))
            try:
                await _first(asyncio.shield(logged), era.alone.wait())
                if not logged.done():
                    logged.cancel()
                    return None
                return logged.result()
            except ChannelError as e:
                if self._primary is channel:
                    self.counters["channel_failures"] += 1
                    log.warning("logging channel lost (%s); waiting for the agent's verdict", e)
                    self._primary = None
                    self._connected.clear()
                await era.alone.wait()
        return None

    def _start_connector(self) -> None:
        self._tasks.append(asyncio.create_task(self._connect(), name="replication-connect"))

    async def _connect(self) -> None:
        """As the primary of a (new) pair: reach the backup's logging channel."""
        cfg = self.cfg
        assert cfg.log_peer is not None and cfg.log_key is not None
        host, port = cfg.log_peer
        era = self.era
        while not era.alone.is_set() and self._primary is None:
            try:
                self._primary = await self._on_thread(
                    PrimaryChannel.connect(host, port, cfg.log_key, local_host=cfg.log_local)
                )
            except (OSError, TimeoutError, ChannelError) as e:
                log.info("logging channel to %s:%s not up yet: %s", host, port, e)
                await asyncio.sleep(CONNECT_RETRY_S)
        self._connected.set()

    # ---- the backup

    def mailbox(self, conn: ConnId) -> asyncio.Queue[Delivery]:
        """CONN's log records, in order (created on first use by either side)."""
        return self._mailboxes.setdefault(conn, asyncio.Queue())

    def release(self, conn: ConnId) -> None:
        self._mailboxes.pop(conn, None)

    async def ack(self, channel: BackupChannel, record: LogRecord, mismatch: bool = False) -> None:
        """Tell the primary this host holds RECORD (it was written to the client's
        socket); MISMATCH: ask for the body of a DIGEST record."""
        with contextlib.suppress(ChannelError):  # a primary gone is noticed through the mode
            await self._on_thread(channel.ack(record.conn, record.request_no, mismatch))

    async def ack_close(self, channel: BackupChannel, record: LogRecord) -> None:
        with contextlib.suppress(ChannelError):
            await self._on_thread(channel.ack_close(record.conn))

    async def _serve_channels(self, proxy_loop: asyncio.AbstractEventLoop) -> None:
        """On the channel thread: each authenticated primary's records, to their mailboxes."""
        assert self._listener is not None
        while True:
            channel = await self._listener.accept()
            try:
                async for record in channel:
                    proxy_loop.call_soon_threadsafe(self._deliver, channel, record)
            except ChannelError as e:
                log.warning("logging channel from the primary ended: %s", e)

    def _deliver(self, channel: BackupChannel, record: LogRecord) -> None:
        self.counters["records"] += 1
        self.mailbox(record.conn).put_nowait((channel, record))

    # ---- plumbing

    async def _watch_mode(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.mode_poll_interval)
            self._follow_mode()

    def _follow_mode(self) -> None:
        """Follow the service's mode: SIMPLEX ends the current era (its connections
        are alone); DUPLEX after an ended era starts a new pair, with the role the
        data plane now gives this host (a re-integration makes the host that served
        alone the primary)."""
        assert self._view is not None
        vip, port = self.cfg.listen
        try:
            service = self._view.service(vip, port)
        except DataPlaneError:
            return  # the service is being reconfigured, or gone: nothing to follow
        previous, self._mode = self._mode, service.mode
        if self._mode is Mode.SIMPLEX and not self.era.alone.is_set():
            self.counters["takeovers"] += 1
            self.era.alone.set()
        elif self._mode is Mode.DUPLEX and previous is not Mode.DUPLEX:
            self._new_pair(service.role)

    def _new_pair(self, role: Role | None) -> None:
        if self.era.alone.is_set():
            self.counters["rejoins"] += 1
            self.era.superseded.set()
            self.era = Era()
        self.role = role or self.role
        stale, self._primary = self._primary, None
        self._connected.clear()
        if stale is not None:
            self._tasks.append(asyncio.create_task(self._on_thread(stale.close())))
        if self.role is Role.PRIMARY:
            self._start_connector()

    async def _on_thread(self, coro: Coroutine[Any, Any, Any]) -> Any:
        assert self._thread is not None
        return await self._thread.run(coro)


async def _first(*aws: Awaitable[Any]) -> None:
    """Wait until the first of AWS is done; cancel the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
