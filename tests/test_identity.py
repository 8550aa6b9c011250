"""VIP ownership on the LAN, gratuitous ARP, and the duplex settings check, in the lab."""

from __future__ import annotations

import json
import time

import pytest

from coral.dataplane import identity, settings
from coral.lab import Lab
from coral.lab.topology import LAN_IF, SERVICE_VIP

pytestmark = pytest.mark.root


def router_mac_for(lab: Lab, ip: str) -> str | None:
    """The MAC the router's ARP table holds for IP (None if it has none)."""
    entries = json.loads(lab.run("router", ["ip", "-j", "neigh", "show", ip]).stdout)
    macs = [e.get("lladdr") for e in entries if e.get("lladdr")]
    return macs[0] if macs else None


def mac_str(lab: Lab, host: str) -> str:
    return identity.mac_of(lab.namespace(host), LAN_IF).hex(":")


def test_only_the_owner_answers_arp_and_garp_moves_the_vip(lab: Lab) -> None:
    p, b = lab.namespace("primary"), lab.namespace("backup")
    identity.hide_vip(p, SERVICE_VIP, LAN_IF)
    identity.claim_vip(b, SERVICE_VIP, LAN_IF)
    assert lab.run("router", ["ping", "-c1", "-W2", SERVICE_VIP], check=False).returncode == 0
    assert router_mac_for(lab, SERVICE_VIP) == mac_str(lab, "backup")
    # the primary accepts the VIP (it is local there) but never claimed it
    assert "inet " + SERVICE_VIP in lab.run("primary", ["ip", "addr", "show", "lo"]).stdout

    # takeover: the primary moves the VIP to its LAN interface and announces it
    identity.remove_vip(b, SERVICE_VIP, LAN_IF)
    identity.claim_vip(p, SERVICE_VIP, LAN_IF)
    identity.gratuitous_arp(p, SERVICE_VIP, LAN_IF, count=3, spacing=0.01)
    deadline = time.monotonic() + 2
    while router_mac_for(lab, SERVICE_VIP) != mac_str(lab, "primary"):
        assert time.monotonic() < deadline, "router did not learn the primary's MAC from GARP"
        time.sleep(0.01)
    assert lab.run("router", ["ping", "-c1", "-W2", SERVICE_VIP], check=False).returncode == 0


def test_vip_operations_are_idempotent(lab: Lab) -> None:
    b = lab.namespace("backup")
    identity.claim_vip(b, SERVICE_VIP, LAN_IF)
    identity.claim_vip(b, SERVICE_VIP, LAN_IF)
    identity.remove_vip(b, SERVICE_VIP, LAN_IF)
    identity.remove_vip(b, SERVICE_VIP, LAN_IF)
    assert SERVICE_VIP not in lab.run("backup", ["ip", "addr"]).stdout
    with pytest.raises(ValueError):
        identity.claim_vip(b, "not-an-address", LAN_IF)
    with pytest.raises(LookupError, match="no interface"):
        identity.claim_vip(b, SERVICE_VIP, "nosuch0")


def test_garp_frames_are_well_formed() -> None:
    frames = identity.garp_frames("198.18.0.100", bytes.fromhex("020000000001"))
    assert [len(f) for f in frames] == [42, 42]
    req, rep = frames
    assert req[12:14] == b"\x08\x06" and req[20:22] == b"\x00\x01" and rep[20:22] == b"\x00\x02"
    # sender IP == target IP: gratuitous
    assert req[28:32] == req[38:42] == bytes([198, 18, 0, 100])


def test_lab_hosts_may_run_duplex_and_a_mismatch_is_named(lab: Lab) -> None:
    p, b = lab.namespace("primary"), lab.namespace("backup")
    # the lab forces timestamps apart (1 vs 2): both enabled, so compatible
    assert settings.mismatches(settings.read(p, LAN_IF), settings.read(b, LAN_IF)) == []
    identity.set_sysctl(b, "net.ipv4.tcp_sack", "0")
    identity.set_sysctl(b, "net.ipv4.tcp_syncookies", "0")
    lab.run("backup", ["ip", "link", "set", LAN_IF, "mtu", "1400"])
    problems = settings.mismatches(settings.read(p, LAN_IF), settings.read(b, LAN_IF))
    assert any("tcp_sack is 1 on the primary but 0 on the backup" in x for x in problems)
    assert any("tcp_syncookies is 0 on the backup" in x for x in problems)
    assert any("MTU is 1500 on the primary but 1400" in x for x in problems)
