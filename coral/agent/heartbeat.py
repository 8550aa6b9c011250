"""Heartbeats between the two agents of a pair: sequenced UDP datagrams, MACed with
the pair's shared key, sent on every path between the hosts at once (the LAN and
the private link), so that one path failing is told apart from the peer failing.

Wire format (one datagram per beat; all integers big-endian, unsigned):

    4s   magic            b"CRHB"
    u8   version          PROTOCOL_VERSION; any other is refused (garbled)
    u8   sender length    1..MAX_SENDER
    u8   state length     0..MAX_STATE
    u8   reserved         0
    u16  info length      0..MAX_INFO
    u64  boot             the sender's boot id (time.time_ns() when its agent started)
    u64  seq              per boot, +1 per send round; the same on every path of a round
    u64  epoch            the sender's epoch
    u64  peer epoch       the receiver's epoch the sender acknowledges (0: none)
    u64  sent ns          the sender's time.monotonic_ns() at send
    u64  echo ns          sent ns of the newest beat the sender admitted from the receiver
    u64  echo delay ns    how long the sender held that echo before this send
    ...  sender           UTF-8 host name
    ...  state            ASCII state name
    ...  info             opaque bytes for the receiving agent (its TCP settings)
    32s  tag              HMAC-SHA256(key, every byte before it)

A frame is 99 to 658 bytes and must be exactly as long as its three lengths say.
The magic is covered by the tag, and differs from the witness's, so a MACed
message of one protocol is never accepted by the other.

The echo is the newest beat (by boot and seq) the sender admitted from the
receiver on any path, and the delay counts from its first copy's arrival, so
successive echoes never go back in time: a receiver that bounds its lease by
the echo (lease ends at echo + lease) is never cut short by a slow or lossy
path. From it the receiver measures a round trip on its own clock alone,
whatever the offset between the hosts' clocks: RTT = now - echo ns - echo
delay ns. On a path's stats that is the fastest path out, and that path back.

Replay protection: every beat is admitted at most once per (sender, path), and
only if it is newer than the last admitted one: a larger boot, or the same boot
and a larger seq (ReplayGuard). A restarted agent must therefore start with a
larger boot id, which time.time_ns() gives unless the wall clock went back
across the restart. A receiver that itself restarted has forgotten what it
admitted and may admit a recorded beat of the sender's current boot once; its
echo is a send time of the receiver's earlier run, so a lease bounded by the
echo gains nothing the genuine beat had not already given.

Endpoint, call order and ownership:

    ep = await HeartbeatEndpoint.open(name, key, paths, on_beat, expect_sender)
    ep.send(epoch, peer_epoch, state)       # once per interval, from the caller's timer
    ...on_beat(beat, path, rtt) is called on the loop for each admitted beat...
    ep.close()

The endpoint owns one non-blocking socket per path and reads them with the
loop's readers; it has no task of its own and never buffers a send: a beat
that cannot leave at once (link down, full buffer) is counted and dropped,
since a late heartbeat is worth nothing. Counters: sent and send_errors count
datagrams; received counts admitted beats; forged, garbled, foreign and
replayed count dropped datagrams; recv_errors counts failed reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from coral.agent.keys import MIN_KEY_SIZE

log = logging.getLogger(__name__)

MAGIC = b"CRHB"
PROTOCOL_VERSION = 1
MAX_SENDER = 32
MAX_STATE = 16
MAX_INFO = 512
TAG_SIZE = 32
DSCP_CS6 = 0xC0
"""The TOS byte for DSCP class selector 6 (network control): queued ahead of service traffic."""

_HEADER = struct.Struct(">4sBBBBH7Q")
HEADER_SIZE = _HEADER.size
MIN_FRAME = HEADER_SIZE + 1 + TAG_SIZE
MAX_FRAME = HEADER_SIZE + MAX_SENDER + MAX_STATE + MAX_INFO + TAG_SIZE
_U64 = (1 << 64) - 1
_READS_PER_WAKEUP = 64
"""Datagrams read per readiness callback, so a flood on one path cannot starve the loop."""


@dataclass(frozen=True)
class Beat:
    """One heartbeat, as sent and as received."""

    sender: str
    """Host name, UTF-8, at most MAX_SENDER bytes."""
    boot: int
    """The sender's boot id: time.time_ns() when its agent started; a restart is a larger one."""
    seq: int
    """Per boot, +1 per send round; the same seq on every path of one round."""
    epoch: int
    """The sender's current epoch (u64)."""
    peer_epoch: int
    """The receiver's epoch the sender acknowledges; 0 = none (it considers the receiver lost)."""
    state: str
    """The sender's agent state name (ASCII, at most MAX_STATE bytes), for status."""
    sent_ns: int
    """The sender's time.monotonic_ns() at send."""
    echo_ns: int
    """sent_ns of the newest beat the sender admitted from the receiver, on any path (0 if none)."""
    echo_delay_ns: int
    """How long the sender held that echo before sending."""
    info: bytes = b""
    """Opaque bytes from the sender's agent to the receiver's (at most MAX_INFO)."""


class HeartbeatError(Exception):
    """A datagram that is not a genuine beat. kind: "garbled" (malformed: magic, version,
    lengths, encoding) or "forged" (well formed, but the tag is not the key's)."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind = kind


def encode(beat: Beat, key: bytes) -> bytes:
    """The datagram for BEAT, tagged with KEY. ValueError if a field does not fit the format."""
    sender = beat.sender.encode()
    if not 1 <= len(sender) <= MAX_SENDER:
        raise ValueError(f"sender name {beat.sender!r}: 1 to {MAX_SENDER} bytes of UTF-8")
    if not beat.state.isascii() or len(beat.state) > MAX_STATE:
        raise ValueError(f"state {beat.state!r}: at most {MAX_STATE} ASCII characters")
    numbers = (
        beat.boot,
        beat.seq,
        beat.epoch,
        beat.peer_epoch,
        beat.sent_ns,
        beat.echo_ns,
        beat.echo_delay_ns,
    )
    if not all(0 <= n <= _U64 for n in numbers):
        raise ValueError(f"beat fields must be u64: {numbers}")
    if len(beat.info) > MAX_INFO:
        raise ValueError(f"info of {len(beat.info)} bytes: at most {MAX_INFO}")
    state = beat.state.encode("ascii")
    header = _HEADER.pack(
        MAGIC, PROTOCOL_VERSION, len(sender), len(state), 0, len(beat.info), *numbers
    )
    signed = header + sender + state + bytes(beat.info)
    return signed + _tag(key, signed)


def decode(data: bytes, key: bytes) -> Beat:
    """The beat in DATA. HeartbeatError (and nothing else, whatever DATA holds) if DATA
    is malformed ("garbled") or not tagged with KEY ("forged")."""
    if not MIN_FRAME <= len(data) <= MAX_FRAME:
        raise HeartbeatError("garbled", f"{len(data)} bytes")
    magic, version, sender_len, state_len, reserved, info_len, *numbers = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise HeartbeatError("garbled", f"magic {magic!r}")
    if version != PROTOCOL_VERSION:
        raise HeartbeatError("garbled", f"version {version}")
    if (
        reserved
        or not 1 <= sender_len <= MAX_SENDER
        or state_len > MAX_STATE
        or info_len > MAX_INFO
    ):
        raise HeartbeatError("garbled", "header fields out of range")
    state_end = HEADER_SIZE + sender_len + state_len
    body_end = state_end + info_len
    if len(data) != body_end + TAG_SIZE:
        raise HeartbeatError("garbled", f"{len(data)} bytes, the header says {body_end + 32}")
    if not hmac.compare_digest(_tag(key, data[:body_end]), data[body_end:]):
        raise HeartbeatError("forged", "tag mismatch")
    try:
        sender = data[HEADER_SIZE : HEADER_SIZE + sender_len].decode()
        state = data[HEADER_SIZE + sender_len : state_end].decode("ascii")
    except UnicodeDecodeError as e:
        raise HeartbeatError("garbled", str(e)) from None
    boot, seq, epoch, peer_epoch, sent_ns, echo_ns, echo_delay_ns = numbers
    info = bytes(data[state_end:body_end])
    return Beat(sender, boot, seq, epoch, peer_epoch, state, sent_ns, echo_ns, echo_delay_ns, info)


def _tag(key: bytes, signed: bytes) -> bytes:
    return hmac.digest(key, signed, hashlib.sha256)


class ReplayGuard:
    """Per (sender, path): admit a beat only if it is newer: a larger boot, or the same
    boot and a larger seq. Per path, because every path carries the same seq in a round.

    Only authenticated beats reach it, so its table grows only with genuine senders.
    """

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], tuple[int, int]] = {}

    def admit(self, beat: Beat, path: str) -> bool:
        """Whether BEAT is newer than every beat admitted before from its sender on PATH
        (if so it becomes the newest)."""
        slot = (beat.sender, path)
        mark = (beat.boot, beat.seq)
        last = self._last.get(slot)
        if last is not None and mark <= last:
            return False
        self._last[slot] = mark
        return True

    def last(self, sender: str, path: str) -> tuple[int, int] | None:
        """(boot, seq) of the newest beat admitted from SENDER on PATH, None if none."""
        return self._last.get((sender, path))


@dataclass
class PathStats:
    """What one path has shown lately: a path that stops receiving while another still
    does is a failed link, not a failed peer."""

    received: int = 0
    """Admitted beats."""
    last_seen_ns: int = 0
    """time.monotonic_ns() when the last admitted beat arrived; 0 if none yet."""
    rtt_s: float | None = None
    """The latest round trip measured by a beat arriving on this path: out on whichever
    path first carried our newest beat, back on this one (None until one is)."""
    sent: int = 0
    send_errors: int = 0


@dataclass
class _Path:
    name: str
    sock: socket.socket
    peer: tuple[str, int]
    stats: PathStats


OnBeat = Callable[[Beat, str, float | None], None]


class HeartbeatEndpoint:
    """One agent's end of the heartbeats: one UDP socket per path, on the caller's loop.

    Build it with `await HeartbeatEndpoint.open(...)`; see the module docstring for the
    call order. All methods must be called on the loop that opened it.
    """

    def __init__(
        self, name: str, key: bytes, on_beat: OnBeat, expect_sender: str, boot: int
    ) -> None:
        """Private: use open()."""
        self.name = name
        self.key = key
        self.on_beat = on_beat
        self.expect_sender = expect_sender
        self.boot = boot
        self.seq = 0
        """The seq of the last send round (0 before the first)."""
        self.guard = ReplayGuard()
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "sent",
                "received",
                "forged",
                "replayed",
                "garbled",
                "foreign",
                "send_errors",
                "recv_errors",
            ),
            0,
        )
        self._loop = asyncio.get_running_loop()
        self._paths: dict[str, _Path] = {}
        self._first_sent_ns = 0
        self._echo_mark = (0, 0)
        """(boot, seq) of the newest beat admitted, on any path: the one echoed."""
        self._echo_ns = 0
        """Its sent_ns."""
        self._echo_at_ns = 0
        """Our time.monotonic_ns() when its first copy arrived."""
        self._closed = False

    @classmethod
    async def open(
        cls,
        name: str,
        key: bytes,
        paths: dict[str, tuple[tuple[str, int], tuple[str, int]]],
        on_beat: OnBeat,
        expect_sender: str,
        *,
        boot: int | None = None,
    ) -> HeartbeatEndpoint:
        """Bind one socket per path and start reading them on the running loop.

        PATHS maps a path name ("lan", "private") to (local (ip, port), peer (ip, port)),
        numeric addresses of one family per path (port 0 binds any free port).
        ON_BEAT(beat, path, rtt_s or None) is called on the loop for each beat of
        EXPECT_SENDER that is genuine and new; beats naming any other sender are counted
        "foreign" and dropped. BOOT defaults to time.time_ns() now.
        ValueError for a bad argument; OSError if a socket cannot be bound (none is left open).
        """
        if len(key) < MIN_KEY_SIZE:
            raise ValueError(f"the heartbeat key needs at least {MIN_KEY_SIZE} bytes")
        for host in (name, expect_sender):
            if not 1 <= len(host.encode()) <= MAX_SENDER:
                raise ValueError(f"host name {host!r}: 1 to {MAX_SENDER} bytes of UTF-8")
        if name == expect_sender:
            raise ValueError(f"expecting beats from {name!r}, our own name")
        if not paths:
            raise ValueError("no heartbeat path")
        ep = cls(name, key, on_beat, expect_sender, time.time_ns() if boot is None else boot)
        try:
            for path, (local, peer) in paths.items():
                sock = _open_socket(path, local, peer)
                ep._paths[path] = _Path(path, sock, peer, PathStats())
                ep._loop.add_reader(sock.fileno(), ep._readable, ep._paths[path])
        except BaseException:
            ep.close()
            raise
        return ep

    @property
    def path_stats(self) -> dict[str, PathStats]:
        """Per path name: what it received, when last, its latest RTT."""
        return {name: p.stats for name, p in self._paths.items()}

    @property
    def addresses(self) -> dict[str, tuple[str, int]]:
        """Per path name, the local address the socket is bound to (the port, if 0 was asked)."""
        return {name: p.sock.getsockname()[:2] for name, p in self._paths.items()}

    def send(self, epoch: int, peer_epoch: int, state: str, info: bytes = b"") -> None:
        """One round: a beat with the next seq on every path, carrying INFO (opaque, at
        most MAX_INFO bytes) for the peer's agent. Never raises for a failed
        send (counted per path and in send_errors); ValueError if a field does not fit
        the format (nothing is sent, the seq is not used). A no-op once closed."""
        if self._closed:
            return
        now = time.monotonic_ns()
        seq = self.seq + 1
        echo_delay = now - self._echo_at_ns if self._echo_ns else 0
        frames = [
            (
                p,
                encode(
                    Beat(
                        sender=self.name,
                        boot=self.boot,
                        seq=seq,
                        epoch=epoch,
                        peer_epoch=peer_epoch,
                        state=state,
                        sent_ns=now,
                        echo_ns=self._echo_ns,
                        echo_delay_ns=echo_delay,
                        info=info,
                    ),
                    self.key,
                ),
            )
            for p in self._paths.values()
        ]
        self.seq = seq
        if not self._first_sent_ns:
            self._first_sent_ns = now
        for p, frame in frames:
            try:
                p.sock.sendto(frame, p.peer)
            except OSError as e:
                p.stats.send_errors += 1
                self.counters["send_errors"] += 1
                log.debug("heartbeat on %s to %s:%d: %s", p.name, *p.peer, e)
            else:
                p.stats.sent += 1
                self.counters["sent"] += 1

    def close(self) -> None:
        """Stop reading and close every socket. Idempotent."""
        self._closed = True
        for p in self._paths.values():
            if p.sock.fileno() >= 0:
                with contextlib.suppress(RuntimeError):  # the loop is already closed
                    self._loop.remove_reader(p.sock.fileno())
                p.sock.close()

    def _readable(self, path: _Path) -> None:
        for _ in range(_READS_PER_WAKEUP):
            try:
                data = path.sock.recv(MAX_FRAME + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.counters["recv_errors"] += 1
                log.debug("heartbeat on %s: %s", path.name, e)
                return
            self._datagram(data, path)
            if self._closed:
                return

    def _datagram(self, data: bytes, path: _Path) -> None:
        now = time.monotonic_ns()
        try:
            beat = decode(data, self.key)
        except HeartbeatError as e:
            self.counters[e.kind] += 1
            return
        if beat.sender != self.expect_sender:
            self.counters["foreign"] += 1
            return
        if not self.guard.admit(beat, path.name):
            self.counters["replayed"] += 1
            return
        self.counters["received"] += 1
        path.stats.received += 1
        path.stats.last_seen_ns = now
        if (beat.boot, beat.seq) > self._echo_mark:
            self._echo_mark = (beat.boot, beat.seq)
            self._echo_ns, self._echo_at_ns = beat.sent_ns, now
        rtt = None
        # An echo older than our first send belongs to an earlier run of this agent.
        if beat.echo_ns and self._first_sent_ns and beat.echo_ns >= self._first_sent_ns:
            rtt_ns = now - beat.echo_ns - beat.echo_delay_ns
            if rtt_ns >= 0:
                rtt = rtt_ns / 1e9
                path.stats.rtt_s = rtt
        self.on_beat(beat, path.name, rtt)


def _open_socket(path: str, local: tuple[str, int], peer: tuple[str, int]) -> socket.socket:
    """A non-blocking UDP socket bound to LOCAL, its beats marked DSCP CS6."""
    try:
        local_ip, peer_ip = ipaddress.ip_address(local[0]), ipaddress.ip_address(peer[0])
    except ValueError as e:
        raise ValueError(f"heartbeat path {path!r}: {e}") from None
    if local_ip.version != peer_ip.version:
        raise ValueError(f"heartbeat path {path!r}: {local[0]} cannot reach {peer[0]}")
    if not (0 <= local[1] < 65536 and 0 <= peer[1] < 65536):
        raise ValueError(f"heartbeat path {path!r}: port out of range")
    v6 = local_ip.version == 6
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            if v6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, DSCP_CS6)
            else:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, DSCP_CS6)
        except OSError as e:  # unprioritised beats still work
            log.warning("heartbeat path %s: cannot mark DSCP CS6: %s", path, e)
        sock.setblocking(False)
        sock.bind(local)
    except BaseException:
        sock.close()
        raise
    return sock
