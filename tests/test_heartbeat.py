"""Heartbeats: the wire format (every field, forgeries, garbage of every kind), replay
protection across restarts, and two endpoints on loopback exchanging beats on two paths."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import socket
import struct
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest

from coral.agent.heartbeat import (
    DSCP_CS6,
    HEADER_SIZE,
    MAX_FRAME,
    MAX_INFO,
    TAG_SIZE,
    Beat,
    HeartbeatEndpoint,
    HeartbeatError,
    ReplayGuard,
    decode,
    encode,
)

pytestmark = pytest.mark.timeout(10)

T = TypeVar("T")

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
BEAT = Beat(
    sender="primary",
    boot=1_700_000_000_000_000_000,
    seq=7,
    epoch=3,
    peer_epoch=2,
    state="duplex",
    sent_ns=123_456_789,
    echo_ns=123_000_000,
    echo_delay_ns=4_000,
    info=b'{"mtu":1500}',
)
U64 = 2**64 - 1


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(5):
            return await coro

    return asyncio.run(bounded())


def retag(signed: bytes, key: bytes = KEY) -> bytes:
    """SIGNED with a valid tag: a frame only a key holder could send."""
    import hashlib
    import hmac

    return signed + hmac.digest(key, signed, hashlib.sha256)


# ---- wire format


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"sender": "b" * 32},
        {"sender": "hôte-été"},  # UTF-8, more bytes than characters
        {"sender": "x"},
        {"boot": 0},
        {"boot": U64},
        {"seq": U64},
        {"epoch": U64, "peer_epoch": U64},
        {"peer_epoch": 0},
        {"state": ""},
        {"state": "s" * 16},
        {"sent_ns": U64, "echo_ns": 0, "echo_delay_ns": U64},
        {"info": b""},
        {"info": bytes(range(256)) * 2},
    ],
    ids=repr,
)
def test_every_field_round_trips(change: dict[str, Any]) -> None:
    beat = dataclasses.replace(BEAT, **change)
    frame = encode(beat, KEY)
    assert len(frame) <= MAX_FRAME
    assert decode(frame, KEY) == beat


def test_positional_fields_without_info() -> None:
    beat = Beat("a", 1, 2, 3, 4, "lost", 5, 6, 7)
    assert decode(encode(beat, KEY), KEY) == beat
    assert beat.info == b""


@pytest.mark.parametrize(
    "change",
    [
        {"sender": ""},
        {"sender": "b" * 33},
        {"sender": "é" * 17},  # 17 characters, 34 bytes
        {"state": "s" * 17},
        {"state": "état"},
        {"seq": -1},
        {"epoch": U64 + 1},
        {"echo_delay_ns": -5},
        {"info": b"i" * (MAX_INFO + 1)},
    ],
    ids=repr,
)
def test_encode_refuses_what_does_not_fit(change: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        encode(dataclasses.replace(BEAT, **change), KEY)


FRAME = encode(BEAT, KEY)
SIGNED = FRAME[:-TAG_SIZE]


def _header(**fields: int) -> bytes:
    """FRAME's signed part with header bytes overwritten at their offsets."""
    offsets = {"version": 4, "sender_len": 5, "state_len": 6, "reserved": 7}
    b = bytearray(SIGNED)
    for name, value in fields.items():
        b[offsets[name]] = value
    return bytes(b)


SENDER_AT = HEADER_SIZE
STATE_AT = HEADER_SIZE + len(BEAT.sender)


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (FRAME[:-1] + bytes([FRAME[-1] ^ 1]), "forged"),  # tag bit flipped
        (FRAME[:20] + bytes([FRAME[20] ^ 0x80]) + FRAME[21:], "forged"),  # seq changed
        (encode(BEAT, OTHER_KEY), "forged"),
        (encode(dataclasses.replace(BEAT, sender="mallory"), OTHER_KEY), "forged"),
        (b"", "garbled"),
        (FRAME[:HEADER_SIZE], "garbled"),
        (FRAME[:-1], "garbled"),
        (FRAME + b"\0", "garbled"),
        (b"\0" * len(FRAME), "garbled"),
        (b"XRHB" + FRAME[4:], "garbled"),  # magic
        (retag(_header(version=2)), "garbled"),
        (retag(_header(reserved=1)), "garbled"),
        (retag(_header(sender_len=0)), "garbled"),
        (retag(_header(sender_len=33)), "garbled"),
        (retag(_header(state_len=17)), "garbled"),
        (retag(SIGNED[:-1]), "garbled"),  # lengths disagree with the size
        (retag(SIGNED[:8] + b"\xff\xff" + SIGNED[10:]), "garbled"),  # info length
        # Well formed and genuinely tagged, but not the text the format requires:
        (retag(SIGNED[:SENDER_AT] + b"\xff" + SIGNED[SENDER_AT + 1 :]), "garbled"),
        (retag(SIGNED[:STATE_AT] + b"\xc3" + SIGNED[STATE_AT + 1 :]), "garbled"),
        (b"\xff" * MAX_FRAME, "garbled"),
        (b"\xff" * (MAX_FRAME + 1), "garbled"),
    ],
    ids=lambda v: v if isinstance(v, str) else f"{len(v)}B",
)
def test_bad_frames(data: bytes, kind: str) -> None:
    with pytest.raises(HeartbeatError) as e:
        decode(data, KEY)
    assert e.value.kind == kind


def test_fuzz_raises_only_heartbeat_errors() -> None:
    """Thousands of mutations of a valid frame, half of them re-tagged with the right key
    (so the parser past the MAC is fuzzed too): a beat or HeartbeatError, nothing else."""
    rng = random.Random(5)
    outcomes = {"ok": 0, "garbled": 0, "forged": 0}
    for i in range(6000):
        data = bytearray(FRAME if i % 2 else SIGNED)
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(5)
            pos = rng.randrange(len(data) + 1)
            if op == 0 and data:
                data[pos % len(data)] ^= 1 << rng.randrange(8)
            elif op == 1 and data:
                data[pos % len(data)] = rng.randrange(256)
            elif op == 2:
                del data[pos : pos + rng.randint(1, 8)]
            elif op == 3:
                data[pos:pos] = rng.randbytes(rng.randint(1, 8))
            else:
                data = bytearray(rng.randbytes(rng.randrange(MAX_FRAME + 8)))
        if i % 2 == 0:
            data = bytearray(retag(bytes(data)))
        try:
            beat = decode(bytes(data), KEY)
        except HeartbeatError as e:
            outcomes[e.kind] += 1
        else:
            assert isinstance(beat, Beat)
            outcomes["ok"] += 1
    # Every branch was reached: re-tagged mutations of numbers decode.
    assert all(outcomes.values()), outcomes


# ---- replay protection


@pytest.mark.parametrize(
    ("steps"),
    [
        pytest.param(
            [
                # sender, boot, seq, path, admitted
                ("p", 10, 1, "lan", True),
                ("p", 10, 1, "lan", False),  # the same beat again
                ("p", 10, 1, "private", True),  # the same round on the other path
                ("p", 10, 3, "lan", True),
                ("p", 10, 2, "lan", False),  # older seq, reordered or replayed
                ("p", 10, 2, "private", True),  # newer than the last on this path
                ("p", 9, 100, "lan", False),  # an old boot, whatever its seq
                ("p", 11, 1, "lan", True),  # a restart: new boot, seq from 1
                ("p", 10, 4, "lan", False),  # the previous boot is over
                ("b", 1, 1, "lan", True),  # senders are independent
            ],
            id="sequence",
        )
    ],
)
def test_replay_guard(steps: list[tuple[str, int, int, str, bool]]) -> None:
    guard = ReplayGuard()
    for sender, boot, seq, path, admitted in steps:
        beat = dataclasses.replace(BEAT, sender=sender, boot=boot, seq=seq)
        assert guard.admit(beat, path) is admitted, (sender, boot, seq, path)
    assert guard.last("p", "lan") == (11, 1)
    assert guard.last("p", "nowhere") is None


# ---- endpoints on loopback


def free_ports(n: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


Received = tuple[Beat, str, float | None]


class Host:
    """An endpoint and the beats it admitted, awaitable one at a time."""

    def __init__(self) -> None:
        self.beats: asyncio.Queue[Received] = asyncio.Queue()
        self.ep: HeartbeatEndpoint

    def on_beat(self, beat: Beat, path: str, rtt: float | None) -> None:
        self.beats.put_nowait((beat, path, rtt))

    async def next_round(self, n: int = 2) -> dict[str, Received]:
        """The next N beats, by path."""
        got = [await self.beats.get() for _ in range(n)]
        assert len({b.seq for b, _, _ in got}) == 1, got
        return {path: (b, path, rtt) for b, path, rtt in got}


def paths(ports: list[int], mine: int) -> dict[str, tuple[tuple[str, int], tuple[str, int]]]:
    """Host MINE (0 or 1) of a pair on ports [lan0, lan1, private0, private1]."""
    other = 1 - mine
    return {
        "lan": (("127.0.0.1", ports[mine]), ("127.0.0.1", ports[other])),
        "private": (("127.0.0.1", ports[2 + mine]), ("127.0.0.1", ports[2 + other])),
    }


@asynccontextmanager
async def pair() -> AsyncIterator[tuple[Host, Host, list[int]]]:
    ports = free_ports(4)
    a, b = Host(), Host()
    a.ep = await HeartbeatEndpoint.open("primary", KEY, paths(ports, 0), a.on_beat, "backup")
    b.ep = await HeartbeatEndpoint.open("backup", KEY, paths(ports, 1), b.on_beat, "primary")
    try:
        yield a, b, ports
    finally:
        a.ep.close()
        b.ep.close()


def test_two_endpoints_exchange_beats_on_two_paths() -> None:
    async def main() -> None:
        async with pair() as (a, b, _):
            a.ep.send(5, 0, "starting", info=b"settings")
            first = await b.next_round()
            assert set(first) == {"lan", "private"}
            for path, (beat, _, rtt) in first.items():
                assert (beat.sender, beat.boot, beat.seq) == ("primary", a.ep.boot, 1), path
                assert (beat.epoch, beat.peer_epoch, beat.state) == (5, 0, "starting")
                assert (beat.echo_ns, beat.echo_delay_ns, beat.info) == (0, 0, b"settings")
                assert rtt is None  # nothing of B's to echo yet
            assert first["lan"][0].sent_ns == first["private"][0].sent_ns

            b.ep.send(6, 5, "duplex")
            back = await a.next_round()
            for beat, _, rtt in back.values():
                assert (beat.sender, beat.seq, beat.epoch, beat.peer_epoch) == ("backup", 1, 6, 5)
                assert beat.echo_ns == first["lan"][0].sent_ns  # A's own send time
                assert beat.echo_delay_ns > 0
                assert rtt is not None and 0 <= rtt < 1

            a.ep.send(5, 6, "duplex")
            again = await b.next_round()
            for beat, _, rtt in again.values():
                assert beat.seq == 2 and beat.echo_ns == back["lan"][0].sent_ns
                assert rtt is not None and 0 <= rtt < 1

            assert a.ep.counters == {
                "sent": 4,
                "received": 2,
                "forged": 0,
                "replayed": 0,
                "garbled": 0,
                "foreign": 0,
                "send_errors": 0,
                "recv_errors": 0,
            }
            assert (b.ep.counters["sent"], b.ep.counters["received"]) == (2, 4)
            for name, st in b.ep.path_stats.items():
                assert (st.received, st.sent, st.send_errors) == (2, 1, 0), name
                assert st.last_seen_ns > 0 and st.rtt_s is not None
            assert a.ep.seq == 2 and b.ep.seq == 1

    run(main())


def test_forged_garbled_foreign_and_replayed_datagrams_are_counted_and_dropped() -> None:
    async def main() -> None:
        async with pair() as (a, b, ports):
            a.ep.send(5, 0, "starting")
            await b.next_round()
            genuine = dataclasses.replace(BEAT, sender="primary", boot=a.ep.boot, seq=1)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
                target = ("127.0.0.1", ports[1])  # B's LAN socket
                raw.sendto(encode(dataclasses.replace(genuine, seq=99), OTHER_KEY), target)
                raw.sendto(b"\x00garbage", target)
                raw.sendto(
                    encode(dataclasses.replace(genuine, sender="spare", seq=99), KEY), target
                )
                raw.sendto(encode(genuine, KEY), target)  # a recorded beat, sent again
                # Sent after them, so admitted after them: once it is in, they were judged.
                a.ep.send(5, 0, "starting")
                second = await b.next_round()
            assert all(beat.seq == 2 for beat, _, _ in second.values())
            assert b.beats.empty()
            c = b.ep.counters
            assert (c["forged"], c["garbled"], c["foreign"], c["replayed"]) == (1, 1, 1, 1)
            assert c["received"] == 4
            assert b.ep.path_stats["lan"].received == 2

    run(main())


def test_a_restarted_sender_is_admitted_and_its_old_boot_is_not() -> None:
    async def main() -> None:
        async with pair() as (a, b, ports):
            for _ in range(2):
                a.ep.send(5, 0, "starting")
                await b.next_round()
            old_boot = a.ep.boot
            a.ep.close()
            # The same ports again at once (SO_REUSEADDR), a new boot, seq from 1.
            a.ep = await HeartbeatEndpoint.open(
                "primary", KEY, paths(ports, 0), a.on_beat, "backup", boot=old_boot + 1
            )
            a.ep.send(5, 0, "starting")
            restarted = await b.next_round()
            assert {(bt.boot, bt.seq) for bt, _, _ in restarted.values()} == {(old_boot + 1, 1)}
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
                stale = dataclasses.replace(BEAT, sender="primary", boot=old_boot, seq=100)
                raw.sendto(encode(stale, KEY), ("127.0.0.1", ports[1]))
                a.ep.send(5, 0, "starting")
                await b.next_round()
            assert b.ep.counters["replayed"] == 1
            assert b.beats.empty()

    run(main())


def test_a_failed_send_is_counted_not_raised() -> None:
    async def main() -> None:
        async with pair() as (a, b, ports):
            b.ep.close()
            got: list[Received] = []
            # A peer at port 0: the kernel refuses the send at once (EINVAL), as it
            # refuses one to an unreachable network (ENETUNREACH) when a link is down.
            ep = await HeartbeatEndpoint.open(
                "backup",
                KEY,
                {
                    "lan": (("127.0.0.1", ports[1]), ("127.0.0.1", ports[0])),
                    "dead": (("127.0.0.1", 0), ("127.0.0.1", 0)),
                },
                lambda *r: got.append(r),
                "primary",
            )
            try:
                ep.send(6, 0, "starting")
                ep.send(6, 0, "starting")
                assert (ep.counters["sent"], ep.counters["send_errors"]) == (2, 2)
                assert ep.path_stats["dead"].send_errors == 2
                assert ep.path_stats["lan"].sent == 2
                beat, path, _ = await a.beats.get()
                assert (beat.sender, beat.seq, path) == ("backup", 1, "lan")
            finally:
                ep.close()
            ep.send(6, 0, "starting")  # closed: a no-op
            assert ep.counters["sent"] == 2

    run(main())


def test_beats_are_marked_dscp_cs6() -> None:
    async def main() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
            peer.bind(("127.0.0.1", 0))
            peer.setsockopt(socket.IPPROTO_IP, socket.IP_RECVTOS, 1)
            peer.setblocking(False)
            ep = await HeartbeatEndpoint.open(
                "primary",
                KEY,
                {"lan": (("127.0.0.1", 0), peer.getsockname())},
                lambda *r: None,
                "backup",
            )
            try:
                ep.send(1, 0, "starting")
                loop = asyncio.get_running_loop()
                ready: asyncio.Future[None] = loop.create_future()

                def readable() -> None:
                    if not ready.done():
                        ready.set_result(None)

                loop.add_reader(peer.fileno(), readable)
                await ready
                loop.remove_reader(peer.fileno())
                data, ancillary, _, _ = peer.recvmsg(MAX_FRAME, socket.CMSG_SPACE(1))
            finally:
                ep.close()
        assert decode(data, KEY).sender == "primary"
        tos = [c[2][0] for c in ancillary if c[:2] == (socket.IPPROTO_IP, socket.IP_TOS)]
        assert tos == [DSCP_CS6]

    run(main())


@pytest.mark.parametrize(
    ("name", "key", "expect", "path_map", "error"),
    [
        ("a", b"short", "b", {"lan": (("127.0.0.1", 0), ("127.0.0.1", 9))}, "16 bytes"),
        ("a", KEY, "a", {"lan": (("127.0.0.1", 0), ("127.0.0.1", 9))}, "our own name"),
        ("", KEY, "b", {"lan": (("127.0.0.1", 0), ("127.0.0.1", 9))}, "host name"),
        ("a", KEY, "b", {}, "no heartbeat path"),
        ("a", KEY, "b", {"lan": (("127.0.0.1", 0), ("::1", 9))}, "cannot reach"),
        ("a", KEY, "b", {"lan": (("localhost", 0), ("127.0.0.1", 9))}, "does not appear"),
        ("a", KEY, "b", {"lan": (("127.0.0.1", 0), ("127.0.0.1", 65536))}, "port"),
    ],
)
def test_open_refuses_bad_arguments(
    name: str,
    key: bytes,
    expect: str,
    path_map: dict[str, tuple[tuple[str, int], tuple[str, int]]],
    error: str,
) -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match=error):
            await HeartbeatEndpoint.open(name, key, path_map, lambda *r: None, expect)

    run(main())


def test_header_layout_is_stable() -> None:
    """The documented layout: magic, version, three lengths and reserved, seven u64s."""
    assert HEADER_SIZE == 66 and TAG_SIZE == 32
    magic, version, sender_len, state_len, reserved, info_len = struct.unpack_from(
        ">4sBBBBH", FRAME
    )
    assert (magic, version, reserved) == (b"CRHB", 1, 0)
    assert (sender_len, state_len, info_len) == (7, 6, len(BEAT.info))
    assert struct.unpack_from(">Q", FRAME, 10)[0] == BEAT.boot
    assert len(FRAME) == HEADER_SIZE + 7 + 6 + len(BEAT.info) + TAG_SIZE
