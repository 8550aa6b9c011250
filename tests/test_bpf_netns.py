"""The programs on real interfaces, in throwaway network namespaces.

- coral_tc attached with pyroute2 to a veth: real packets move the counters,
  fencing (mode and lease) stops a real TCP handshake and the VIP's ARP
  replies, and detaching restores plain forwarding.
- coral_dp's handshake records and its guards, under BPF_PROG_TEST_RUN
  inside a namespace (so the listener lookup sees only our sockets).
- The adoption proof (design brief, section 9): a client reaches two hosts
  through a hub; the backup's ingress holds the SYN, the primary alone
  chooses the ISN, and the backup's kernel adopts the connection on the
  client's ACK. Both sockets end with the same sequence numbers and
  timestamp clock, and the client's acknowledgements of the primary's reply
  drain the backup's (suppressed) copy.

Every namespace is named coral-t-<random>-<role> and removed in a finally.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from pyroute2 import IPRoute, netns
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from coral import bpf
from coral.bpf import tc
from coral.bpf.libbpf import BpfObject
from coral.bpf.maps import CoralMaps
from coral.bpf.structs import (
    ConnKey,
    Mode,
    Reason,
    Role,
    ServiceKey,
    ServiceState,
    SynOpt,
    VipKey,
    VipState,
    mac,
)
from coral.bpf.syscall import prog_test_run

pytestmark = pytest.mark.root

TC_ACT_OK, TC_ACT_SHOT = 0, 2


@contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run the block in namespace NS (this thread only): sockets created
    here stay in NS, /proc/sys/net shows NS."""
    netns.pushns(ns)
    try:
        yield
    finally:
        netns.popns()


@pytest.fixture
def make_ns() -> Iterator[Callable[[str], str]]:
    """A factory of fresh namespaces, all removed afterwards whatever happens."""
    run = uuid.uuid4().hex[:8]
    created: list[str] = []

    def make(role: str) -> str:
        name = f"coral-t-{run}-{role}"
        netns.create(name)
        created.append(name)
        with IPRoute(netns=name) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        return name

    try:
        yield make
    finally:
        for name in reversed(created):
            netns.remove(name)


def veth(ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
    """A veth pair with IF_A in NS_A and IF_B in NS_B, both down."""
    with IPRoute(netns=ns_a) as ipr:
        ipr.link("add", ifname=if_a, kind="veth", peer=if_b)
        ipr.link("set", index=ipr.link_lookup(ifname=if_b)[0], net_ns_fd=ns_b)


def up(ns: str, ifname: str, cidr: str | None = None) -> None:
    with IPRoute(netns=ns) as ipr:
        idx = ipr.link_lookup(ifname=ifname)[0]
        if cidr:
            addr, plen = cidr.split("/")
            ipr.addr("add", index=idx, address=addr, prefixlen=int(plen))
        ipr.link("set", index=idx, state="up")


def link_mac(ns: str, ifname: str) -> str:
    with IPRoute(netns=ns) as ipr:
        return str(ipr.get_links(ifname=ifname)[0].get_attr("IFLA_ADDRESS"))


PEER_MAC = "02:00:00:00:00:03"


def configure(
    maps: CoralMaps, vip: str, port: int, mode: Mode, role: Role, lease_ns: int | None = None
) -> None:
    """One service and its VIP, lease valid LEASE_NS from now (default 60 s)."""
    lease = time.monotonic_ns() + (60 * 10**9 if lease_ns is None else lease_ns)
    maps.services.put(
        ServiceKey.of(vip, port),
        ServiceState(lease_expiry_ns=lease, epoch=1, mode=mode, role=role, peer_mac=mac(PEER_MAC)),
    )
    maps.vips.put(VipKey.of(vip), VipState(lease_expiry_ns=lease, epoch=1, mode=mode))


def try_connect(ns: str, addr: str, port: int, timeout: float) -> socket.socket | None:
    with inside(ns):
        s = socket.socket()
    s.settimeout(timeout)
    try:
        s.connect((addr, port))
    except (TimeoutError, OSError):
        s.close()
        return None
    return s


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.fixture
def coral_tc() -> Iterator[BpfObject]:
    bpf.build()
    with BpfObject.open(bpf.object_path("coral_tc")) as obj:
        obj.load()
        yield obj


@pytest.fixture
def coral_dp() -> Iterator[BpfObject]:
    bpf.build()
    with BpfObject.open(bpf.object_path("coral_dp")) as obj:
        obj.load()
        yield obj


def test_attach_counts_and_fences_real_traffic(
    make_ns: Callable[[str], str], coral_tc: BpfObject
) -> None:
    client, server = make_ns("client"), make_ns("server")
    vip, port = "198.18.200.2", 8080
    veth(client, "v0", server, "v1")
    up(client, "v0", "198.18.200.1/24")
    up(server, "v1", f"{vip}/24")
    maps = CoralMaps.of(coral_tc)
    configure(maps, vip, port, Mode.DUPLEX, Role.PRIMARY)
    for prog, hook in (("coral_ingress", tc.Hook.INGRESS), ("coral_egress", tc.Hook.EGRESS)):
        tc.attach("v1", coral_tc.prog_fd(prog), prog, hook, netns=server)
    assert tc.attached("v1", tc.Hook.INGRESS, netns=server) == ["coral_ingress"]
    assert tc.attached("v1", tc.Hook.EGRESS, netns=server) == ["coral_egress"]
    # Attaching again replaces, never stacks.
    tc.attach("v1", coral_tc.prog_fd("coral_ingress"), "coral_ingress", tc.Hook.INGRESS,
              netns=server)  # fmt: skip
    assert tc.attached("v1", tc.Hook.INGRESS, netns=server) == ["coral_ingress"]

    with inside(server):
        listener = socket.socket()
    with listener:
        listener.bind(("0.0.0.0", port))
        listener.listen()

        def count(r: Reason) -> int:
            return maps.read_counters()[r].packets

        # Live: a real connection works; both directions and the ARP reply count.
        conn = try_connect(client, vip, port, 2.0)
        assert conn is not None
        conn.close()
        assert count(Reason.PASS_SERVICE) >= 4  # SYN, SYN-ACK, ACK, FIN...
        assert count(Reason.PASS_VIP_ARP) >= 1

        # Fenced by mode: the SYN is dropped at ingress.
        configure(maps, vip, port, Mode.FENCED, Role.PRIMARY)
        fenced_before = count(Reason.DROP_FENCED)
        assert try_connect(client, vip, port, 0.3) is None
        assert count(Reason.DROP_FENCED) > fenced_before

        # Lease expiry fences just the same.
        configure(maps, vip, port, Mode.DUPLEX, Role.PRIMARY, lease_ns=-1)
        assert try_connect(client, vip, port, 0.3) is None
        assert count(Reason.DROP_LEASE_EXPIRED) > 0

        # And the VIP's ARP replies stop: forget the neighbour, ask again.
        with IPRoute(netns=client) as ipr:
            ipr.neigh("del", dst=vip, ifindex=ipr.link_lookup(ifname="v0")[0])
        arp_before = count(Reason.DROP_ARP_FENCED)
        assert try_connect(client, vip, port, 0.3) is None
        assert count(Reason.DROP_ARP_FENCED) > arp_before

        # Renewing is one map write.
        configure(maps, vip, port, Mode.DUPLEX, Role.PRIMARY)
        conn = try_connect(client, vip, port, 2.0)
        assert conn is not None
        conn.close()

        # A frame too short for an IPv4 header (BPF_PROG_TEST_RUN refuses
        # to build one) is dropped as truncated.
        frame = bytes(Ether(dst=link_mac(server, "v1"), type=0x0800)) + bytes(IP(dst=vip))[:12]
        with inside(client):
            raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        with raw:
            raw.bind(("v0", 0))
            raw.send(frame)
        wait_for(lambda: count(Reason.DROP_IP_TRUNCATED) == 1, 1.0, "truncated frame counted")

        # Detached: traffic flows without the programs, counters stay still.
        tc.detach("v1", netns=server)
        assert tc.attached("v1", tc.Hook.INGRESS, netns=server) == []
        configure(maps, vip, port, Mode.FENCED, Role.PRIMARY)
        before = maps.read_counters()
        conn = try_connect(client, vip, port, 2.0)
        assert conn is not None
        conn.close()
        assert maps.read_counters() == before
    tc.detach("v1", netns=server)  # detaching twice is harmless


def syn_opts() -> list[tuple[str, object]]:
    return [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1000, 0)), ("NOP", None), ("WScale", 7)]


def test_adopt_handshake_records_and_guards(
    make_ns: Callable[[str], str], coral_dp: BpfObject
) -> None:
    """SYN held and recorded, SYN-ACK recorded, ACK guarded; run inside a
    namespace so bpf_sk_lookup_tcp sees only the listener made here."""
    ns = make_ns("adopt")
    vip, client, port, cport, isn = "198.18.202.100", "198.18.202.7", 8080, 40000, 0x7FFFFFF0
    maps = CoralMaps.of(coral_dp)
    configure(maps, vip, port, Mode.DUPLEX, Role.BACKUP)
    fd_in = coral_dp.prog_fd("coral_ingress")
    key = ConnKey.of(client, cport, vip, port)
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    c2s = eth / IP(src=client, dst=vip)
    s2c = Ether(src=PEER_MAC, dst="02:00:00:00:00:02") / IP(src=vip, dst=client)

    def run(pkt: bytes) -> tuple[int, Reason]:
        before = maps.read_counters()
        with inside(ns):
            retval = prog_test_run(fd_in, pkt).retval
        after = maps.read_counters()
        moved = [r for r in Reason if after[r] != before[r]]
        assert len(moved) == 1
        return retval, moved[0]

    syn = c2s / TCP(sport=cport, dport=port, flags="SEC", seq=100, options=syn_opts())
    assert run(bytes(syn)) == (TC_ACT_SHOT, Reason.DROP_SYN_HELD)
    hs = maps.handshakes.get(key)
    assert hs is not None and hs.synack_ns == 0
    assert (hs.client.mss, hs.client.wscale, hs.client.tsval) == (1460, 7, 1000)
    all_opts = SynOpt.MSS | SynOpt.WSCALE | SynOpt.SACK_PERM | SynOpt.TIMESTAMP | SynOpt.ECN
    assert hs.client.flags == all_opts

    ack_opts = [("NOP", None), ("NOP", None), ("Timestamp", (1001, 5000))]
    ack = c2s / TCP(sport=cport, dport=port, flags="A", seq=101, ack=isn + 1, options=ack_opts)
    assert run(bytes(ack)) == (TC_ACT_SHOT, Reason.DROP_HANDSHAKE_PENDING)

    synack_opts = [("MSS", 1400), ("NOP", None), ("WScale", 9), ("Timestamp", (5000, 1000))]
    synack = s2c / TCP(sport=port, dport=cport, flags="SA", seq=isn, ack=101, options=synack_opts)
    assert run(bytes(synack)) == (TC_ACT_SHOT, Reason.DROP_SYNACK_COPY)
    hs = maps.handshakes.get(key)
    assert hs is not None and hs.synack_ns > 0 and hs.primary_isn == isn
    assert (hs.primary.mss, hs.primary.wscale, hs.primary.tsval) == (1400, 9, 5000)
    assert hs.primary.flags == SynOpt.MSS | SynOpt.WSCALE | SynOpt.TIMESTAMP  # no SACK, no ECN
    assert hs.client.mss == 1460, "the client's half is kept"

    assert run(bytes(ack)) == (TC_ACT_SHOT, Reason.DROP_ADOPT_NO_LISTENER)
    with inside(ns):
        listener = socket.socket()
    with listener:
        listener.bind(("0.0.0.0", port))
        listener.listen()
        wrong = ack.copy()
        wrong[TCP].ack = isn + 2
        assert run(bytes(wrong)) == (TC_ACT_SHOT, Reason.DROP_ADOPT_MISMATCH)
        # A later segment must not adopt: the kernel would take seq - 1 as the
        # client's ISN and shift the backup's view of the stream.
        later = ack.copy()
        later[TCP].seq = 101 + 1448
        assert run(bytes(later)) == (TC_ACT_SHOT, Reason.DROP_ADOPT_MISMATCH)
        # The kfunc only works at tc ingress, which BPF_PROG_TEST_RUN is not:
        # the kernel refuses, and the ACK is dropped (the listener would
        # answer it with an RST).
        assert run(bytes(ack)) == (TC_ACT_SHOT, Reason.DROP_ADOPT_FAILED)
    assert maps.handshakes.get(key) is not None, "kept until the connection exists"
