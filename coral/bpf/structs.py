"""Python mirror of bpf/coral_structs.h and of the enums of bpf/coral_consts.h.

Field names, order and types follow the C definitions exactly;
tests/test_bpf_contract.py checks every struct's size and member offsets,
and every enum value, against the compiled object's BTF. Change both sides
together.

__be16/__be32 fields use big-endian ctypes: Python sees plain integers
(port 80, address as an int) and the bytes are in network order, as the
programs expect. Times are time.monotonic_ns() values (the programs'
bpf_ktime_get_ns() is CLOCK_MONOTONIC).
"""

from __future__ import annotations

import ctypes
import ipaddress
from enum import IntEnum, IntFlag
from typing import ClassVar, Self

u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64
be16: type[ctypes.c_uint16] = ctypes.c_uint16.__ctype_be__  # type: ignore[attr-defined]
be32: type[ctypes.c_uint32] = ctypes.c_uint32.__ctype_be__  # type: ignore[attr-defined]
Mac = u8 * 6


class Reason(IntEnum):
    """enum coral_reason, without the CORAL_ prefix: every verdict and drop
    reason, each one counter in coral_counters."""

    CONTINUE = 0
    PASS_OTHER = 1
    PASS_SERVICE = 2
    PASS_VIP_ARP = 3
    PASS_ADOPTED = 4
    PASS_CLONED = 5
    PASS_SIMPLEX_FULL = 6
    PASS_BACKUP_REPORT = 7
    PASS_FAKE_ACK = 8
    PASS_CLAMPED = 9
    PASS_RAISED_ACK = 10
    PASS_CRAFTED = 11
    PASS_CLOSE = 12
    PASS_FIN_STRIPPED = 13
    PASS_FORWARDED = 14
    PASS_WINDOW_OPENED = 15
    DROP_FENCED = 16
    DROP_LEASE_EXPIRED = 17
    DROP_ARP_FENCED = 18
    DROP_IP_TRUNCATED = 19
    DROP_IP_BAD_VERSION = 20
    DROP_IP_BAD_IHL = 21
    DROP_IP_BAD_TOTLEN = 22
    DROP_IP_FRAGMENT = 23
    DROP_TCP_TRUNCATED = 24
    DROP_TCP_BAD_DOFF = 25
    DROP_SYN_HELD = 26
    DROP_SYNACK_COPY = 27
    DROP_HANDSHAKE_PENDING = 28
    DROP_ADOPT_MISMATCH = 29
    DROP_ADOPT_NO_LISTENER = 30
    DROP_ADOPT_FAILED = 31
    DROP_UNMARKED_CLOSE = 32
    DROP_REPORT_CONSUMED = 33
    DROP_PEER_STRAY = 34
    DROP_CONN_TABLE_FULL = 35
    DROP_REWRITE_FAILED = 36
    DROP_COPY_FAILED = 37
    DROP_LOOP_STALE = 38

    @property
    def is_drop(self) -> bool:
        return self.name.startswith("DROP_")


class Mode(IntEnum):
    """enum coral_mode (CORAL_MODE_*). Zero is FENCED: zeroed state fails closed."""

    FENCED = 0
    DUPLEX = 1
    SIMPLEX = 2


class Role(IntEnum):
    """enum coral_role (CORAL_ROLE_*)."""

    PRIMARY = 1
    BACKUP = 2


class ConnFlag(IntFlag):
    """enum coral_conn_flag (CORAL_CONN_*): bits of ConnState.flags."""

    BACKUP_SEEN = 1 << 0


class SynOpt(IntFlag):
    """enum coral_syn_opt (CORAL_SYN_*): bits of SynOpts.flags."""

    MSS = 1 << 0
    WSCALE = 1 << 1
    SACK_PERM = 1 << 2
    TIMESTAMP = 1 << 3
    ECN = 1 << 4


ENUMS: dict[str, tuple[type[IntEnum] | type[IntFlag], str]] = {
    "coral_reason": (Reason, "CORAL_"),
    "coral_mode": (Mode, "CORAL_MODE_"),
    "coral_role": (Role, "CORAL_ROLE_"),
    "coral_conn_flag": (ConnFlag, "CORAL_CONN_"),
    "coral_syn_opt": (SynOpt, "CORAL_SYN_"),
}
"""C enum name -> (Python mirror, prefix the mirror's member names drop)."""


def ip4(addr: str) -> int:
    """An IPv4 address as the integer a be32 field takes."""
    return int(ipaddress.IPv4Address(addr))


def mac(addr: str) -> ctypes.Array[ctypes.c_uint8]:
    """A MAC address ("02:00:00:00:00:01") as a Mac field value."""
    raw = bytes.fromhex(addr.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {addr!r}")
    return Mac(*raw)


class CStruct(ctypes.Structure):
    """A mirrored C struct; C_NAME is its name in coral_structs.h."""

    C_NAME: ClassVar[str]


class ServiceKey(CStruct):
    C_NAME = "coral_service_key"
    _fields_ = (("vip", be32), ("port", be16), ("pad", u16))

    @classmethod
    def of(cls, vip: str, port: int) -> Self:
        return cls(vip=ip4(vip), port=port)


class ServiceState(CStruct):
    C_NAME = "coral_service_state"
    _fields_ = (
        ("lease_expiry_ns", u64),
        ("epoch", u32),
        ("peer_ip", be32),
        ("own_mac", Mac),
        ("peer_mac", Mac),
        ("mode", u8),
        ("role", u8),
        ("pad", u8 * 2),
    )


class VipKey(CStruct):
    C_NAME = "coral_vip_key"
    _fields_ = (("vip", be32),)

    @classmethod
    def of(cls, vip: str) -> Self:
        return cls(vip=ip4(vip))


class VipState(CStruct):
    C_NAME = "coral_vip_state"
    _fields_ = (
        ("lease_expiry_ns", u64),
        ("epoch", u32),
        ("mode", u8),
        ("pad", u8 * 3),
    )


class ConnKey(CStruct):
    C_NAME = "coral_conn_key"
    _fields_ = (
        ("client_ip", be32),
        ("vip", be32),
        ("client_port", be16),
        ("vip_port", be16),
    )

    @classmethod
    def of(cls, client: str, client_port: int, vip: str, vip_port: int) -> Self:
        return cls(client_ip=ip4(client), vip=ip4(vip), client_port=client_port, vip_port=vip_port)


class SackBlock(CStruct):
    C_NAME = "coral_sack_block"
    _fields_ = (("start", u32), ("end", u32))


class ConnState(CStruct):
    C_NAME = "coral_conn_state"
    _fields_ = (
        ("last_ns", u64),
        ("primary_isn", u32),
        ("client_isn", u32),
        ("flags", u16),
        ("mode", u8),
        ("rcv_wscale", u8),
        ("backup_ack", u32),
        ("backup_win", u32),
        ("primary_ack", u32),
        ("primary_win", u32),
        ("primary_snd_nxt", u32),
        ("acked_to_client", u32),
        ("backup_sack", SackBlock * 3),
        ("client_mac", u8 * 6),
        ("pad", u16),
        ("primary_tsval", u32),
        ("primary_tsecr", u32),
        ("backup_tsecr", u32),
        ("backup_snd_nxt", u32),
        ("client_ack", u32),
        ("delivered_ack", u32),
        ("client_tsval", u32),
        ("client_tsecr", u32),
        ("client_win", u16),
        ("pad2", u16),
    )


class SynOpts(CStruct):
    C_NAME = "coral_syn_opts"
    _fields_ = (("tsval", u32), ("mss", u16), ("wscale", u8), ("flags", u8))


class Handshake(CStruct):
    C_NAME = "coral_handshake"
    _fields_ = (
        ("synack_ns", u64),
        ("client", SynOpts),
        ("primary", SynOpts),
        ("primary_isn", u32),
        ("pad", u32),
    )


class Counter(CStruct):
    C_NAME = "coral_counter"
    _fields_ = (("packets", u64), ("bytes", u64))


CONTRACT: tuple[type[CStruct], ...] = (
    ServiceKey,
    ServiceState,
    VipKey,
    VipState,
    ConnKey,
    SackBlock,
    ConnState,
    SynOpts,
    Handshake,
    Counter,
)
"""Every mirrored struct: the contract test checks each one."""
