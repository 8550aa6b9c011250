"""Table-driven packet tests: each row runs one crafted packet through a
loaded program with BPF_PROG_TEST_RUN (no namespace, no device) and checks
the tc verdict, the output packet and that exactly one counter moved.

Loading the objects here is also the proof that every program passes this
kernel's verifier.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP, UDP, IPOption_EOL, IPOption_NOP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet

from coral import bpf
from coral.bpf.libbpf import BpfObject
from coral.bpf.maps import CoralMaps, Counts
from coral.bpf.structs import (
    Mode,
    Reason,
    Role,
    ServiceKey,
    ServiceState,
    VipKey,
    VipState,
    ip4,
    mac,
)
from coral.bpf.syscall import Map, mount_bpffs, prog_test_run, unmount

pytestmark = pytest.mark.root

TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_STOLEN = 4
TC_ACT_REDIRECT = 7
VIP = "203.0.113.10"
PORT = 80
CLIENT = "198.51.100.7"
OTHER = "198.51.100.99"
HOST_MAC = "02:00:00:00:00:02"
CLIENT_MAC = "02:00:00:00:00:01"
PEER_MAC = "02:00:00:00:00:03"
LEASE_S = 60


@dataclass(frozen=True)
class Config:
    """Map contents before a row: one service VIP:PORT and its VIP entry."""

    mode: Mode = Mode.DUPLEX
    role: Role = Role.PRIMARY
    live: bool = True  # lease in the future, else already expired


@dataclass(frozen=True)
class Row:
    desc: str
    packet: bytes
    prog: str
    verdict: int
    reason: Reason
    config: Config = field(default_factory=Config)
    output: bytes | None = None  # None: the packet must come out unchanged


def readdressed(packet: Packet) -> bytes:
    """PACKET as the backup sends it on to the primary: to the peer's MAC, from ours."""
    packet[Ether].src, packet[Ether].dst = HOST_MAC, PEER_MAC
    return bytes(packet)


def to_vip(*, ip: Mapping[str, Any] | None = None, **tcp: Any) -> Packet:
    return (
        Ether(src=CLIENT_MAC, dst=HOST_MAC)
        / IP(src=CLIENT, dst=VIP, **(ip or {}))
        / TCP(**{"sport": 40000, "dport": PORT, **tcp})
    )


def from_vip(*, ip: Mapping[str, Any] | None = None, **tcp: Any) -> Packet:
    return (
        Ether(src=HOST_MAC, dst=CLIENT_MAC)
        / IP(src=VIP, dst=CLIENT, **(ip or {}))
        / TCP(**{"sport": PORT, "dport": 40000, **tcp})
    )


def from_peer(**tcp: Any) -> Packet:
    """A service -> client segment sent by the peer host to this one (copy or report)."""
    return (
        Ether(src=PEER_MAC, dst=HOST_MAC)
        / IP(src=VIP, dst=CLIENT)
        / TCP(**{"sport": PORT, "dport": 40000, **tcp})
    )


def raw_ip(dst: str, payload: bytes) -> bytes:
    """Ethernet + an IPv4 packet with arbitrary bytes as TCP payload."""
    return bytes(Ether(src=CLIENT_MAC, dst=HOST_MAC) / IP(src=CLIENT, dst=dst, proto=6) / payload)


def arp_out(op: str, psrc: str, pdst: str = CLIENT) -> bytes:
    return bytes(
        Ether(src=HOST_MAC, dst="ff:ff:ff:ff:ff:ff")
        / ARP(op=op, hwsrc=HOST_MAC, psrc=psrc, pdst=pdst)
    )


FENCED = Config(mode=Mode.FENCED)
EXPIRED = Config(live=False)
SIMPLEX = Config(mode=Mode.SIMPLEX)
BACKUP = Config(role=Role.BACKUP)
BACKUP_SIMPLEX = Config(mode=Mode.SIMPLEX, role=Role.BACKUP)
BACKUP_FENCED = Config(mode=Mode.FENCED, role=Role.BACKUP)
OK, SHOT, STOLEN, REDIRECT = TC_ACT_OK, TC_ACT_SHOT, TC_ACT_STOLEN, TC_ACT_REDIRECT
IN, OUT = "coral_ingress", "coral_egress"
R = Reason

TCP_HDR = bytes(TCP(sport=40000, dport=PORT))
IP_OPTS = {"options": [IPOption_NOP()] * 3 + [IPOption_EOL()]}
IP_OPTS_MAX = {"options": [IPOption_NOP()] * 39 + [IPOption_EOL()]}
TS_OPTS = [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]
SYN = bytes(to_vip(flags="S"))
DATA = bytes(to_vip(flags="PA", options=TS_OPTS) / (b"x" * 100))
REPLY = bytes(from_vip(flags="PA") / b"reply")
IPV6 = bytes(Ether() / IPv6() / TCP(dport=PORT))
UDP_VIP = bytes(Ether() / IP(dst=VIP) / UDP(dport=PORT))
TCP_OTHER = bytes(Ether() / IP(src=CLIENT, dst=OTHER) / TCP(dport=PORT))

# fmt: off
TC_ROWS = [
    # desc, packet, program, verdict, counter, config
    # Not ours: untouched.
    Row("ipv6 tcp", IPV6, IN, OK, R.PASS_OTHER),
    Row("udp to vip", UDP_VIP, IN, OK, R.PASS_OTHER),
    Row("tcp to vip, other port", bytes(to_vip(dport=22)), IN, OK, R.PASS_OTHER),
    Row("tcp to other address", TCP_OTHER, IN, OK, R.PASS_OTHER, FENCED),
    Row("ethernet header only", bytes(Ether()), IN, OK, R.PASS_OTHER),
    # Service traffic.
    Row("syn to service", SYN, IN, OK, R.PASS_SERVICE),
    Row("data to service", DATA, IN, OK, R.PASS_SERVICE),
    Row("reply from service", REPLY, OUT, OK, R.PASS_SERVICE),
    Row("simplex service", SYN, IN, OK, R.PASS_SERVICE, SIMPLEX),
    Row("DF is not a fragment", bytes(to_vip(ip={"flags": "DF"})), IN, OK, R.PASS_SERVICE),
    Row("ethernet padding after total length", SYN + bytes(12), IN, OK, R.PASS_SERVICE),
    Row("ip options skipped", bytes(to_vip(ip=IP_OPTS)), IN, OK, R.PASS_SERVICE),
    Row("40 bytes of ip options", bytes(to_vip(ip=IP_OPTS_MAX)), IN, OK, R.PASS_SERVICE),
    # Fencing, both directions.
    Row("fenced: in", SYN, IN, SHOT, R.DROP_FENCED, FENCED),
    Row("fenced: out", REPLY, OUT, SHOT, R.DROP_FENCED, FENCED),
    Row("fenced: rst out", bytes(from_vip(flags="R")), OUT, SHOT, R.DROP_FENCED, FENCED),
    Row("unknown mode is fenced", SYN, IN, SHOT, R.DROP_FENCED, Config(mode=7)),  # type: ignore[arg-type]
    Row("lease expired: in", SYN, IN, SHOT, R.DROP_LEASE_EXPIRED, EXPIRED),
    Row("lease expired: out", REPLY, OUT, SHOT, R.DROP_LEASE_EXPIRED, EXPIRED),
    Row("fenced, port after ip options", bytes(to_vip(ip=IP_OPTS_MAX)), IN, SHOT, R.DROP_FENCED,
        FENCED),
    # ARP claims for the VIP (egress only).
    Row("arp reply for vip, fenced", arp_out("is-at", VIP), OUT, SHOT, R.DROP_ARP_FENCED, FENCED),
    Row("arp reply for vip, expired", arp_out("is-at", VIP), OUT, SHOT, R.DROP_ARP_FENCED, EXPIRED),
    Row("gratuitous arp for vip, fenced", arp_out("who-has", VIP, VIP), OUT, SHOT,
        R.DROP_ARP_FENCED, FENCED),
    Row("arp reply for vip, live", arp_out("is-at", VIP), OUT, OK, R.PASS_VIP_ARP),
    Row("arp reply for other address", arp_out("is-at", OTHER), OUT, OK, R.PASS_OTHER, FENCED),
    Row("arp reply for vip, ingress", arp_out("is-at", VIP), IN, OK, R.PASS_OTHER, FENCED),
    Row("truncated arp", bytes(Ether(type=0x0806)) + bytes(10), OUT, OK, R.PASS_OTHER, FENCED),
    # Malformed IPv4. (A frame shorter than a 20-byte IPv4 header is refused
    # by BPF_PROG_TEST_RUN itself: test_bpf_netns.py sends one on a veth.)
    Row("ihl beyond packet", bytes(Ether() / IP(dst=VIP, ihl=15)), IN, SHOT, R.DROP_IP_TRUNCATED),
    Row("version 6 in ipv4 frame", bytes(to_vip(ip={"version": 6})), IN, SHOT,
        R.DROP_IP_BAD_VERSION),
    Row("ihl below 5", bytes(to_vip(ip={"ihl": 4})), IN, SHOT, R.DROP_IP_BAD_IHL),
    Row("ihl below 5, other address", bytes(Ether() / IP(dst=OTHER, ihl=4) / TCP()), IN, OK,
        R.PASS_OTHER),
    Row("total length > packet", bytes(to_vip(ip={"len": 200})), IN, SHOT, R.DROP_IP_BAD_TOTLEN),
    Row("total length < header", bytes(to_vip(ip={"len": 10})), IN, SHOT, R.DROP_IP_BAD_TOTLEN),
    Row("total length 0, no gso", bytes(to_vip(ip={"len": 0})), IN, SHOT, R.DROP_IP_BAD_TOTLEN),
    Row("first fragment to vip", bytes(to_vip(ip={"flags": "MF"})), IN, SHOT, R.DROP_IP_FRAGMENT),
    Row("later fragment to vip", bytes(Ether() / IP(dst=VIP, frag=100, proto=6) / bytes(16)), IN,
        SHOT, R.DROP_IP_FRAGMENT),
    Row("fragment from vip", bytes(from_vip(ip={"flags": "MF"})), OUT, SHOT, R.DROP_IP_FRAGMENT),
    Row("fragment to other address", bytes(Ether() / IP(dst=OTHER, flags="MF") / TCP()), IN, OK,
        R.PASS_OTHER),
    # Malformed TCP.
    Row("truncated tcp header", raw_ip(VIP, TCP_HDR[:10]), IN, SHOT, R.DROP_TCP_TRUNCATED),
    Row("no tcp header", raw_ip(VIP, b""), IN, SHOT, R.DROP_TCP_TRUNCATED),
    Row("truncated tcp, other address", raw_ip(OTHER, TCP_HDR[:10]), IN, OK, R.PASS_OTHER),
    Row("data offset < 5", bytes(to_vip(dataofs=4)), IN, SHOT, R.DROP_TCP_BAD_DOFF),
    Row("data offset 0", bytes(to_vip(dataofs=0)), IN, SHOT, R.DROP_TCP_BAD_DOFF),
    Row("data offset beyond packet", bytes(to_vip(dataofs=15)), IN, SHOT, R.DROP_TCP_BAD_DOFF),
    Row("data offset beyond total length, into padding", bytes(to_vip(dataofs=6)) + bytes(8), IN,
        SHOT, R.DROP_TCP_BAD_DOFF),
    Row("data offset < 5, from vip", bytes(from_vip(dataofs=2)), OUT, SHOT, R.DROP_TCP_BAD_DOFF),
]

ADOPT_ROWS = [
    # Connections the backup does not track (served by it alone): untouched.
    Row("backup duplex: reply of untracked connection", REPLY, OUT, OK, R.PASS_SERVICE, BACKUP),
    Row("backup duplex: rst of untracked connection", bytes(from_vip(flags="R")), OUT, OK,
        R.PASS_SERVICE, BACKUP),
    Row("backup simplex: reply passes", REPLY, OUT, OK, R.PASS_SERVICE, BACKUP_SIMPLEX),
    Row("primary: reply passes", REPLY, OUT, OK, R.PASS_SERVICE),
    Row("backup fenced: fenced first", REPLY, OUT, SHOT, R.DROP_FENCED, BACKUP_FENCED),
    Row("primary: syn passes", SYN, IN, OK, R.PASS_SERVICE),
    Row("backup simplex: syn passes", SYN, IN, OK, R.PASS_SERVICE, BACKUP_SIMPLEX),
    # No socket here and not in coral_conns: one the primary serves alone (opened
    # before this host rejoined): its copy goes to the primary, nothing to this stack.
    Row("backup: ack of unknown connection, forwarded", bytes(to_vip(flags="A")), IN, REDIRECT,
        R.PASS_FORWARDED, BACKUP, readdressed(to_vip(flags="A"))),
    Row("backup simplex: ack of unknown connection passes", bytes(to_vip(flags="A")), IN, OK,
        R.PASS_SERVICE, BACKUP_SIMPLEX),
    Row("backup: rst of unknown connection, forwarded", bytes(to_vip(flags="R")), IN, REDIRECT,
        R.PASS_FORWARDED, BACKUP, readdressed(to_vip(flags="R"))),
    Row("backup: syn-ack copy, no held syn", bytes(from_peer(flags="SA")), IN, SHOT,
        R.DROP_SYNACK_COPY, BACKUP),
    Row("backup: from the vip, not from the peer", bytes(from_vip(flags="SA")), IN, SHOT,
        R.DROP_PEER_STRAY, BACKUP),
    Row("primary: report for an untracked connection", bytes(from_peer(flags="A")), IN, SHOT,
        R.DROP_PEER_STRAY),
    Row("primary: from the vip, not from the peer", bytes(from_vip(flags="SA")), IN, SHOT,
        R.DROP_PEER_STRAY),
    Row("backup: malformed to vip", bytes(to_vip(dataofs=3)), IN, SHOT, R.DROP_TCP_BAD_DOFF,
        BACKUP),
]
# fmt: on


@dataclass
class Loaded:
    objects: dict[str, BpfObject]
    maps: dict[str, CoralMaps]

    def prog(self, obj: str, prog: str) -> tuple[int, CoralMaps]:
        return self.objects[obj].prog_fd(prog), self.maps[obj]


@pytest.fixture(scope="module")
def loaded() -> Iterator[Loaded]:
    bpf.build()
    objects = {}
    try:
        for name in ("coral_tc", "coral_dp"):
            objects[name] = obj = BpfObject.open(bpf.object_path(name))
            obj.load()
        yield Loaded(objects, {n: CoralMaps.of(o) for n, o in objects.items()})
    finally:
        for obj in objects.values():
            obj.close()


def configure(maps: CoralMaps, cfg: Config) -> None:
    """Exactly one service and no connection state: every row starts alike."""
    for table in (maps.conns, maps.handshakes):
        for ckey, _ in list(table.items()):
            table.delete(ckey)
    for skey, _ in list(maps.services.items()):
        maps.services.delete(skey)
    for vkey, _ in list(maps.vips.items()):
        maps.vips.delete(vkey)
    now = time.monotonic_ns()
    lease = now + LEASE_S * 10**9 if cfg.live else now - 1
    maps.services.put(
        ServiceKey.of(VIP, PORT),
        ServiceState(
            lease_expiry_ns=lease,
            epoch=1,
            peer_ip=ip4(OTHER),
            own_mac=mac(HOST_MAC),
            peer_mac=mac(PEER_MAC),
            mode=cfg.mode,
            role=cfg.role,
        ),
    )
    maps.vips.put(VipKey.of(VIP), VipState(lease_expiry_ns=lease, epoch=1, mode=cfg.mode))


def delta(before: dict[Reason, Counts], after: dict[Reason, Counts]) -> dict[Reason, Counts]:
    return {
        r: Counts(after[r].packets - before[r].packets, after[r].bytes - before[r].bytes)
        for r in Reason
        if after[r] != before[r]
    }


def check(loaded: Loaded, obj: str, row: Row) -> None:
    assert (row.verdict == TC_ACT_SHOT) == row.reason.is_drop, "row is consistent"
    fd, maps = loaded.prog(obj, row.prog)
    configure(maps, row.config)
    before = maps.read_counters()
    result = prog_test_run(fd, row.packet)
    after = maps.read_counters()
    assert result.retval == row.verdict
    assert result.data == (row.packet if row.output is None else row.output)
    assert delta(before, after) == {row.reason: Counts(1, len(row.packet))}


@pytest.mark.parametrize("obj", ["coral_tc", "coral_dp"])
@pytest.mark.parametrize("row", TC_ROWS, ids=lambda r: r.desc)
def test_classify_and_fence(loaded: Loaded, obj: str, row: Row) -> None:
    """Both objects agree on what is service traffic, what is malformed, what is fenced."""
    check(loaded, obj, row)


@pytest.mark.parametrize("row", ADOPT_ROWS, ids=lambda r: r.desc)
def test_backup_handshake_stateless(loaded: Loaded, row: Row) -> None:
    check(loaded, "coral_dp", row)


def test_counter_map_has_one_slot_per_reason(loaded: Loaded) -> None:
    for maps in loaded.maps.values():
        assert maps.counters.max_entries == len(Reason)
        assert maps.read_counters()[Reason.CONTINUE] == Counts(0, 0), "CONTINUE is never counted"


def test_trace_setting_loads() -> None:
    """The verdict trace (a load-time setting) passes the verifier when on."""
    with BpfObject.open(bpf.object_path("coral_tc")) as obj:
        obj.set_rodata("coral_trace", b"\x01")
        obj.load()
        assert prog_test_run(obj.prog_fd("coral_ingress"), bytes(to_vip())).retval == TC_ACT_OK


def test_rewrite_helpers_keep_checksums() -> None:
    """coral_csum.h: ack, window and MAC rewrites leave a valid TCP checksum."""
    delta_ack, window = 0x01020304, 4321
    with BpfObject.open(bpf.object_path("coral_selftest")) as obj:
        obj.set_rodata("selftest_ack_delta", delta_ack.to_bytes(4, "little"))
        obj.set_rodata("selftest_window", window.to_bytes(2, "little"))
        obj.set_rodata("selftest_dst_mac", bytes(mac(PEER_MAC)))
        obj.set_rodata("selftest_src_mac", bytes(mac(HOST_MAC)))
        obj.load()
        fd = obj.prog_fd("coral_selftest_rewrite")
        for pkt in (
            to_vip(flags="A", ack=0xFFFFFF00, window=1000) / (b"z" * 33),
            to_vip(flags="A", ack=7, ip=IP_OPTS_MAX, options=[("MSS", 1460)]),
        ):
            result = prog_test_run(fd, bytes(pkt))
            assert result.retval == TC_ACT_OK
            out = Ether(result.data)
            assert (out.dst, out.src) == (PEER_MAC, HOST_MAC)
            assert out[TCP].ack == (pkt[TCP].ack + delta_ack) % 2**32
            assert out[TCP].window == window
            recomputed = out.copy()
            del recomputed[TCP].chksum
            assert Ether(bytes(recomputed))[TCP].chksum == out[TCP].chksum
            assert bytes(out[TCP].payload) == bytes(pkt[TCP].payload)


def test_pinned_maps_are_shared(tmp_path: Path) -> None:
    """Objects loaded on one pin root share one set of maps, which outlive
    the objects: a reloaded program finds the live state again."""
    root = str(tmp_path / "bpffs")
    mount_bpffs(root)
    try:
        key, state = ServiceKey.of(VIP, PORT), ServiceState(mode=Mode.SIMPLEX, epoch=7)
        with BpfObject.open(bpf.object_path("coral_tc"), pin_root=root) as tc_obj:
            tc_obj.load()
            CoralMaps.of(tc_obj).services.put(key, state)
        assert "coral_services" in os.listdir(root)
        with BpfObject.open(bpf.object_path("coral_dp"), pin_root=root) as adopt:
            adopt.load()
            got = CoralMaps.of(adopt).services.get(key)
            assert got is not None and (got.mode, got.epoch) == (Mode.SIMPLEX, 7)
        with Map.open_pinned(os.path.join(root, "coral_services")) as m:
            assert m.lookup(key) == bytes(state)
    finally:
        unmount(root)
