"""The logging channel: mutual authentication, MACed frames, acknowledgements that
gate the primary, backpressure, split replies, and clean failure when the peer goes."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest

from proxy.logchannel import (
    AuthenticationError,
    BackupChannel,
    ChannelThread,
    LogListener,
    LogRecord,
    PeerLost,
    PrimaryChannel,
    ProtocolError,
    VersionMismatch,
)
from proxy.logframe import (
    LENGTH_SIZE,
    ConnId,
    ErrorCode,
    Frame,
    FrameType,
    decode,
    encode,
    error_reason,
    nonce,
    split_length,
)

pytestmark = pytest.mark.timeout(10)

T = TypeVar("T")

KEY = b"k" * 32
CONN = ConnId("192.0.2.7", 40000, 123456789)


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(5):
            return await coro

    return asyncio.run(bounded())


@asynccontextmanager
async def channel_pair(
    max_inflight: int = 8 * 1024 * 1024,
) -> AsyncIterator[tuple[PrimaryChannel, BackupChannel, LogListener]]:
    listener = await LogListener.start("127.0.0.1", 0, KEY)
    host, port = listener.address
    primary = await PrimaryChannel.connect(host, port, KEY, max_inflight=max_inflight)
    backup = await listener.accept()
    try:
        yield primary, backup, listener
    finally:
        await primary.close()
        await backup.close()
        await listener.close()


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.005)


async def acking(backup: BackupChannel, seen: list[LogRecord]) -> None:
    """The backup proxy's loop, reduced to: keep each record, acknowledge it."""
    async for record in backup:
        seen.append(record)
        if record.type == FrameType.CLOSE:
            await backup.ack_close(record.conn)
        else:
            await backup.ack(record.conn, record.request_no)


async def raw_frame(reader: asyncio.StreamReader) -> Frame:
    prefix = await reader.readexactly(LENGTH_SIZE)
    frame, _, _ = decode(await reader.readexactly(split_length(prefix)))
    return frame


def test_frame_roundtrip_keeps_connection_identity() -> None:
    conn = ConnId("2001:db8::1", 443, 2**32 - 1)
    frame = Frame(FrameType.REPLY, conn, 7, 2**40, b"HTTP/1.1 200 OK\r\n")
    wire = encode(frame, KEY, 3)
    decoded, _, _ = decode(wire[LENGTH_SIZE:])
    assert decoded == frame
    v4, _, _ = decode(encode(Frame(FrameType.ACK, CONN))[LENGTH_SIZE:])
    assert v4.conn == CONN


def test_handshake_and_one_reply_and_close() -> None:
    async def main() -> None:
        async with channel_pair() as (primary, backup, listener):
            seen: list[LogRecord] = []
            task = asyncio.create_task(acking(backup, seen))
            await primary.log_reply(CONN, 1, 0, b"HTTP/1.1 200 OK\r\n\r\n", final=True)
            await primary.log_close(CONN, 19)
            assert seen == [
                LogRecord(FrameType.REPLY, CONN, 1, 0, b"HTTP/1.1 200 OK\r\n\r\n", True),
                LogRecord(FrameType.CLOSE, CONN, 0, 19),
            ]
            assert primary.inflight == 0
            assert listener.counters.auth_failures == listener.counters.malformed == 0
            task.cancel()

    run(main())


def test_wrong_key_is_refused_on_both_sides() -> None:
    async def main() -> None:
        listener = await LogListener.start("127.0.0.1", 0, KEY)
        try:
            with pytest.raises(AuthenticationError, match="wrong key"):
                await PrimaryChannel.connect(*listener.address, b"x" * 32)
            await until(lambda: listener.counters.auth_failures == 1)
            assert listener._accepted.empty()
        finally:
            await listener.close()

    run(main())


def test_forged_backup_proof_is_refused() -> None:
    """A peer that answers HELLO without the key (a replayed or made-up proof)."""

    done = asyncio.Event()

    async def fake_backup(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw_frame(reader)
        writer.write(encode(Frame(FrameType.HELLO, payload=b"B" + nonce() + nonce())))
        await writer.drain()
        answer = await raw_frame(reader)
        assert answer.type == FrameType.ERROR
        assert error_reason(answer)[0] == ErrorCode.AUTH
        writer.close()
        await writer.wait_closed()
        done.set()

    async def main() -> None:
        server = await asyncio.start_server(fake_backup, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            with pytest.raises(AuthenticationError, match="failed to prove"):
                await PrimaryChannel.connect("127.0.0.1", port, KEY)
            await done.wait()

    run(main())


@pytest.mark.parametrize("forgery", ["wrong key", "replayed frame", "bad length"])
def test_injected_frame_closes_the_channel(forgery: str) -> None:
    async def main() -> None:
        async with channel_pair() as (primary, backup, listener):
            seen: list[LogRecord] = []
            consumer = asyncio.create_task(acking(backup, seen))
            await primary.log_reply(CONN, 1, 0, b"genuine", final=True)
            link = primary._link  # an attacker writing into the channel's TCP stream
            if forgery == "wrong key":
                wire = encode(Frame(FrameType.REPLY, CONN, 2, 7, b"forged"), b"x" * 32, 1)
            elif forgery == "replayed frame":
                wire = encode(Frame(FrameType.REPLY, CONN, 1, 0, b"genuine"), link._send_key, 0)
            else:
                wire = b"\xff\xff\xff\xff"
            link.writer.write(wire)
            with pytest.raises(
                ProtocolError, match="bad MAC" if forgery != "bad length" else "malformed"
            ):
                await consumer
            assert [r.data for r in seen] == [b"genuine"]
            assert listener.counters.malformed == 1
            assert listener.counters.bad_mac == (forgery != "bad length")
            with pytest.raises(PeerLost):  # the backup told the primary, then closed
                await primary.log_reply(CONN, 2, 7, b"more", final=True)

    run(main())


def test_log_reply_returns_only_after_the_backup_acks() -> None:
    async def main() -> None:
        async with channel_pair() as (primary, backup, _):
            written = asyncio.Event()  # the backup proxy wrote the reply into its socket

            async def backup_proxy() -> None:
                record = await anext(backup)
                await written.wait()
                await backup.ack(record.conn, record.request_no)

            consumer = asyncio.create_task(backup_proxy())
            logged = asyncio.create_task(primary.log_reply(CONN, 1, 0, b"reply", final=True))
            await asyncio.sleep(0.1)
            assert not logged.done()
            assert primary.inflight == 5
            written.set()
            await logged
            await consumer

    run(main())


def test_many_concurrent_replies_are_pipelined_and_all_acked() -> None:
    async def main() -> None:
        async with channel_pair() as (primary, backup, listener):
            seen: list[LogRecord] = []
            consumer = asyncio.create_task(acking(backup, seen))
            conns = [ConnId("10.0.0.1", 1000 + i, i) for i in range(20)]
            calls: list[Awaitable[object]] = []
            for conn in conns:
                offset = 0
                for n in range(1, 11):
                    data = f"{conn.port}/{n}".encode() * n
                    calls.append(primary.log_reply(conn, n, offset, data, final=True))
                    offset += len(data)
            await asyncio.gather(*calls)
            assert len(seen) == 200
            assert listener.counters.acks == 200
            assert primary.inflight == 0
            for conn in conns:
                mine = [r for r in seen if r.conn == conn]
                assert [r.request_no for r in mine] == list(range(1, 11))
                assert b"".join(r.data for r in mine) == b"".join(
                    f"{conn.port}/{n}".encode() * n for n in range(1, 11)
                )
            consumer.cancel()

    run(main())


def test_backpressure_holds_the_sender_until_acks_arrive() -> None:
    async def main() -> None:
        async with channel_pair(max_inflight=1000) as (primary, backup, _):
            calls = [
                asyncio.create_task(primary.log_reply(CONN, n, (n - 1) * 400, b"x" * 400, True))
                for n in (1, 2, 3)
            ]
            first, second = await anext(backup), await anext(backup)
            with pytest.raises(TimeoutError):  # the third is not sent: 1200 > 1000 in flight
                await asyncio.wait_for(anext(backup), 0.1)
            assert primary.inflight == 800
            assert not any(c.done() for c in calls)
            await backup.ack(first.conn, first.request_no)
            await calls[0]
            third = await anext(backup)
            assert third.request_no == 3
            await backup.ack(second.conn, second.request_no)
            await backup.ack(third.conn, third.request_no)
            await asyncio.gather(*calls)
            assert primary.inflight == 0

    run(main())


def test_three_megabyte_reply_is_split_and_reassembled_exactly() -> None:
    async def main() -> None:
        async with channel_pair() as (primary, backup, listener):
            seen: list[LogRecord] = []
            consumer = asyncio.create_task(acking(backup, seen))
            data = os.urandom(3 * 1024 * 1024)
            await primary.log_reply(CONN, 4, 1234, data, final=True)
            assert seen == [LogRecord(FrameType.REPLY, CONN, 4, 1234, data, True)]
            assert listener.counters.frames_in == 12  # 256 KiB frames
            consumer.cancel()

    run(main())


def test_peer_disconnect_fails_pending_calls() -> None:
    async def main() -> None:
        async with channel_pair() as (primary, backup, _):
            calls = [
                asyncio.create_task(primary.log_reply(CONN, n, n * 10, b"y" * 10, True))
                for n in range(1, 6)
            ]
            await anext(backup)
            await backup.close()
            for call in calls:
                with pytest.raises(PeerLost, match="closed"):
                    await call
            with pytest.raises(PeerLost):
                await primary.log_close(CONN, 60)

    run(main())


def test_version_mismatch_is_refused_clearly() -> None:
    async def main() -> None:
        listener = await LogListener.start("127.0.0.1", 0, KEY)
        try:
            reader, writer = await asyncio.open_connection(*listener.address)
            writer.write(encode(Frame(FrameType.HELLO, payload=b"P" + nonce(), version=2)))
            answer = await raw_frame(reader)
            assert answer.type == FrameType.ERROR
            code, reason = error_reason(answer)
            assert code == ErrorCode.VERSION
            assert "version 2" in reason
            assert await reader.read() == b""
            writer.close()
            await writer.wait_closed()
            assert listener.counters.version_mismatches == 1
        finally:
            await listener.close()

    done = asyncio.Event()

    async def future_backup(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw_frame(reader)
        writer.write(encode(Frame(FrameType.HELLO, payload=b"B" + nonce() * 2, version=9)))
        await writer.drain()
        await reader.read()
        writer.close()
        await writer.wait_closed()
        done.set()

    async def primary_side() -> None:
        server = await asyncio.start_server(future_backup, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            with pytest.raises(VersionMismatch, match="version 9"):
                await PrimaryChannel.connect("127.0.0.1", port, KEY)
            await done.wait()

    run(main())
    run(primary_side())


def test_channel_thread_serves_the_proxy_loop() -> None:
    """The primary's channel lives on its own loop; the proxy's loop only awaits it."""

    async def main() -> None:
        listener = await LogListener.start("127.0.0.1", 0, KEY)
        thread = ChannelThread()
        try:
            primary = await thread.run(PrimaryChannel.connect(*listener.address, KEY))
            backup = await listener.accept()
            seen: list[LogRecord] = []
            consumer = asyncio.create_task(acking(backup, seen))
            await asyncio.gather(
                *(thread.run(primary.log_reply(CONN, n, 0, b"z", True)) for n in range(1, 51))
            )
            assert len(seen) == 50
            await thread.run(primary.close())
            await consumer  # iteration ends: the primary closed the channel
            await backup.close()
        finally:
            thread.stop()
            await listener.close()

    run(main())
