"""Replication paths of coral_dp (docs/design.md, "Packet paths in duplex",
"Simplex, fencing, failures"), table-driven under BPF_PROG_TEST_RUN.

Each row gives the host's role, the service's mode, the connection state to
pre-populate (coral_conns, coral_handshakes, coral_closing) and one scapy
packet; it checks the tc verdict, that exactly one counter moved by one
packet, the output frame (exact bytes, and valid IPv4 and TCP checksums for
every frame that leaves), the frames the program cloned, and the state left
in the maps.

Every run happens inside a throwaway namespace: under BPF_PROG_TEST_RUN a
bpf_clone_redirect really transmits on the test skb's device, the loopback of
the calling thread's namespace. A packet socket on that loopback catches the
copies (to the peer, or looped back to ingress), so rows check them too.
"""

from __future__ import annotations

import ctypes
import select
import socket
import struct
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import pytest
from pyroute2 import IPRoute, netns
from scapy.layers.inet import IP, TCP, IPOption_EOL, IPOption_NOP
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from coral import bpf
from coral.bpf.libbpf import BpfObject
from coral.bpf.maps import CoralMaps, Counts
from coral.bpf.structs import (
    ConnFlag,
    ConnKey,
    ConnState,
    Handshake,
    Mode,
    Reason,
    Role,
    SackBlock,
    ServiceKey,
    ServiceState,
    SynOpt,
    SynOpts,
    VipKey,
    VipState,
    ip4,
    mac,
)
from coral.bpf.syscall import prog_test_run

pytestmark = pytest.mark.root

OK, SHOT, REDIRECT = 0, 2, 7  # tc actions
MARK_CRAFTED = 0xC0A1C0A1  # CORAL_MARK_CRAFTED (coral_repl.h)
ETH_P_ALL = 0x0003
VIP, PORT, CLIENT, CPORT = "203.0.113.10", 80, "198.51.100.7", 40000
HOST_MAC, ROUTER_MAC, PEER_MAC = "02:00:00:00:00:02", "02:00:00:00:00:01", "02:00:00:00:00:03"
KEY = ConnKey.of(CLIENT, CPORT, VIP, PORT)
CONNS_MAX = 4  # coral_conns is resized to this, so "table full" is cheap
IN, OUT = "coral_ingress", "coral_egress"
P, B = Role.PRIMARY, Role.BACKUP
DUPLEX, SIMPLEX = Mode.DUPLEX, Mode.SIMPLEX
SEEN = ConnFlag.BACKUP_SEEN
R = Reason
GONE: Mapping[str, Any] = MappingProxyType({})  # expected state: no entry at all
IPOPTS = {"options": [IPOption_NOP()] * 3 + [IPOption_EOL()]}


class _NonZero:
    """Expected value: anything but 0 (a time)."""

    def __eq__(self, other: object) -> bool:
        return bool(other)

    def __repr__(self) -> str:
        return "<nonzero>"


NONZERO: Any = _NonZero()


# ---- packets ---------------------------------------------------------------


def ts(val: int, ecr: int) -> list[tuple[str, Any]]:
    return [("NOP", None), ("NOP", None), ("Timestamp", (val, ecr))]


def sack(*edges: int) -> list[tuple[str, Any]]:
    return [("NOP", None), ("NOP", None), ("SAck", edges)]


NOPS = [("NOP", None)]
TS_RAW = bytes([1, 1, 8, 10]) + struct.pack("!II", 710, 310)
BAD_SACK = TS_RAW + bytes([5, 12]) + bytes(10)  # SACK length 12: not 2 + 8n
SHORT_TS = bytes([1, 1, 8, 10, 0, 0, 2, 0xC6])  # timestamp cut by the data offset


def frame(
    macs: tuple[str, str],
    addrs: tuple[str, str],
    ports: tuple[int, int],
    *,
    ip: Mapping[str, Any] | None = None,
    raw_opts: bytes | None = None,
    data: bytes = b"",
    **tcp: Any,
) -> Packet:
    """Ethernet (src, dst) / IPv4 / TCP / data; RAW_OPTS: option bytes as is."""
    l3 = Ether(src=macs[0], dst=macs[1]) / IP(src=addrs[0], dst=addrs[1], **(ip or {}))
    if raw_opts is not None:
        tcp = {k: v for k, v in tcp.items() if k != "options"}
        seg = TCP(sport=ports[0], dport=ports[1], dataofs=5 + len(raw_opts) // 4, **tcp)
        return l3 / seg / Raw(raw_opts + data)
    pkt = l3 / TCP(sport=ports[0], dport=ports[1], **tcp)
    return pkt / Raw(data) if data else pkt


def reply(macs: tuple[str, str] = (HOST_MAC, ROUTER_MAC), **kw: Any) -> Packet:
    """Service -> client: 100 bytes at 50001 (primary ISN 50000), acking client byte 3001."""
    f: dict[str, Any] = dict(flags="PA", seq=50001, ack=3001, window=502, options=ts(710, 310))
    return frame(macs, (VIP, CLIENT), (PORT, CPORT), **({"data": b"s" * 100} | f | kw))


def request(macs: tuple[str, str] = (ROUTER_MAC, HOST_MAC), **kw: Any) -> Packet:
    """Client -> service: 100 bytes at 2001 (client ISN 1000), acking server byte 50201."""
    f: dict[str, Any] = dict(flags="PA", seq=2001, ack=50201, window=1100, options=ts(302, 705))
    return frame(macs, (CLIENT, VIP), (CPORT, PORT), **({"data": b"c" * 100} | f | kw))


def report(macs: tuple[str, str] = (PEER_MAC, HOST_MAC), **kw: Any) -> Packet:
    """The backup's segment as it reaches the primary (from the peer's MAC)."""
    f: dict[str, Any] = dict(seq=50101, ack=2001, window=500, options=ts(705, 305), data=b"b" * 50)
    return reply(macs, **(f | kw))


def backup_seg(**kw: Any) -> Packet:
    """The backup's own segment leaving it: 100 bytes at 50101."""
    f: dict[str, Any] = dict(seq=50101, ack=2001, window=500, options=ts(705, 305))
    return reply(**(f | kw))


def looped(**kw: Any) -> Packet:
    """The backup's own segment looped back to its ingress (both MACs its own)."""
    return backup_seg(macs=(HOST_MAC, HOST_MAC), **kw)


def remac(pkt: Packet, src: str, dst: str) -> Packet:
    out = pkt.copy()
    out[Ether].src, out[Ether].dst = src, dst
    return out


def truncated(macs: tuple[str, str], to_vip: bool) -> Packet:
    """An IPv4 packet whose TCP header is cut at 10 bytes."""
    addrs, ports = ((CLIENT, VIP), (CPORT, PORT)) if to_vip else ((VIP, CLIENT), (PORT, CPORT))
    head = bytes(TCP(sport=ports[0], dport=ports[1]))[:10]
    return Ether(src=macs[0], dst=macs[1]) / IP(src=addrs[0], dst=addrs[1], proto=6) / head


SYN = request(flags="S", seq=1000, ack=0, window=64240, data=b"",
              options=[("MSS", 1460), ("SAckOK", b""), ("NOP", None), ("WScale", 7)])  # fmt: skip
SYNACK_OPTS = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (700, 300)), ("NOP", None),
               ("WScale", 7)]  # fmt: skip
SYNACK = reply(flags="SA", seq=50000, ack=1001, window=65160, data=b"", options=SYNACK_OPTS)
SYNACK_COPY = remac(SYNACK, PEER_MAC, HOST_MAC)
FAKE_ACK = request(macs=(HOST_MAC, HOST_MAC), flags="A", seq=2001, ack=50201, window=1000,
                   options=ts(301, 699), data=b"")  # fmt: skip
RAISED_ACK = reply(flags="A", seq=50101, ack=2001, window=500, options=ts(710, 310), data=b"")


# ---- state -----------------------------------------------------------------


def conn(**kw: Any) -> ConnState:
    """A coral_conns value: a duplex connection from client ISN 1000, plus KW."""
    f = {"mode": DUPLEX, "client_isn": 1000} | kw
    blocks, client_mac = f.pop("backup_sack", ()), f.pop("client_mac", None)
    c = ConnState(**f)
    for i, (start, end) in enumerate(blocks):
        c.backup_sack[i] = SackBlock(start, end)
    if client_mac:
        c.client_mac = mac(client_mac)
    return c


def pconn(**kw: Any) -> ConnState:
    """Primary, established: the backup reported ack 2001 and 64000 bytes of window."""
    base = {"primary_isn": 50000, "rcv_wscale": 7, "flags": SEEN, "backup_ack": 2001,
            "backup_win": 64000, "primary_ack": 2001, "primary_win": 64256,
            "primary_snd_nxt": 50001, "acked_to_client": 2001, "primary_tsval": 700,
            "primary_tsecr": 300}  # fmt: skip
    return conn(**(base | kw))


def rconn(**kw: Any) -> ConnState:
    """Primary waiting for a report: its kernel acked 3001, the client was told 1501."""
    base = {"client_mac": ROUTER_MAC, "primary_ack": 3001, "primary_snd_nxt": 50101,
            "primary_tsval": 710, "primary_tsecr": 310, "backup_ack": 1501,
            "acked_to_client": 1501}  # fmt: skip
    return pconn(**(base | kw))


def bconn(**kw: Any) -> ConnState:
    """Backup, established: it sent (and the client acked) up to 50101."""
    base = {"primary_isn": 50000, "rcv_wscale": 7, "backup_snd_nxt": 50101,
            "delivered_ack": 50101, "client_ack": 50101, "client_win": 1000,
            "client_tsval": 301, "client_tsecr": 699}  # fmt: skip
    return conn(**(base | kw))


def handshake(synack_ns: int = 0) -> Handshake:
    """The client's SYN options as the backup recorded them."""
    flags = SynOpt.MSS | SynOpt.WSCALE | SynOpt.SACK_PERM
    return Handshake(
        synack_ns=synack_ns, client=SynOpts(mss=1460, wscale=7, flags=flags), primary_isn=50000
    )


# ---- rows ------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Row:
    desc: str
    role: Role
    prog: str
    packet: Packet
    verdict: int
    reason: Reason
    output: Packet | None = None  # None: leaves unchanged (checked unless dropped)
    mode: Mode = DUPLEX  # the service's mode
    conn: ConnState | None = None  # coral_conns[KEY] before
    hs: Handshake | None = None  # coral_handshakes[KEY] before
    closing: bool = False  # coral_closing[KEY] set
    full: bool = False  # coral_conns filled up with other connections
    mark: int = 0  # __sk_buff.mark
    clone: Packet | None = None  # the copy sent out (to the peer)
    loop: Packet | None = None  # the copy looped back to ingress
    state: Mapping[str, Any] | None = None  # coral_conns[KEY] fields after (GONE: none)
    hs_after: Mapping[str, Any] | None = None  # coral_handshakes[KEY] fields after
    sack: tuple[tuple[int, int], ...] | None = None  # SACK blocks expected out (any layout)


def ids(row: Row) -> str:
    return row.desc


CLAMPED = reply(ack=2001, window=500)  # (66001 - 2001) >> 7 = 500
STATE_OUT = {"primary_ack": 3001, "primary_win": 502 << 7, "primary_snd_nxt": 50101,
             "primary_tsval": 710, "primary_tsecr": 310, "client_mac": ROUTER_MAC,
             "acked_to_client": 2001, "last_ns": NONZERO}  # fmt: skip
S_HELD = ts(710, 310) + sack(1501, 1601, 3001, 3101)  # below backup_ack; in (2501, 3201)

# fmt: off
PRIMARY_OUT = [
    Row("ack clamped to backup_ack, window edge to the backup's", P, OUT, reply(), OK,
        R.PASS_CLAMPED, CLAMPED, conn=pconn(), state=STATE_OUT),
    Row("ack clamped, window already inside the backup's", P, OUT, reply(), OK, R.PASS_CLAMPED,
        reply(ack=2001), conn=pconn(backup_win=1 << 20)),  # (67257 - 2001) >> 7 = 509 > 502
    Row("a lower ack of the primary is never raised", P, OUT, reply(ack=1501), OK,
        R.PASS_CLAMPED, conn=pconn(acked_to_client=1001),
        state={"primary_ack": 1501, "acked_to_client": 1501}),
    Row("before the first report: nothing beyond the handshake", P, OUT, reply(), OK,
        R.PASS_CLAMPED, reply(ack=1001),
        conn=pconn(flags=0, backup_ack=0, backup_win=0, acked_to_client=1001),
        state={"acked_to_client": 1001, "primary_ack": 3001}),
    Row("window edge clamped, wscale 0", P, OUT, reply(ack=2001, window=8000), OK,
        R.PASS_CLAMPED, reply(ack=2001, window=5000),
        conn=pconn(rcv_wscale=0, backup_win=5000), state={"primary_win": 8000}),
    Row("window edge clamped, wscale 7, ack unchanged", P, OUT, reply(ack=2001, window=600), OK,
        R.PASS_CLAMPED, reply(ack=2001, window=500), conn=pconn(), state={"primary_win": 76800}),
    Row("backup's window closed: window 0", P, OUT, reply(), OK, R.PASS_CLAMPED,
        reply(ack=2001, window=0), conn=pconn(backup_win=0)),
    Row("clamp across sequence wrap", P, OUT, reply(ack=0x100), OK, R.PASS_CLAMPED,
        reply(ack=0x10, window=500),
        conn=pconn(client_isn=0xFFFFFF00, backup_ack=0x10, acked_to_client=0xFFFFFF01),
        state={"acked_to_client": 0x10}),
    Row("SACK: blocks below backup_ack or inside a backup block pass", P, OUT,
        reply(ack=1401, options=S_HELD), OK, R.PASS_CLAMPED,
        conn=pconn(backup_sack=[(2501, 3201)])),
    Row("SACK: four held blocks, no timestamps, pass", P, OUT,
        reply(ack=1001, options=sack(1101, 1201, 1301, 1401, 1501, 1601, 1701, 1801)), OK,
        R.PASS_CLAMPED, state={"primary_tsval": 700}, conn=pconn()),
    Row("an older TSval (another CPU's segment) never lowers primary_tsval", P, OUT,
        reply(options=ts(650, 290)), OK, R.PASS_CLAMPED,
        reply(options=ts(650, 290), ack=2001, window=500), conn=pconn(),
        state={"primary_tsval": 700, "primary_tsecr": 300}),
    Row("SACK: a block the backup lacks becomes NOPs", P, OUT,
        reply(ack=1401, options=ts(710, 310) + sack(3001, 3101)), OK, R.PASS_CLAMPED,
        reply(ack=1401, options=ts(710, 310) + NOPS * 12), conn=pconn()),
    Row("SACK: a block beyond the backup's block becomes NOPs", P, OUT,
        reply(ack=1401, options=ts(710, 310) + sack(3001, 3301)), OK, R.PASS_CLAMPED,
        reply(ack=1401, options=ts(710, 310) + NOPS * 12),
        conn=pconn(backup_sack=[(2501, 3201)])),
    Row("SACK: a block straddling backup_ack becomes NOPs", P, OUT,
        reply(ack=1401, options=ts(710, 310) + sack(1901, 2101)), OK, R.PASS_CLAMPED,
        reply(ack=1401, options=ts(710, 310) + NOPS * 12), conn=pconn()),
    Row("SACK: held blocks pass, only the others are blanked", P, OUT,
            reply(ack=1401, options=ts(710, 310) + sack(1501, 1601, 3001, 3101, 4001, 4101)),
            OK, R.PASS_CLAMPED, conn=pconn(backup_sack=[(2501, 3201)]),
            sack=((1501, 1601), (3001, 3101))),
    # The stall of docs/design.md: the client's Eifel check takes an echo older
    # than its retransmission for proof that the original arrived (it had, at
    # the primary only) and undoes its recovery; the backup never gets the bytes.
    Row("ack the backup's: its later echo replaces the primary's (no false undo)", P, OUT,
        reply(), OK, R.PASS_CLAMPED, reply(ack=2001, window=500, options=ts(710, 330)),
        conn=pconn(backup_tsecr=330), state={"primary_tsecr": 310, "backup_tsecr": 330}),
    Row("ack the backup's, its echo older: the primary's stays", P, OUT, reply(), OK,
        R.PASS_CLAMPED, CLAMPED, conn=pconn(backup_tsecr=290)),
    Row("ack the primary's own (below the backup's): its own echo stays", P, OUT,
        reply(ack=1501), OK, R.PASS_CLAMPED, conn=pconn(backup_tsecr=330)),
    Row("D-SACK below the primary's ack (its duplicate, not the backup's): blanked", P, OUT,
        reply(ack=1401, options=ts(710, 310) + sack(1101, 1201, 1501, 1601)), OK,
        R.PASS_CLAMPED, conn=pconn(), sack=((1501, 1601),)),
    Row("D-SACK inside the next block: blanked", P, OUT,
        reply(ack=1401, options=ts(710, 310) + sack(1521, 1561, 1501, 1601)), OK,
        R.PASS_CLAMPED, conn=pconn(), sack=((1501, 1601),)),
    Row("D-SACK alone: the whole option goes", P, OUT,
        reply(ack=1401, options=ts(710, 310) + sack(1101, 1201)), OK, R.PASS_CLAMPED,
        reply(ack=1401, options=ts(710, 310) + NOPS * 12), conn=pconn()),
    Row("SACK blanked: acked_to_client still recorded", P, OUT,
            reply(ack=1401, options=ts(710, 310) + sack(3001, 3101)), OK, R.PASS_CLAMPED,
            reply(ack=1401, options=ts(710, 310) + NOPS * 12),
            conn=pconn(acked_to_client=1001), state={"acked_to_client": 1401}),
    # Simplex: nothing clamped, the state still follows the primary.
    Row("simplex service: nothing clamped", P, OUT, reply(), OK, R.PASS_SERVICE, mode=SIMPLEX,
        conn=pconn(), state={"primary_ack": 3001, "primary_snd_nxt": 50101,
                             "acked_to_client": 2001}),
    Row("connection opened in simplex: nothing clamped", P, OUT, reply(), OK, R.PASS_SERVICE,
        conn=pconn(mode=SIMPLEX)),
    # Close policy.
    Row("FIN without data, unmarked: dropped", P, OUT, reply(flags="FA", data=b""), SHOT,
        R.DROP_UNMARKED_CLOSE, conn=pconn(), state={"primary_snd_nxt": 50001}),
    Row("FIN with data, unmarked: data passes, FIN stripped", P, OUT, reply(flags="FPA"), OK,
        R.PASS_FIN_STRIPPED, reply(flags="PA", ack=2001, window=500), conn=pconn()),
    Row("FIN stripped: primary_snd_nxt excludes the FIN never sent", P, OUT,
            reply(flags="FPA"), OK, R.PASS_FIN_STRIPPED, reply(flags="PA", ack=2001, window=500),
            conn=pconn(), state={"primary_snd_nxt": 50101}),
    Row("FIN, marked closing: passes, clamped", P, OUT, reply(flags="FPA"), OK, R.PASS_CLOSE,
        reply(flags="FPA", ack=2001, window=500), conn=pconn(), closing=True,
        state={"primary_snd_nxt": 50102}),
    Row("RST, unmarked: dropped", P, OUT, reply(flags="R", ack=0, window=0, options=[], data=b""),
        SHOT, R.DROP_UNMARKED_CLOSE, conn=pconn()),
    Row("RST, unmarked, simplex: dropped", P, OUT,
        reply(flags="R", ack=0, window=0, options=[], data=b""), SHOT, R.DROP_UNMARKED_CLOSE,
        mode=SIMPLEX, conn=pconn()),
    Row("RST+ACK, marked closing: passes, clamped", P, OUT,
        reply(flags="RA", options=[], data=b""), OK, R.PASS_CLOSE,
        reply(flags="RA", ack=2001, window=500, options=[], data=b""), conn=pconn(), closing=True),
    # Frames coral made itself, and connections it does not track.
    Row("copy for the peer (its MAC): untouched", P, OUT, reply((HOST_MAC, PEER_MAC)), OK,
        R.PASS_CRAFTED, conn=pconn(), state={"primary_ack": 2001}),
    Row("crafted mark: untouched", P, OUT, reply(), OK, R.PASS_CRAFTED, conn=pconn(),
        mark=MARK_CRAFTED, state={"primary_ack": 2001}),
    Row("untracked connection: untouched", P, OUT, reply(), OK, R.PASS_SERVICE, state=GONE),
    # The SYN-ACK: state anchored, cloned to the backup in duplex.
    Row("SYN-ACK, duplex: to the client, copy to the backup", P, OUT, SYNACK, OK,
        R.PASS_SERVICE, conn=conn(), clone=remac(SYNACK, HOST_MAC, PEER_MAC),
        state={"primary_isn": 50000, "primary_snd_nxt": 50001, "primary_ack": 1001,
               "primary_win": 65160, "acked_to_client": 1001, "rcv_wscale": 7,
               "client_mac": ROUTER_MAC}),
    Row("SYN-ACK, simplex: no copy", P, OUT, SYNACK, OK, R.PASS_SERVICE, mode=SIMPLEX,
        conn=conn(), state={"primary_isn": 50000, "primary_snd_nxt": 50001, "rcv_wscale": 7}),
    Row("SYN-ACK window scale 15 counts as 14", P, OUT,
        reply(flags="SA", seq=50000, ack=1001, data=b"", options=[("WScale", 15)]), OK,
        R.PASS_SERVICE, mode=SIMPLEX, conn=conn(), state={"rcv_wscale": 14}),
]

PRIMARY_IN = [
    Row("SYN, duplex: connection tracked", P, IN, SYN, OK, R.PASS_SERVICE,
        state={"client_isn": 1000, "mode": DUPLEX, "flags": 0, "last_ns": NONZERO}),
    Row("SYN, simplex: not tracked", P, IN, SYN, OK, R.PASS_SERVICE, mode=SIMPLEX, state=GONE),
    Row("SYN, duplex, table full: dropped (client retransmits)", P, IN, SYN, SHOT,
        R.DROP_CONN_TABLE_FULL, full=True, state=GONE),
    Row("SYN with a new ISN on a tracked 4-tuple (TIME_WAIT reuse): entry reset", P, IN,
            SYN, OK, R.PASS_SERVICE, conn=pconn(client_isn=0x12345678),
            state={"client_isn": 1000, "flags": 0}),
    Row("client data, tracked: passes", P, IN, request(), OK, R.PASS_SERVICE, conn=pconn(),
        state={"last_ns": NONZERO}),
    # Reports from the backup.
    Row("report, clamp does not rise: consumed, state taken", P, IN,
        report(window=600, options=ts(705, 305) + sack(2501, 2601)), SHOT, R.DROP_REPORT_CONSUMED,
        conn=pconn(flags=0, backup_ack=0, backup_win=0, primary_ack=1501, acked_to_client=1501),
        state={"backup_ack": 2001, "backup_win": 600 << 7, "flags": SEEN,
               "backup_sack": [(2501, 2601), (0, 0), (0, 0)]}),
    Row("an older (reordered) report changes nothing", P, IN, report(window=600), SHOT,
        R.DROP_REPORT_CONSUMED,
        conn=pconn(backup_ack=3001, primary_ack=1501, acked_to_client=1501,
                   backup_sack=[(4001, 4101)]),
        state={"backup_ack": 3001, "backup_win": 64000,
               "backup_sack": [(4001, 4101), (0, 0), (0, 0)]}),
    Row("report raises the clamp: pure ACK to the client", P, IN, report(), REDIRECT,
        R.PASS_RAISED_ACK, RAISED_ACK, conn=rconn(),
        state={"backup_ack": 2001, "backup_win": 64000, "acked_to_client": 2001}),
    Row("raised ACK echoes the backup's later TSecr (its retransmission), recorded", P, IN,
        report(options=ts(705, 330)), REDIRECT, R.PASS_RAISED_ACK,
        reply(flags="A", seq=50101, ack=2001, window=500, options=ts(710, 330), data=b""),
        conn=rconn(), state={"backup_tsecr": 330, "primary_tsecr": 310}),
    Row("an older (reordered) report never lowers backup_tsecr", P, IN,
        report(options=ts(705, 305)), SHOT, R.DROP_REPORT_CONSUMED,
        conn=rconn(primary_ack=1501, backup_tsecr=330), state={"backup_tsecr": 330}),
    Row("raised ACK stops at the primary's own ack", P, IN, report(), REDIRECT,
        R.PASS_RAISED_ACK, reply(flags="A", seq=50101, ack=1801, window=501,
                                 options=ts(710, 310), data=b""),
        conn=rconn(primary_ack=1801), state={"acked_to_client": 1801}),
    Row("raised ACK without timestamps (none negotiated)", P, IN, report(options=[]), REDIRECT,
        R.PASS_RAISED_ACK,
        reply(flags="A", seq=50101, ack=2001, window=500, options=[], data=b""),
        conn=rconn(primary_tsval=0, primary_tsecr=0)),
    Row("report opens a closed window, ack unchanged: window update to the client", P, IN,
        report(), REDIRECT, R.PASS_WINDOW_OPENED, RAISED_ACK,
        conn=rconn(primary_ack=2001, backup_ack=2001, backup_win=0, acked_to_client=2001),
        state={"backup_win": 64000, "acked_to_client": 2001}),
    Row("report grows an open window less than twice: consumed", P, IN, report(), SHOT,
        R.DROP_REPORT_CONSUMED,
        conn=rconn(primary_ack=2001, backup_ack=2001, backup_win=400 << 7, acked_to_client=2001),
        state={"backup_win": 64000}),
    Row("report opens the window while the primary's own limits it: consumed", P, IN,
        report(), SHOT, R.DROP_REPORT_CONSUMED,
        conn=rconn(primary_ack=2001, primary_win=0, backup_ack=2001, backup_win=0,
                   acked_to_client=2001),
        state={"backup_win": 64000}),
    Row("report in simplex: consumed, nothing sent", P, IN, report(), SHOT,
        R.DROP_REPORT_CONSUMED, mode=SIMPLEX, conn=rconn(),
        state={"backup_ack": 2001, "acked_to_client": 1501}),
    Row("report with SYN: consumed, nothing taken", P, IN, report(flags="SA"), SHOT,
        R.DROP_REPORT_CONSUMED, conn=rconn(), state={"backup_ack": 1501}),
    Row("report for an untracked connection: stray", P, IN, report(), SHOT, R.DROP_PEER_STRAY),
    Row("from the VIP, not from the peer's MAC: stray", P, IN, report(macs=(ROUTER_MAC, HOST_MAC)),
        SHOT, R.DROP_PEER_STRAY, conn=rconn(), state={"backup_ack": 1501}),
]

BACKUP_OUT = [
    Row("duplex: the backup's segment becomes its report", B, OUT, backup_seg(), OK,
        R.PASS_BACKUP_REPORT, remac(backup_seg(), HOST_MAC, PEER_MAC), conn=bconn(),
        state={"backup_snd_nxt": 50201, "last_ns": NONZERO}),
    Row("duplex: a retransmission never lowers backup_snd_nxt", B, OUT, backup_seg(), OK,
        R.PASS_BACKUP_REPORT, remac(backup_seg(), HOST_MAC, PEER_MAC),
        conn=bconn(backup_snd_nxt=50301), state={"backup_snd_nxt": 50301}),
    Row("duplex: a FIN is a report too", B, OUT, backup_seg(flags="FA", data=b""), OK,
        R.PASS_BACKUP_REPORT, remac(backup_seg(flags="FA", data=b""), HOST_MAC, PEER_MAC),
        conn=bconn(), state={"backup_snd_nxt": 50102}),
    Row("duplex: bytes the client acked: looped back, then reported", B, OUT, backup_seg(), OK,
        R.PASS_BACKUP_REPORT, remac(backup_seg(), HOST_MAC, PEER_MAC), conn=bconn(client_ack=50201),
        loop=looped(), state={"backup_snd_nxt": 50201, "delivered_ack": 50101}),
    Row("duplex: a pure ACK sends nothing new: no loop", B, OUT,
        backup_seg(flags="A", data=b""), OK, R.PASS_BACKUP_REPORT,
        remac(backup_seg(flags="A", data=b""), HOST_MAC, PEER_MAC), conn=bconn(client_ack=50201)),
    Row("simplex: to the client unchanged", B, OUT, backup_seg(), OK, R.PASS_SERVICE,
        mode=SIMPLEX, conn=bconn(), state={"backup_snd_nxt": 50201}),
    Row("simplex: bytes the client acked: looped back, segment unchanged", B, OUT, backup_seg(),
        OK, R.PASS_SERVICE, mode=SIMPLEX, conn=bconn(client_ack=50201), loop=looped()),
    Row("simplex: FIN without data, unmarked: dropped", B, OUT,
        backup_seg(flags="FA", data=b""), SHOT, R.DROP_UNMARKED_CLOSE, mode=SIMPLEX, conn=bconn()),
    Row("simplex: FIN with data, unmarked: FIN stripped", B, OUT, backup_seg(flags="FPA"), OK,
        R.PASS_FIN_STRIPPED, backup_seg(flags="PA"), mode=SIMPLEX, conn=bconn()),
    Row("simplex: FIN, marked closing: passes", B, OUT, backup_seg(flags="FA", data=b""), OK,
        R.PASS_CLOSE, mode=SIMPLEX, conn=bconn(), closing=True),
    Row("simplex: RST, unmarked: dropped", B, OUT, backup_seg(flags="R", options=[], data=b""),
        SHOT, R.DROP_UNMARKED_CLOSE, mode=SIMPLEX, conn=bconn()),
    Row("simplex: RST, marked closing: passes", B, OUT,
        backup_seg(flags="R", options=[], data=b""), OK, R.PASS_CLOSE, mode=SIMPLEX,
        conn=bconn(), closing=True),
    Row("untracked connection: untouched", B, OUT, backup_seg(), OK, R.PASS_SERVICE, state=GONE),
]

BACKUP_IN = [
    # Looped copies of the backup's own segments: fake ACKs.
    Row("looped copy becomes the client's ACK (fake ACK)", B, IN, looped(), OK, R.PASS_FAKE_ACK,
        FAKE_ACK, conn=bconn(client_ack=50201, backup_snd_nxt=50201),
        state={"delivered_ack": 50201}),
    Row("fake ACK stops at what the backup has sent", B, IN, looped(), OK, R.PASS_FAKE_ACK,
        FAKE_ACK, conn=bconn(client_ack=50301, backup_snd_nxt=50201),
        state={"delivered_ack": 50201, "client_ack": 50301}),
    Row("fake ACK without timestamps", B, IN, looped(), OK, R.PASS_FAKE_ACK,
        request(macs=(HOST_MAC, HOST_MAC), flags="A", seq=2001, ack=50201, window=1000,
                options=[], data=b""),
        conn=bconn(client_ack=50201, backup_snd_nxt=50201, client_tsval=0, client_tsecr=0)),
    Row("looped copy, nothing left to deliver: stale", B, IN, looped(), SHOT, R.DROP_LOOP_STALE,
        conn=bconn(), state={"delivered_ack": 50101}),
    Row("looped copy of an untracked connection: stray", B, IN, looped(), SHOT,
        R.DROP_PEER_STRAY),
    # The primary's SYN-ACK copy.
    Row("SYN-ACK copy: handshake and sequence anchors recorded", B, IN, SYNACK_COPY, SHOT,
        R.DROP_SYNACK_COPY, conn=conn(), hs=handshake(),
        state={"primary_isn": 50000, "backup_snd_nxt": 50001, "delivered_ack": 50001,
               "rcv_wscale": 7},
        hs_after={"primary_isn": 50000, "synack_ns": NONZERO, "primary.mss": 1460,
                  "primary.wscale": 7, "primary.tsval": 700, "client.mss": 1460}),
    Row("SYN-ACK copy without window scale: rcv_wscale 0", B, IN,
        reply((PEER_MAC, HOST_MAC), flags="SA", seq=50000, ack=1001, data=b"",
              options=[("MSS", 1400)]), SHOT, R.DROP_SYNACK_COPY, conn=conn(rcv_wscale=9),
        hs=handshake(), state={"rcv_wscale": 0}, hs_after={"primary.mss": 1400}),
    Row("from the peer, not a SYN-ACK: stray", B, IN, report(), SHOT, R.DROP_PEER_STRAY,
        conn=bconn(), state={"backup_snd_nxt": 50101}),
    # Client segments.
    Row("duplex: client segment before the SYN-ACK copy: dropped", B, IN,
        request(flags="A", seq=1001, ack=50001, data=b""), SHOT, R.DROP_HANDSHAKE_PENDING,
        conn=conn(), hs=handshake()),
    Row("duplex data: copied as is, ack clamped to what the backup sent", B, IN, request(), OK,
        R.PASS_CLONED, request(ack=50101), conn=bconn(),
        clone=remac(request(), HOST_MAC, PEER_MAC),
        state={"client_ack": 50201, "client_win": 1100, "client_tsval": 302,
               "client_tsecr": 705, "delivered_ack": 50101}),
    Row("duplex data acking only what the backup sent: unchanged", B, IN, request(ack=50101),
        OK, R.PASS_CLONED, conn=bconn(), clone=remac(request(ack=50101), HOST_MAC, PEER_MAC),
        state={"client_ack": 50101, "delivered_ack": 50101}),
    Row("duplex RST: copied, delivered", B, IN, request(flags="R", options=[], data=b""), OK,
        R.PASS_SERVICE, conn=bconn(),
        clone=remac(request(flags="R", options=[], data=b""), HOST_MAC, PEER_MAC)),
    Row("duplex SYN: held, tracked, copied to the primary", B, IN, SYN, SHOT, R.DROP_SYN_HELD,
        clone=remac(SYN, HOST_MAC, PEER_MAC), state={"client_isn": 1000, "mode": DUPLEX},
        hs_after={"synack_ns": 0, "client.mss": 1460, "client.wscale": 7}),
    Row("duplex SYN with a new ISN on a tracked 4-tuple (TIME_WAIT reuse): entry reset", B,
            IN, SYN, SHOT, R.DROP_SYN_HELD, clone=remac(SYN, HOST_MAC, PEER_MAC),
            conn=bconn(client_isn=0x12345678, client_ack=0x12345678 + 0x40000000),
            state={"client_isn": 1000, "client_ack": 0}),
    Row("duplex ACK of a recorded handshake: copied, then adopted (no listener here)", B, IN,
        request(flags="A", seq=1001, ack=50001, data=b""), SHOT, R.DROP_ADOPT_NO_LISTENER,
        conn=conn(), hs=handshake(synack_ns=1),
        clone=remac(request(flags="A", seq=1001, ack=50001, data=b""), HOST_MAC, PEER_MAC)),
    Row("simplex ACK of a recorded handshake: adopted too (no listener here)", B, IN,
        request(flags="A", seq=1001, ack=50001, data=b""), SHOT, R.DROP_ADOPT_NO_LISTENER,
        mode=SIMPLEX, conn=conn(), hs=handshake(synack_ns=1)),
    Row("duplex SYN, table full: served by the backup alone", B, IN, SYN, OK,
        R.PASS_SIMPLEX_FULL, full=True, state=GONE, hs_after=GONE),
    Row("simplex data: ack clamped, no copy", B, IN, request(), OK, R.PASS_SERVICE,
        request(ack=50101), mode=SIMPLEX, conn=bconn(),
        state={"client_ack": 50201, "delivered_ack": 50101}),
    Row("connection opened in simplex: clamped, no copy", B, IN, request(), OK, R.PASS_SERVICE,
        request(ack=50101), conn=bconn(mode=SIMPLEX)),
    Row("simplex, nothing sent yet: no clamp", B, IN, request(), OK, R.PASS_SERVICE,
        mode=SIMPLEX, conn=bconn(backup_snd_nxt=0, delivered_ack=0, client_ack=0),
        state={"client_ack": 0}),
    Row("simplex SYN voids a stale replicated entry", B, IN, SYN, OK, R.PASS_SERVICE,
        mode=SIMPLEX, conn=bconn(), hs=handshake(), state=GONE, hs_after=GONE),
    Row("duplex SYN of a connection opened in simplex: voided, passes", B, IN, SYN, OK,
        R.PASS_SERVICE, conn=bconn(mode=SIMPLEX), state=GONE),
    # Opened while the primary was alone, before this host rejoined: no socket
    # here, so it is the primary's; this stack would reset it.
    Row("untracked data in duplex: redirected to the primary", B, IN, request(), REDIRECT,
        R.PASS_FORWARDED, remac(request(), HOST_MAC, PEER_MAC), state=GONE),
]

MALFORMED = [
    # Primary egress.
    Row("primary out: truncated TCP", P, OUT, truncated((HOST_MAC, ROUTER_MAC), False), SHOT,
        R.DROP_TCP_TRUNCATED, conn=pconn()),
    Row("primary out: data offset beyond the packet", P, OUT,
        reply(dataofs=15, options=[], data=b""), SHOT, R.DROP_TCP_BAD_DOFF, conn=pconn()),
    Row("primary out: IP options, clamped", P, OUT, reply(ip=IPOPTS), OK, R.PASS_CLAMPED,
        reply(ip=IPOPTS, ack=2001, window=500), conn=pconn()),
    Row("primary out: SACK of bad length passes as is, clamped", P, OUT,
        reply(raw_opts=BAD_SACK), OK, R.PASS_CLAMPED,
        reply(raw_opts=BAD_SACK, ack=2001, window=500), conn=pconn(), state={"primary_tsval": 710}),
    Row("primary out: truncated timestamp ignored, clamped", P, OUT, reply(raw_opts=SHORT_TS),
        OK, R.PASS_CLAMPED, reply(raw_opts=SHORT_TS, ack=2001, window=500), conn=pconn(),
        state={"primary_tsval": 700}),
    # Reports reaching the primary. Broken TCP claiming to come from a VIP is
    # dropped at ingress: a stack that forwards must never see it.
    Row("report: truncated TCP dropped", P, IN, truncated((PEER_MAC, HOST_MAC), False), SHOT,
        R.DROP_TCP_TRUNCATED, conn=rconn(), state={"backup_ack": 1501}),
    Row("report: bad data offset dropped", P, IN, report(dataofs=3, options=[]), SHOT,
        R.DROP_TCP_BAD_DOFF, conn=rconn(), state={"backup_ack": 1501}),
    Row("report with IP options, clamp rises: dropped, not crafted", P, IN, report(ip=IPOPTS),
        SHOT, R.DROP_REWRITE_FAILED, conn=rconn(), state={"acked_to_client": 1501}),
    Row("report with IP options, nothing to send: consumed", P, IN, report(ip=IPOPTS), SHOT,
        R.DROP_REPORT_CONSUMED, conn=rconn(primary_ack=1501), state={"backup_ack": 2001}),
    Row("report with a SACK of bad length: no blocks taken", P, IN, report(raw_opts=BAD_SACK),
        SHOT, R.DROP_REPORT_CONSUMED, conn=rconn(primary_ack=1501, backup_sack=[(2501, 2601)]),
        state={"backup_sack": [(0, 0)] * 3, "backup_ack": 2001}),
    Row("report with a truncated timestamp: raised ACK keeps the primary's", P, IN,
        report(raw_opts=SHORT_TS), REDIRECT, R.PASS_RAISED_ACK,
        reply(flags="A", seq=50101, ack=2001, window=500, options=ts(710, 310), data=b""),
        conn=rconn()),
    # Backup egress.
    Row("backup out: truncated TCP", B, OUT, truncated((HOST_MAC, ROUTER_MAC), False), SHOT,
        R.DROP_TCP_TRUNCATED, conn=bconn()),
    Row("backup out: data offset below 5", B, OUT, backup_seg(dataofs=4, options=[]), SHOT,
        R.DROP_TCP_BAD_DOFF, conn=bconn()),
    Row("backup out: IP options, reported", B, OUT, backup_seg(ip=IPOPTS), OK,
        R.PASS_BACKUP_REPORT, remac(backup_seg(ip=IPOPTS), HOST_MAC, PEER_MAC), conn=bconn()),
    # Backup ingress.
    Row("backup in: truncated TCP", B, IN, truncated((ROUTER_MAC, HOST_MAC), True), SHOT,
        R.DROP_TCP_TRUNCATED, conn=bconn()),
    Row("backup in: data offset beyond the packet", B, IN,
        request(dataofs=15, options=[], data=b""), SHOT, R.DROP_TCP_BAD_DOFF, conn=bconn()),
    Row("backup in, duplex: IP options, copied and clamped", B, IN, request(ip=IPOPTS), OK,
        R.PASS_CLONED, request(ip=IPOPTS, ack=50101), conn=bconn(),
        clone=remac(request(ip=IPOPTS), HOST_MAC, PEER_MAC)),
    Row("backup in, simplex: truncated timestamp not recorded, clamped", B, IN,
        request(raw_opts=SHORT_TS), OK, R.PASS_SERVICE, request(raw_opts=SHORT_TS, ack=50101),
        mode=SIMPLEX, conn=bconn(), state={"client_tsval": 301, "client_ack": 50201}),
    Row("backup in, simplex: SACK of bad length, clamped", B, IN, request(raw_opts=BAD_SACK),
        OK, R.PASS_SERVICE, request(raw_opts=BAD_SACK, ack=50101), mode=SIMPLEX, conn=bconn()),
    Row("looped copy: truncated TCP dropped", B, IN, truncated((HOST_MAC, HOST_MAC), False),
        SHOT, R.DROP_TCP_TRUNCATED, conn=bconn(client_ack=50201, backup_snd_nxt=50201)),
    Row("looped copy with IP options: dropped, not crafted", B, IN, looped(ip=IPOPTS), SHOT,
        R.DROP_REWRITE_FAILED, conn=bconn(client_ack=50201, backup_snd_nxt=50201),
        state={"delivered_ack": 50101}),
    Row("SYN-ACK copy with a window scale of bad length: no scaling", B, IN,
        reply((PEER_MAC, HOST_MAC), flags="SA", seq=50000, ack=1001, data=b"",
              raw_opts=bytes([2, 4, 5, 0x78, 3, 4, 7, 0])), SHOT, R.DROP_SYNACK_COPY,
        conn=conn(rcv_wscale=9), hs=handshake(), state={"rcv_wscale": 0, "primary_isn": 50000}),
]
# fmt: on


# ---- running ---------------------------------------------------------------


@contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run the block in namespace NS (this thread only)."""
    netns.pushns(ns)
    try:
        yield
    finally:
        netns.popns()


class Wire:
    """A packet socket on the namespace's loopback: the copies the programs sent."""

    def __init__(self, ns: str) -> None:
        with inside(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind(("lo", ETH_P_ALL))

    def take(self, wait_loop: bool = False) -> tuple[list[bytes], list[bytes]]:
        """(sent, looped) since the last call. A sent copy is seen again as it
        comes back in on the loopback: only its outgoing pass counts."""
        sent: list[bytes] = []
        looped: list[bytes] = []
        deadline = time.monotonic() + 1.0
        while True:
            wait = max(0.0, deadline - time.monotonic()) if wait_loop and not looped else 0.0
            if not select.select([self.sock], [], [], wait)[0]:
                return sent, looped
            data, addr = self.sock.recvfrom(65535)
            if addr[2] == socket.PACKET_OUTGOING:
                sent.append(data)
            elif data[:6] == data[6:12] == bytes(mac(HOST_MAC)):
                looped.append(data)


@dataclass
class Env:
    obj: BpfObject
    maps: CoralMaps
    ns: str
    wire: Wire


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    """coral_dp with a tiny coral_conns, and one namespace for every run."""
    bpf.build()
    ns = f"coral-t-{uuid.uuid4().hex[:8]}-repl"
    netns.create(ns)
    try:
        with IPRoute(netns=ns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        wire = Wire(ns)
        with wire.sock, BpfObject.open(bpf.object_path("coral_dp")) as obj:
            obj.set_max_entries("coral_conns", CONNS_MAX)
            obj.load()
            yield Env(obj, CoralMaps.of(obj), ns, wire)
    finally:
        netns.remove(ns)


def configure(maps: CoralMaps, row: Row) -> None:
    """One service (VIP:PORT) in the row's mode and role, the row's connection state."""
    for table in (maps.conns, maps.handshakes, maps.closing, maps.services, maps.vips):
        for key in list(table):
            table.delete(key)  # type: ignore[arg-type]
    lease = time.monotonic_ns() + 60 * 10**9
    maps.services.put(
        ServiceKey.of(VIP, PORT),
        ServiceState(lease_expiry_ns=lease, epoch=1, peer_ip=ip4("192.0.2.3"),
                     own_mac=mac(HOST_MAC), peer_mac=mac(PEER_MAC), mode=row.mode,
                     role=row.role),
    )  # fmt: skip
    maps.vips.put(VipKey.of(VIP), VipState(lease_expiry_ns=lease, epoch=1, mode=row.mode))
    if row.full:
        for port in range(CONNS_MAX - (row.conn is not None)):
            maps.conns.put(ConnKey.of(CLIENT, 1 + port, VIP, PORT), conn())
    if row.conn is not None:
        maps.conns.put(KEY, row.conn)
    if row.hs is not None:
        maps.handshakes.put(KEY, row.hs)
    if row.closing:
        maps.closing.put(KEY, ctypes.c_uint64(time.monotonic_ns()))


def ones_sum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def checksums_valid(frame: bytes) -> bool:
    """IPv4 header and TCP checksums, summed over the raw bytes (scapy would
    re-encode options it cannot parse)."""
    ip = frame[14:]
    ihl, tot = (ip[0] & 15) * 4, struct.unpack("!H", ip[2:4])[0]
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 6, tot - ihl)
    return ones_sum(ip[:ihl]) == 0xFFFF and ones_sum(pseudo + ip[ihl:tot]) == 0xFFFF


def sack_blocks(frame: bytes) -> tuple[tuple[int, int], ...]:
    for name, value in Ether(frame)[TCP].options:
        if name == "SAck":
            return tuple(zip(value[::2], value[1::2], strict=True))
    return ()


def without_sack(frame: bytes) -> bytes:
    """FRAME with its NOP and SACK options removed (lengths, checksums recomputed)."""
    pkt = Ether(frame)
    pkt[TCP].options = [o for o in pkt[TCP].options if o[0] not in ("NOP", "SAck")]
    del pkt[IP].len, pkt[IP].chksum, pkt[TCP].dataofs, pkt[TCP].chksum
    return bytes(pkt)


def field(obj: Any, name: str) -> Any:
    for part in name.split("."):
        obj = getattr(obj, part)
    if name == "backup_sack":
        return [(b.start, b.end) for b in obj]
    if name == "client_mac":
        return ":".join(f"{b:02x}" for b in obj)
    return obj


def check_state(value: Any, expected: Mapping[str, Any] | None, what: str) -> None:
    if expected is None:
        return
    if expected is GONE:
        assert value is None, f"{what}: entry left behind"
        return
    assert value is not None, f"{what}: no entry"
    got = {name: field(value, name) for name in expected}
    assert got == dict(expected), what


def check(env: Env, row: Row) -> None:
    assert (row.verdict == SHOT) == row.reason.is_drop, "row is consistent"
    maps, packet = env.maps, bytes(row.packet)
    configure(maps, row)
    env.wire.take()
    ctx = struct.pack("<III", 0, 0, row.mark) if row.mark else None  # len, pkt_type, mark
    before = maps.read_counters()
    with inside(env.ns):
        result = prog_test_run(env.obj.prog_fd(row.prog), packet, ctx=ctx)
    after = maps.read_counters()
    sent, looped = env.wire.take(wait_loop=row.loop is not None)

    assert result.retval == row.verdict
    moved = {r: Counts(after[r].packets - before[r].packets, after[r].bytes - before[r].bytes)
             for r in Reason if after[r] != before[r]}  # fmt: skip
    assert moved == {row.reason: Counts(1, len(result.data))}
    if not row.reason.is_drop:
        expected = packet if row.output is None else bytes(row.output)
        if row.reason != Reason.PASS_OTHER:  # not parseable: left to the kernel
            assert checksums_valid(result.data), "checksums of the frame that leaves"
        if row.sack is None:
            assert result.data == expected, Ether(result.data).show(dump=True)
        else:
            assert len(result.data) == len(expected)
            assert without_sack(result.data) == without_sack(expected)
            assert sack_blocks(result.data) == row.sack
    assert sent == ([] if row.clone is None else [bytes(row.clone)]), "copy to the peer"
    assert looped == ([] if row.loop is None else [bytes(row.loop)]), "copy looped back"
    for copy in sent + looped:
        assert checksums_valid(copy)
    check_state(maps.conns.get(KEY), row.state, "coral_conns")
    check_state(maps.handshakes.get(KEY), row.hs_after, "coral_handshakes")


@pytest.mark.parametrize("row", PRIMARY_OUT, ids=ids)
def test_primary_egress(env: Env, row: Row) -> None:
    """Path 2 and 8: the primary's segments, clamped to what the backup holds."""
    check(env, row)


@pytest.mark.parametrize("row", PRIMARY_IN, ids=ids)
def test_primary_ingress(env: Env, row: Row) -> None:
    """Path 7: connections tracked, the backup's reports taken, raised ACKs sent."""
    check(env, row)


@pytest.mark.parametrize("row", BACKUP_OUT, ids=ids)
def test_backup_egress(env: Env, row: Row) -> None:
    """Paths 5 and 6: the backup's segments become reports; acked bytes loop back."""
    check(env, row)


@pytest.mark.parametrize("row", BACKUP_IN, ids=ids)
def test_backup_ingress(env: Env, row: Row) -> None:
    """Paths 1, 2, 4 and 6: SYNs held, SYN-ACK copies recorded, acks clamped, fake ACKs."""
    check(env, row)


@pytest.mark.parametrize("row", MALFORMED, ids=ids)
def test_malformed(env: Env, row: Row) -> None:
    """Broken input on every path: counted, never crafted into garbage."""
    check(env, row)
