"""The service identity on the LAN: VIP addresses and gratuitous ARP.

The backup owns a service's VIP on the LAN (configured on its LAN
interface, answers ARP). The primary must accept packets to the VIP but
never claim it: the VIP sits on its loopback device and its LAN interface
answers ARP only for addresses configured on it (arp_ignore=1) and never
uses the VIP as an ARP source (arp_announce=2). Taking the VIP over means
moving it to the LAN interface and announcing it with gratuitous ARP, sent
several times because a single frame can be lost.

Everything here acts on the network namespace given (None: the caller's),
so the same code serves the agent on a real host and tests on lab hosts.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from coral import netns

ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6


def set_sysctl(ns: str | None, name: str, value: str) -> None:
    """Write sysctl NAME (dotted) in namespace NS."""
    path = Path("/proc/sys") / name.replace(".", "/")
    netns.call_in_netns(ns, lambda: path.write_text(value))


def get_sysctl(ns: str | None, name: str) -> str:
    path = Path("/proc/sys") / name.replace(".", "/")
    return str(netns.call_in_netns(ns, lambda: path.read_text().strip()))


def _link_attr(ns: str | None, ifname: str, attr: str) -> object:
    with IPRoute(netns=ns, flags=0) if ns else IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise LookupError(f"no interface {ifname!r}")
        return ipr.get_links(idx[0])[0].get_attr(attr)


def mac_of(ns: str | None, ifname: str) -> bytes:
    """The hardware address of IFNAME in NS."""
    return bytes.fromhex(str(_link_attr(ns, ifname, "IFLA_ADDRESS")).replace(":", ""))


def mtu_of(ns: str | None, ifname: str) -> int:
    return int(str(_link_attr(ns, ifname, "IFLA_MTU")))


def neighbor_mac(ns: str | None, ip: str, ifname: str) -> bytes | None:
    """IP's MAC from the neighbour table of IFNAME (None if not resolved yet)."""
    with IPRoute(netns=ns, flags=0) if ns else IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise LookupError(f"no interface {ifname!r}")
        for n in ipr.get_neighbours(ifindex=idx[0], dst=ip):
            mac = n.get_attr("NDA_LLADDR")
            if mac and n["state"] not in (0x01, 0x20):  # NUD_INCOMPLETE, NUD_FAILED
                return bytes.fromhex(mac.replace(":", ""))
    return None


def hide_vip(ns: str | None, vip: str, lan_if: str) -> None:
    """Primary: accept packets to VIP, never claim it on the LAN."""
    set_sysctl(ns, f"net.ipv4.conf.{lan_if}.arp_ignore", "1")
    set_sysctl(ns, f"net.ipv4.conf.{lan_if}.arp_announce", "2")
    remove_vip(ns, vip, lan_if)
    _addr(ns, "add", vip, "lo")


def claim_vip(ns: str | None, vip: str, lan_if: str) -> None:
    """Backup, or a host taking over: own VIP on the LAN interface (answers ARP)."""
    _addr(ns, "add", vip, lan_if)
    _addr(ns, "del", vip, "lo")


def remove_vip(ns: str | None, vip: str, lan_if: str) -> None:
    """Stop owning VIP on the LAN (it stays nowhere; see hide_vip for the primary)."""
    _addr(ns, "del", vip, lan_if)


def _addr(ns: str | None, op: str, vip: str, ifname: str) -> None:
    ipaddress.IPv4Address(vip)  # a clear error for a bad address
    with IPRoute(netns=ns, flags=0) if ns else IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise LookupError(f"no interface {ifname!r}")
        try:
            ipr.addr(op, index=idx[0], address=vip, prefixlen=32)
        except NetlinkError as e:
            # add of a present address (EEXIST), del of an absent one (EADDRNOTAVAIL)
            if e.code not in (17, 99):
                raise


def garp_frames(vip: str, mac: bytes) -> list[bytes]:
    """A gratuitous ARP request and reply announcing VIP at MAC (both are in use)."""
    ip = socket.inet_aton(vip)
    frames = []
    for op, target_mac in ((1, b"\0" * 6), (2, BROADCAST)):
        arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, mac, ip, target_mac, ip)
        frames.append(BROADCAST + mac + struct.pack("!H", ETH_P_ARP) + arp)
    return frames


class Announcer:
    """Gratuitous ARP on LAN_IF in NS through one packet socket kept open: closing a
    packet socket waits for an RCU grace period (synchronize_net(); 20-30 ms on
    the lab's machine), too long for a takeover to pay for each announcement.
    Sending itself takes microseconds."""

    def __init__(self, ns: str | None, lan_if: str) -> None:
        self.mac = mac_of(ns, lan_if)

        def make() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # send only: no receive hook
            s.bind((lan_if, 0))
            return s

        self._sock = netns.call_in_netns(ns, make)

    def announce(self, vip: str) -> None:
        """One gratuitous ARP request and reply for VIP."""
        for frame in garp_frames(vip, self.mac):
            self._sock.send(frame)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Announcer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def gratuitous_arp(
    ns: str | None, vip: str, lan_if: str, count: int = 3, spacing: float = 0.02
) -> None:
    """Announce VIP on LAN_IF COUNT times, SPACING seconds apart (raw frames, no arping)."""
    with Announcer(ns, lan_if) as announcer:
        for i in range(count):
            announcer.announce(vip)
            if i + 1 < count:
                time.sleep(spacing)
