"""The outside witness: when the two hosts of a pair lose each other, at most one of
them may serve alone, and the witness decides which.

The witness is a third host both can reach through the router (in the lab, the
router's namespace). Each host that loses its peer asks it for the *sole grant*
for a new epoch; exactly one gets it, the other fences itself. While alone,
the holder renews its grant: a renewed grant is its evidence to renew its
lease (design brief, section 3, "Lease fencing").

Rules, per pair (one witness can serve several pairs, told apart by name):

- request(host, epoch, duration): if HOST holds an unexpired grant for EPOCH,
  renew it (expiry = now + duration). Else, if no grant is unexpired (or HOST
  holds it, under a lower epoch) and EPOCH is above every epoch ever granted,
  grant it to HOST. Else refuse, telling
  the holder (None if no grant is unexpired), the highest epoch granted and
  how long the holder's grant has left.
- release(host, epoch): if HOST holds EPOCH's unexpired grant, end it (the pair
  is duplex again); the epoch stays used.

Epochs only go up, so a grant, once refused, cannot be had later with an old
epoch, and a host that thaws with an old grant finds it renewed by nobody.
With a state file, the state is written atomically (and synced) before every
reply that changed it, so a restarted witness never grants an epoch again and
honours every grant it gave until it expires; expiries are stored as wall-clock
times, the one clock that survives a reboot. Without one, a restart forgets.

Wire format (one UDP datagram each way; integers big-endian, unsigned; the tag
is HMAC-SHA256 under the pair's shared key over every byte before it):

    request, client -> witness             reply, witness -> client
    4s   magic         b"CRWQ"             4s   magic          b"CRWR"
    u8   version       1                   u8   version        1
    u8   op            1 grant, 2 release  u8   op             the request's
    u8   pair length   0..32               u8   granted        1 if granted/renewed
    u8   host length   1..32               u8   holder length  0..32 (0: no grant)
    16s  nonce         random              16s  nonce          the request's
    u64  time ns       client time.time_ns u64  epoch          highest granted
    u64  epoch                             u32  remaining ms   the holder's grant
    u32  duration ms   (0 for release)     ...  holder         UTF-8
    ...  pair          UTF-8               32s  tag
    ...  host          UTF-8
    32s  tag

Freshness: the witness answers a request only if its time is within
MAX_SKEW_S of its own wall clock and its nonce was not seen in that window
(the hosts' and the witness's clocks must agree that well: NTP). A forged,
replayed, stale or garbled request is counted and gets no reply, so a
recorded request can never renew a grant a second time. The reply echoes the
nonce under the tag, so the client knows it is genuine and answers this very
request. Each attempt of a client call carries a new nonce (a retry of a
request the witness did see would otherwise look like a replay); a late reply
to an earlier attempt of the same call is accepted. Renewing and releasing
are idempotent, so an attempt that got through but whose reply was lost does
no harm.

Remaining times are conservative on the side that matters: a granted reply
rounds down and the client deducts the whole round trip (the grant counts
from when the request was sent); a refusal rounds up and is not reduced (the
other host's grant may last that long from now).

Client, call order and ownership:

    client = WitnessClient((host, port), key, name)
    await client.prepare()                            # optional: open the socket now
    grant = await client.request(epoch, duration_s)   # WitnessUnreachable if no valid reply
    await client.release(epoch)                       # best effort, never raises
    client.close()

It owns one UDP socket, opened by prepare() or on first use on the calling
loop. Server:

    server = await WitnessServer.start((host, port), key, state_file)
    ...server.counters, server.state()...
    await server.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coral.agent.keys import MIN_KEY_SIZE

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
REQUEST_MAGIC = b"CRWQ"
REPLY_MAGIC = b"CRWR"
NONCE_SIZE = 16
TAG_SIZE = 32
MAX_NAME = 32
MAX_SKEW_S = 5.0
"""A request whose time differs more from the witness's clock is refused as stale."""
MAX_NONCES = 1 << 16
"""Nonces remembered at once; beyond that requests are dropped (counted busy)."""
MAX_DURATION_MS = (1 << 32) - 1

_REQUEST = struct.Struct(">4sBBBB16sQQI")
_REPLY = struct.Struct(">4sBBBB16sQI")
_U64 = (1 << 64) - 1
_STATE_VERSION = 1


class Op(enum.IntEnum):
    GRANT = 1
    RELEASE = 2


@dataclass(frozen=True)
class Grant:
    """The witness's answer to a request."""

    granted: bool
    """Whether the caller holds the grant now (newly granted or renewed)."""
    holder: str | None
    """Who holds an unexpired grant (the caller if granted); None if nobody."""
    epoch: int
    """The holder's epoch; with no holder, the highest epoch ever granted (0: none)."""
    remaining_s: float
    """From now: if granted, at least this long left on the caller's grant; if
    refused, the holder's grant may last this long."""


class WitnessUnreachable(Exception):
    """No genuine reply after every attempt: the witness is down, or cut off from us."""


class WitnessError(Exception):
    """A message that is not a genuine witness message. kind: "garbled" or "forged"."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind = kind


@dataclass(frozen=True)
class Request:
    op: Op
    pair: str
    host: str
    nonce: bytes
    time_ns: int
    epoch: int
    duration_ms: int


@dataclass(frozen=True)
class Reply:
    op: Op
    granted: bool
    holder: str | None
    nonce: bytes
    epoch: int
    remaining_ms: int


def _names(pair: str, host: str | None) -> tuple[bytes, bytes]:
    p, h = pair.encode(), (host or "").encode()
    if len(p) > MAX_NAME or len(h) > MAX_NAME:
        raise ValueError(f"names of at most {MAX_NAME} bytes of UTF-8: {pair!r}, {host!r}")
    return p, h


def encode_request(req: Request, key: bytes) -> bytes:
    """The datagram for REQ under KEY; ValueError if a field does not fit."""
    pair, host = _names(req.pair, req.host)
    if not host or len(req.nonce) != NONCE_SIZE:
        raise ValueError("a request needs a host name and a 16-byte nonce")
    if not (0 <= req.time_ns <= _U64 and 0 <= req.epoch <= _U64):
        raise ValueError("time and epoch must be u64")
    if not 0 <= req.duration_ms <= MAX_DURATION_MS:
        raise ValueError(f"duration {req.duration_ms} ms does not fit 32 bits")
    header = _REQUEST.pack(
        REQUEST_MAGIC,
        PROTOCOL_VERSION,
        req.op,
        len(pair),
        len(host),
        req.nonce,
        req.time_ns,
        req.epoch,
        req.duration_ms,
    )
    return _sign(key, header + pair + host)


def decode_request(data: bytes, key: bytes) -> Request:
    """The request in DATA; WitnessError (and nothing else) if garbled or forged."""
    fields = _split(data, key, _REQUEST, REQUEST_MAGIC, ((3, 0), (4, 1)))
    _, _, op, pair_len, host_len, nonce, time_ns, epoch, duration_ms = fields.header
    pair, host = fields.text(pair_len), fields.text(host_len)
    return Request(_op(op), pair, host, nonce, time_ns, epoch, duration_ms)


def encode_reply(reply: Reply, key: bytes) -> bytes:
    """The datagram for REPLY under KEY; ValueError if a field does not fit."""
    _, holder = _names("", reply.holder)
    header = _REPLY.pack(
        REPLY_MAGIC,
        PROTOCOL_VERSION,
        reply.op,
        int(reply.granted),
        len(holder),
        reply.nonce,
        reply.epoch,
        min(reply.remaining_ms, MAX_DURATION_MS),
    )
    return _sign(key, header + holder)


def decode_reply(data: bytes, key: bytes) -> Reply:
    """The reply in DATA; WitnessError (and nothing else) if garbled or forged."""
    fields = _split(data, key, _REPLY, REPLY_MAGIC, ((4, 0),))
    _, _, op, granted, holder_len, nonce, epoch, remaining_ms = fields.header
    if granted > 1:
        raise WitnessError("garbled", f"granted {granted}")
    holder = fields.text(holder_len) or None
    return Reply(_op(op), bool(granted), holder, nonce, epoch, remaining_ms)


def _sign(key: bytes, signed: bytes) -> bytes:
    return signed + hmac.digest(key, signed, hashlib.sha256)


def _op(value: int) -> Op:
    try:
        return Op(value)
    except ValueError:
        raise WitnessError("garbled", f"op {value}") from None


class _Fields:
    """A datagram whose size, magic, version, name lengths and tag are checked; its
    names read in order."""

    def __init__(self, body: bytes, header: tuple[Any, ...], offset: int) -> None:
        self.body, self.header, self.offset = body, header, offset

    def text(self, n: int) -> str:
        raw = self.body[self.offset : self.offset + n]
        self.offset += n
        try:
            return raw.decode()
        except UnicodeDecodeError as e:
            raise WitnessError("garbled", str(e)) from None


def _split(
    data: bytes, key: bytes, header: struct.Struct, magic: bytes, names: tuple[tuple[int, int], ...]
) -> _Fields:
    """Check DATA's form, then its tag (so that a forgery is told apart from noise).
    NAMES: (index in the header, minimum) of each name length field."""
    if not header.size + TAG_SIZE <= len(data) <= header.size + 2 * MAX_NAME + TAG_SIZE:
        raise WitnessError("garbled", f"{len(data)} bytes")
    fields = header.unpack_from(data)
    if fields[0] != magic or fields[1] != PROTOCOL_VERSION:
        raise WitnessError("garbled", f"magic {fields[0]!r}, version {fields[1]}")
    if not all(low <= fields[i] <= MAX_NAME for i, low in names):
        raise WitnessError("garbled", "name lengths out of range")
    if len(data) != header.size + sum(fields[i] for i, _ in names) + TAG_SIZE:
        raise WitnessError("garbled", "length disagrees with the header")
    body, tag = data[:-TAG_SIZE], data[-TAG_SIZE:]
    if not hmac.compare_digest(hmac.digest(key, body, hashlib.sha256), tag):
        raise WitnessError("forged", "tag mismatch")
    return _Fields(body, fields, header.size)


def _check_key(key: bytes) -> None:
    if len(key) < MIN_KEY_SIZE:
        raise ValueError(f"the witness key needs at least {MIN_KEY_SIZE} bytes")


# ---- client


class _ClientProtocol(asyncio.DatagramProtocol):
    def __init__(self, client: WitnessClient) -> None:
        self.client = client

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.client._datagram(data)

    def error_received(self, exc: Exception) -> None:
        # A failed send, or an ICMP error (port unreachable): the attempt times out.
        self.client.counters["send_errors"] += 1


class WitnessClient:
    """One host's side of the witness; see the module docstring for the call order.

    Calls may overlap (a request and a release). All calls must come from one loop.
    """

    def __init__(
        self,
        address: tuple[str, int],
        key: bytes,
        name: str,
        timeout_s: float = 0.05,
        attempts: int = 3,
        *,
        pair: str = "",
        local: tuple[str, int] | None = None,
    ) -> None:
        """ADDRESS is the witness's; NAME this host's; PAIR names the pair at a witness
        that serves several; LOCAL an address to send from (to pick the path).
        Each call makes up to ATTEMPTS attempts, TIMEOUT_S apart."""
        _check_key(key)
        _names(pair, name)
        if not name:
            raise ValueError("the host needs a name")
        if attempts < 1 or not timeout_s > 0:
            raise ValueError("at least one attempt, and a positive timeout")
        self.address = address
        self.key = key
        self.name = name
        self.pair = pair
        self.local = local
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.reachable: bool | None = None
        """Whether the last call got a genuine reply (None before the first call)."""
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "requests",
                "releases",
                "granted",
                "refused",
                "replies",
                "timeouts",
                "unreachable",
                "forged",
                "garbled",
                "stale",
                "send_errors",
            ),
            0,
        )
        self._transport: asyncio.DatagramTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[bytes, tuple[asyncio.Future[tuple[Reply, int]], Op, int]] = {}

    async def request(self, epoch: int, duration_s: float) -> Grant:
        """Ask for (or renew) the sole grant for EPOCH, for DURATION_S from now.
        WitnessUnreachable after attempts x timeout without a genuine reply."""
        if not (math.isfinite(duration_s) and 1 <= duration_s * 1e3 <= MAX_DURATION_MS):
            raise ValueError(f"grant duration {duration_s!r} s out of range")
        duration_ms = math.floor(duration_s * 1e3)  # never more than asked
        if not 0 < epoch <= _U64:
            raise ValueError(f"epoch {epoch} out of range")
        self.counters["requests"] += 1
        answer = await self._exchange(Op.GRANT, epoch, duration_ms)
        if answer is None:
            self.counters["unreachable"] += 1
            raise WitnessUnreachable(
                f"no reply from the witness at {self.address[0]}:{self.address[1]} "
                f"after {self.attempts} x {self.timeout_s * 1e3:.0f} ms"
            )
        reply, sent_ns = answer
        remaining = reply.remaining_ms / 1e3
        if reply.granted:
            self.counters["granted"] += 1
            remaining = max(0.0, remaining - (time.monotonic_ns() - sent_ns) / 1e9)
        else:
            self.counters["refused"] += 1
        return Grant(reply.granted, reply.holder, reply.epoch, remaining)

    async def release(self, epoch: int) -> None:
        """Give back EPOCH's grant, if this host holds it. Best effort: never raises for
        an unreachable witness (the grant then simply expires)."""
        self.counters["releases"] += 1
        if await self._exchange(Op.RELEASE, epoch, 0) is None:
            self.counters["unreachable"] += 1

    async def prepare(self) -> None:
        """Open the socket ahead of the first call, so that a takeover does not
        pay for it. A failure is left for that call to report."""
        with contextlib.suppress(OSError):
            await self._open(asyncio.get_running_loop())

    def close(self) -> None:
        """Close the socket; a later call opens a new one."""
        if self._transport is not None:
            with contextlib.suppress(RuntimeError):  # its loop is already closed
                self._transport.close()
            self._transport = None

    async def _exchange(self, op: Op, epoch: int, duration_ms: int) -> tuple[Reply, int] | None:
        """(the reply, when its attempt was sent) or None after the last attempt."""
        loop = asyncio.get_running_loop()
        try:
            transport = await self._open(loop)
        except OSError as e:
            log.warning("witness at %s:%d: %s", *self.address[:2], e)
            self.counters["send_errors"] += 1
            self.reachable = False
            return None
        done: asyncio.Future[tuple[Reply, int]] = loop.create_future()
        nonces = []
        try:
            for _ in range(self.attempts):
                nonce = secrets.token_bytes(NONCE_SIZE)
                nonces.append(nonce)
                sent_ns = time.monotonic_ns()
                self._pending[nonce] = (done, op, sent_ns)
                request = Request(
                    op, self.pair, self.name, nonce, time.time_ns(), epoch, duration_ms
                )
                try:
                    transport.sendto(encode_request(request, self.key))
                except OSError:
                    self.counters["send_errors"] += 1
                try:
                    async with asyncio.timeout(self.timeout_s):
                        answer = await asyncio.shield(done)
                except TimeoutError:
                    self.counters["timeouts"] += 1
                    continue
                self.reachable = True
                return answer
            self.reachable = False
            return None
        finally:
            for nonce in nonces:
                del self._pending[nonce]
            done.cancel()

    async def _open(self, loop: asyncio.AbstractEventLoop) -> asyncio.DatagramTransport:
        if self._transport is None or self._loop is not loop or self._transport.is_closing():
            self.close()
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _ClientProtocol(self), remote_addr=self.address, local_addr=self.local
            )
            self._transport, self._loop = transport, loop
        return self._transport

    def _datagram(self, data: bytes) -> None:
        try:
            reply = decode_reply(data, self.key)
        except WitnessError as e:
            self.counters[e.kind] += 1
            return
        pending = self._pending.get(reply.nonce)
        if pending is None or pending[0].done() or pending[1] != reply.op:
            self.counters["stale"] += 1  # a late duplicate, or a replayed reply
            return
        self.counters["replies"] += 1
        pending[0].set_result((reply, pending[2]))


# ---- server


@dataclass
class _PairState:
    holder: str | None = None
    epoch: int = 0
    """The highest epoch ever granted (the holder's, while there is one)."""
    deadline_ns: int = 0
    """time.monotonic_ns() when the holder's grant expires."""

    def live_holder(self, now_ns: int) -> str | None:
        return self.holder if self.holder is not None and now_ns < self.deadline_ns else None


class _ServerProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: WitnessServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: Any) -> None:
        reply = self.server._datagram(data)
        if reply is not None and self.server._transport is not None:
            self.server._transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        self.server.counters["send_errors"] += 1


class WitnessServer:
    """The witness. Build it with `await WitnessServer.start(...)`; it serves on the
    running loop until close()."""

    def __init__(self, key: bytes, state_file: str | None) -> None:
        """Private: use start()."""
        _check_key(key)
        self.key = key
        self.state_file = None if state_file is None else Path(state_file)
        self.address: tuple[str, int] = ("", 0)
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "requests",
                "granted",
                "renewed",
                "refused",
                "release_requests",
                "released",
                "forged",
                "replayed",
                "garbled",
                "busy",
                "store_errors",
                "send_errors",
            ),
            0,
        )
        self._pairs: dict[str, _PairState] = {}
        self._nonces: OrderedDict[bytes, int] = OrderedDict()
        """Nonces seen, oldest first, each with when it may be forgotten (monotonic ns)."""
        self._transport: asyncio.DatagramTransport | None = None

    @classmethod
    async def start(
        cls, listen: tuple[str, int], key: bytes, state_file: str | None
    ) -> WitnessServer:
        """Load STATE_FILE (if given and present) and serve on LISTEN (port 0: any).
        ValueError for a short key or a state file that is not one; OSError (its
        strerror saying what failed) if the state file cannot be written or LISTEN
        cannot be bound."""
        server = cls(key, state_file)
        server._load()
        try:  # an unwritable state file is an error now, not at the first grant
            server._write()
        except OSError as e:
            raise OSError(e.errno, f"cannot write the state file: {e}") from None
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _ServerProtocol(server), local_addr=listen
            )
        except OSError as e:
            raise OSError(e.errno, f"cannot listen on {listen[0]}:{listen[1]}: {e}") from None
        server._transport = transport
        server.address = transport.get_extra_info("sockname")[:2]
        log.debug("witness on %s:%d", *server.address)
        return server

    def state(self) -> dict[str, Any]:
        """Per pair: the holder (None if no grant is unexpired), the highest epoch
        granted and the holder's remaining seconds."""
        now = time.monotonic_ns()
        return {
            "pairs": {
                name: {
                    "holder": st.live_holder(now),
                    "epoch": st.epoch,
                    "remaining_s": round(max(0, st.deadline_ns - now) / 1e9, 3)
                    if st.live_holder(now)
                    else 0.0,
                }
                for name, st in sorted(self._pairs.items())
            }
        }

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
            await asyncio.sleep(0)  # let the transport finish closing on the loop

    # ---- one datagram

    def _datagram(self, data: bytes) -> bytes | None:
        """The reply to DATA, or None if it deserves none."""
        try:
            req = decode_request(data, self.key)
        except WitnessError as e:
            self.counters[e.kind] += 1
            return None
        if not self._fresh(req):
            return None
        if req.op is Op.GRANT:
            self.counters["requests"] += 1
            answer = self._request(req.pair, req.host, req.epoch, req.duration_ms)
        else:
            self.counters["release_requests"] += 1
            answer = self._release(req.pair, req.host, req.epoch)
        if answer is None:
            return None
        granted, holder, epoch, remaining_ms = answer
        return encode_reply(
            Reply(req.op, granted, holder, req.nonce, epoch, remaining_ms), self.key
        )

    def _fresh(self, req: Request) -> bool:
        """Whether REQ is recent and new; remembers its nonce if so."""
        now = time.monotonic_ns()
        while self._nonces and next(iter(self._nonces.values())) <= now:
            self._nonces.popitem(last=False)
        if abs(time.time_ns() - req.time_ns) > MAX_SKEW_S * 1e9 or req.nonce in self._nonces:
            self.counters["replayed"] += 1
            return False
        if len(self._nonces) >= MAX_NONCES:
            self.counters["busy"] += 1
            return False
        # A nonce is acceptable for 2 x MAX_SKEW_S around its time: remember it that long.
        self._nonces[req.nonce] = now + round(2 * MAX_SKEW_S * 1e9)
        return True

    def _request(
        self, pair: str, host: str, epoch: int, duration_ms: int
    ) -> tuple[bool, str | None, int, int] | None:
        st = self._pairs.setdefault(pair, _PairState())
        now = time.monotonic_ns()
        holder = st.live_holder(now)
        deadline = now + duration_ms * 1_000_000
        if holder == host and epoch == st.epoch:
            outcome = "renewed"
        elif holder in (None, host) and epoch > st.epoch:  # the holder may move up
            outcome = "granted"
        else:
            self.counters["refused"] += 1
            if holder != host:
                log.info("pair %r: refused %s epoch %d (holder %s)", pair, host, epoch, holder)
            remaining = -(-(st.deadline_ns - now) // 1_000_000) if holder else 0  # round up
            return False, holder, st.epoch, remaining
        before = dataclasses.replace(st)
        st.holder, st.epoch, st.deadline_ns = host, epoch, deadline
        if not self._store():
            self._pairs[pair] = before
            return None  # not durable: not granted (the client retries, or fences)
        self.counters[outcome] += 1
        if outcome == "granted":
            log.info("pair %r: granted epoch %d to %s", pair, epoch, host)
        return True, host, epoch, duration_ms

    def _release(self, pair: str, host: str, epoch: int) -> tuple[bool, str | None, int, int]:
        st = self._pairs.setdefault(pair, _PairState())
        now = time.monotonic_ns()
        holder = st.live_holder(now)
        if holder == host and epoch == st.epoch:
            st.holder, st.deadline_ns = None, 0
            self.counters["released"] += 1
            log.info("pair %r: %s released epoch %d", pair, host, epoch)
            # A failed store only keeps the grant on disk until it expires: still safe.
            self._store()
            holder = None
        remaining = -(-(st.deadline_ns - now) // 1_000_000) if holder else 0
        return False, holder, st.epoch, remaining

    # ---- the state file

    def _load(self) -> None:
        if self.state_file is None:
            return
        try:
            text = self.state_file.read_text()
        except FileNotFoundError:
            return
        try:
            doc = json.loads(text)
            if doc["version"] != _STATE_VERSION:
                raise ValueError(f"version {doc['version']}")
            now_ns, wall = time.monotonic_ns(), time.time()
            for name, entry in doc["pairs"].items():
                holder, epoch = entry["holder"], int(entry["epoch"])
                if not (holder is None or isinstance(holder, str)) or not 0 <= epoch <= _U64:
                    raise ValueError(f"pair {name!r}: {entry}")
                left = float(entry["expires_at"]) - wall
                deadline = now_ns + round(left * 1e9) if holder and left > 0 else 0
                self._pairs[str(name)] = _PairState(holder if deadline else None, epoch, deadline)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{self.state_file}: not a witness state file ({e})") from None

    def _store(self) -> bool:
        """Write the state file; False, logged and counted, if that failed."""
        try:
            self._write()
        except OSError as e:
            self.counters["store_errors"] += 1
            log.error("witness state %s: %s", self.state_file, e)
            return False
        return True

    def _write(self) -> None:
        """Write the state atomically (temporary file, fsync, rename, fsync the
        directory), if there is a state file; OSError if that failed."""
        if self.state_file is None:
            return
        now_ns, wall = time.monotonic_ns(), time.time()
        doc = {
            "version": _STATE_VERSION,
            "pairs": {
                name: {
                    "holder": st.live_holder(now_ns),
                    "epoch": st.epoch,
                    "expires_at": wall + (st.deadline_ns - now_ns) / 1e9
                    if st.live_holder(now_ns)
                    else 0,
                }
                for name, st in self._pairs.items()
            },
        }
        path = self.state_file
        tmp = path.with_name(path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
