"""Wire format of the logging channel between the primary's and the backup's proxies.

Every frame is length-prefixed, has a fixed header and ends with a 32-byte
HMAC-SHA256 tag (all integers big-endian):

    u32  length            bytes after this field: HEADER_SIZE + payload + TAG_SIZE
    u8   version           PROTOCOL_VERSION; any other value is refused with ERROR
    u8   type              FrameType
    u8   flags             Flag
    u8   reserved          0
    16s  client ip         IPv6, or IPv4-mapped IPv6 (::ffff:a.b.c.d)
    u16  client port
    u32  client ISN        the client's initial sequence number: a reused 4-tuple
                           is a different connection
    u64  request number    1, 2, ... on the connection (0 where none applies)
    u64  offset            position in the connection's reply stream
    u32  payload length    must agree with length
    ...  payload
    32s  tag

The length comes first so that a frame of any version can be read whole and
answered with a clear ERROR instead of desynchronising the stream.

Before the session keys exist (HELLO, the primary's AUTH, ERROR during the
handshake) the tag is zero: those frames are authenticated by the proofs they
carry. Every later frame's tag is HMAC(direction key, frame sequence number ||
header || payload); the sequence number counts MACed frames per direction
from 0 and is not sent, so a forged, replayed, dropped or reordered frame
fails its tag.

Handshake (mutual challenge-response over a shared key K):

    P -> B  HELLO  b"P" + nonce_p
    B -> P  HELLO  b"B" + nonce_b + HMAC(K, "coral-log backup"  + nonce_p + nonce_b)
    P -> B  AUTH   HMAC(K, "coral-log primary" + nonce_p + nonce_b)
    B -> P  AUTH   (empty, first MACed frame: the backup accepted the primary)

The role label in each proof stops a reflected proof; fresh nonces on both
sides stop a replayed one.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import secrets
import struct
from dataclasses import dataclass
from typing import NamedTuple

PROTOCOL_VERSION = 1
NONCE_SIZE = 32
TAG_SIZE = 32
MAX_PAYLOAD = 256 * 1024
"""Larger replies are split over several REPLY frames (Flag.MORE)."""

_LENGTH = struct.Struct(">I")
LENGTH_SIZE = _LENGTH.size
_HEADER = struct.Struct(">BBBB16sHIQQI")
HEADER_SIZE = _HEADER.size
MAX_FRAME = HEADER_SIZE + MAX_PAYLOAD + TAG_SIZE
_NO_TAG = bytes(TAG_SIZE)


class FrameType(enum.IntEnum):
    HELLO = 1
    AUTH = 2
    REPLY = 3
    """Bytes of the reply to request n, at reply-stream offset o."""
    ACK = 4
    """(conn, request n) logged up to offset o (with Flag.CLOSE: the close at o)."""
    CLOSE = 5
    """The primary closes the connection at reply-stream offset o."""
    ERROR = 6
    """Payload: ErrorCode byte + UTF-8 reason; the sender closes after it."""


class Flag(enum.IntFlag):
    NONE = 0
    FINAL = 1
    """REPLY: the record ends the reply to request n."""
    MORE = 2
    """REPLY: more frames of the same record follow (a split record)."""
    CLOSE = 4
    """ACK: acknowledges a CLOSE rather than a REPLY."""
    MISMATCH = 16
    """ACK of a DIGEST record: the backup's own body differs; log the real one."""
    DIGEST = 8
    """REPLY: deterministic content. The payload is the reply's head, then the
    body's SHA-256 and length (digest_payload): the backup generates the body."""


class ErrorCode(enum.IntEnum):
    VERSION = 1
    AUTH = 2
    PROTOCOL = 3


class ConnId(NamedTuple):
    """A client connection, as both hosts see it."""

    ip: str
    port: int
    isn: int


NO_CONN = ConnId("::", 0, 0)


class FrameError(Exception):
    """A frame that cannot be parsed (length, header or payload length wrong)."""


@dataclass(frozen=True)
class Frame:
    """One frame, decoded; which fields matter depends on the type."""

    type: FrameType
    conn: ConnId = NO_CONN
    request_no: int = 0
    offset: int = 0
    payload: bytes = b""
    flags: Flag = Flag.NONE
    version: int = PROTOCOL_VERSION


def _pack_ip(ip: str) -> bytes:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(f"::ffff:{addr}").packed
    return addr.packed


def _unpack_ip(packed: bytes) -> str:
    addr = ipaddress.IPv6Address(packed)
    return str(addr.ipv4_mapped or addr)


def encode(frame: Frame, key: bytes | None = None, seq: int = 0) -> bytes:
    """The frame's bytes; tagged with KEY and sequence number SEQ, or zero-tagged if no KEY."""
    header = _HEADER.pack(
        frame.version,
        frame.type,
        frame.flags,
        0,
        _pack_ip(frame.conn.ip),
        frame.conn.port,
        frame.conn.isn,
        frame.request_no,
        frame.offset,
        len(frame.payload),
    )
    tag = _NO_TAG if key is None else _tag(key, seq, header, frame.payload)
    length = HEADER_SIZE + len(frame.payload) + TAG_SIZE
    return _LENGTH.pack(length) + header + frame.payload + tag


def split_length(prefix: bytes) -> int:
    """The length field's value; FrameError if no valid frame can be that long."""
    (length,) = _LENGTH.unpack(prefix)
    if not HEADER_SIZE + TAG_SIZE <= length <= MAX_FRAME:
        raise FrameError(f"frame length {length} out of range")
    return length


def decode(body: bytes) -> tuple[Frame, bytes, bytes]:
    """(frame, signed bytes, tag) from the bytes after the length field.

    The version is not checked here: the caller answers a foreign version.
    """
    header, tag = body[:HEADER_SIZE], body[-TAG_SIZE:]
    version, ftype, flags, _, ip, port, isn, request_no, offset, size = _HEADER.unpack(header)
    payload = body[HEADER_SIZE:-TAG_SIZE]
    if size != len(payload):
        raise FrameError(f"payload length {size} disagrees with frame length")
    try:
        frame = Frame(
            FrameType(ftype),
            ConnId(_unpack_ip(ip), port, isn),
            request_no,
            offset,
            payload,
            Flag(flags),
            version,
        )
    except ValueError as e:
        raise FrameError(str(e)) from None
    return frame, body[:-TAG_SIZE], tag


def verify(key: bytes, seq: int, signed: bytes, tag: bytes) -> bool:
    """Whether TAG is the MAC of SIGNED (header and payload) as frame SEQ under KEY."""
    expected = _tag(key, seq, signed[:HEADER_SIZE], signed[HEADER_SIZE:])
    return hmac.compare_digest(expected, tag)


def _tag(key: bytes, seq: int, header: bytes, payload: bytes) -> bytes:
    mac = hmac.new(key, seq.to_bytes(8, "big"), hashlib.sha256)
    mac.update(header)
    mac.update(payload)
    return mac.digest()


def nonce() -> bytes:
    return secrets.token_bytes(NONCE_SIZE)


def proof(key: bytes, role: bytes, nonce_p: bytes, nonce_b: bytes) -> bytes:
    """Proof that the sender in ROLE (b"primary" or b"backup") holds KEY, over both nonces."""
    return hmac.digest(key, b"coral-log " + role + nonce_p + nonce_b, "sha256")


def session_keys(key: bytes, nonce_p: bytes, nonce_b: bytes) -> tuple[bytes, bytes]:
    """(primary->backup key, backup->primary key) for this session's frame MACs."""
    session = hmac.digest(key, b"coral-log session" + nonce_p + nonce_b, "sha256")
    return (
        hmac.digest(session, b"primary->backup", "sha256"),
        hmac.digest(session, b"backup->primary", "sha256"),
    )


_BODY = struct.Struct(">32sQ")


def digest_payload(head: bytes, body_sha256: bytes, body_length: int) -> bytes:
    """A Flag.DIGEST record's payload: the exact head, then what the body must be."""
    return head + _BODY.pack(body_sha256, body_length)


def split_digest_payload(payload: bytes) -> tuple[bytes, bytes, int]:
    """(head, body SHA-256, body length) of a Flag.DIGEST payload; FrameError if too short."""
    if len(payload) < _BODY.size:
        raise FrameError(f"a digest record of {len(payload)} bytes")
    digest, length = _BODY.unpack(payload[-_BODY.size :])
    return payload[: -_BODY.size], digest, length


def error_frame(code: ErrorCode, reason: str) -> Frame:
    return Frame(FrameType.ERROR, payload=bytes([code]) + reason.encode())


def error_reason(frame: Frame) -> tuple[ErrorCode | None, str]:
    """An ERROR frame's code (None if unknown) and reason."""
    reason = frame.payload[1:].decode(errors="replace")
    try:
        return ErrorCode(frame.payload[0]), reason
    except (IndexError, ValueError):
        return None, reason
