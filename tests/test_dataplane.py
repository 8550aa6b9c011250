"""The data-plane control API (coral.dataplane.plane) and `coral datapath`, on lab hosts.

Each test loads coral_dp for a lab host with its maps pinned under the lab's
bpffs (lab.bpffs / host); the lab fixture removes namespaces, pins and
processes afterwards, and every socket is closed by its with-block.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from coral import bpf, cli
from coral.bpf import tc
from coral.bpf.structs import ConnFlag, ConnKey, ConnState, ServiceKey, VipKey
from coral.dataplane import (
    Connection,
    DataPlane,
    DataPlaneError,
    Mode,
    Role,
    StaleEpoch,
    closing_marker,
    identity,
    open_view,
    settings,
)
from coral.lab import Lab
from coral.lab.topology import LAN_IF, SERVER_LAN_IPS, SERVICE_PORT, SERVICE_VIP
from coral.netns import call_in_netns

pytestmark = pytest.mark.root

PRIMARY_IP, BACKUP_IP = SERVER_LAN_IPS["primary"], SERVER_LAN_IPS["backup"]
OTHER_PORT = 9000  # not a service: plain traffic the programs pass


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    bpf.build()


@contextmanager
def plane(lab: Lab, host: str, **kwargs: Any) -> Iterator[DataPlane]:
    dp = DataPlane.open(lab.namespace(host), LAN_IF, lab.bpffs / host, **kwargs)
    try:
        yield dp
    finally:
        dp.close()


def add_backup_service(lab: Lab, dp: DataPlane, port: int = SERVICE_PORT) -> None:
    peer_mac = identity.mac_of(lab.namespace("primary"), LAN_IF)
    dp.add_service(SERVICE_VIP, port, Role.BACKUP, PRIMARY_IP, peer_mac)


@contextmanager
def listener(ns: str, addr: str, port: int) -> Iterator[socket.socket]:
    def make() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        s.listen(16)
        return s

    with call_in_netns(ns, make) as s:
        yield s


def connect(ns: str, addr: str, port: int, timeout: float) -> socket.socket | None:
    """A connection from NS, or None if the handshake does not complete in time."""
    s = call_in_netns(ns, socket.socket)
    s.settimeout(timeout)
    try:
        s.connect((addr, port))
    except OSError:
        s.close()
        return None
    return s


def can_connect(ns: str, addr: str, port: int, timeout: float) -> bool:
    s = connect(ns, addr, port, timeout)
    if s is not None:
        s.close()
    return s is not None


def coral(*args: str) -> subprocess.CompletedProcess[str]:
    """`coral ARGS` as a process of its own (the real thing, slower)."""
    argv = [sys.executable, "-m", "coral", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def coral_here(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`coral ARGS` in this process: exit status, output, error output."""
    capsys.readouterr()
    status = cli.main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_open_attach_detach_and_reopen_finds_pinned_state(lab: Lab) -> None:
    for host in ("primary", "backup"):
        ns = lab.namespace(host)
        with plane(lab, host) as dp:
            dp.attach()
            dp.attach()  # replaces, never stacks
            assert tc.attached(LAN_IF, tc.Hook.INGRESS, netns=ns) == ["coral_ingress"]
            assert tc.attached(LAN_IF, tc.Hook.EGRESS, netns=ns) == ["coral_egress"]
            if host == "backup":
                add_backup_service(lab, dp)
                dp.renew_lease(3, 30)
    # closed: the programs stay attached and pass what is not a service
    assert lab.run("router", ["ping", "-c1", "-W2", BACKUP_IP], check=False).returncode == 0

    b = lab.namespace("backup")
    with plane(lab, "backup") as dp:  # an agent restarting
        found = [(s.vip, s.port, s.role, s.mode, s.epoch) for s in dp.services()]
        assert found == [(SERVICE_VIP, SERVICE_PORT, Role.BACKUP, Mode.FENCED, 3)]
        assert 0 < dp.lease_remaining_s() <= 30
        assert dp.counters()["PASS_OTHER"].packets > 0
        dp.detach()
        assert tc.attached(LAN_IF, tc.Hook.INGRESS, netns=b) == []
        assert tc.attached(LAN_IF, tc.Hook.EGRESS, netns=b) == []
    with pytest.raises(DataPlaneError, match=r"coral_conns pinned in .* holds 65536 .* but 1024"):
        DataPlane.open(b, LAN_IF, lab.bpffs / "backup", conn_capacity=1024)


def test_duplex_requires_the_peer_settings_and_names_each_mismatch(lab: Lab) -> None:
    p, b = lab.namespace("primary"), lab.namespace("backup")
    with plane(lab, "backup") as bdp, plane(lab, "primary") as pdp:
        add_backup_service(lab, bdp)
        pdp.add_service(
            SERVICE_VIP, SERVICE_PORT, Role.PRIMARY, BACKUP_IP, identity.mac_of(b, LAN_IF)
        )
        with pytest.raises(DataPlaneError, match="needs the peer's TCP settings"):
            bdp.set_mode(SERVICE_VIP, SERVICE_PORT, Mode.DUPLEX)
        for dp, peer in ((bdp, p), (pdp, b)):
            dp.set_mode(
                SERVICE_VIP, SERVICE_PORT, Mode.DUPLEX, peer_settings=settings.read(peer, LAN_IF)
            )
            assert dp.mode(SERVICE_VIP, SERVICE_PORT) is Mode.DUPLEX
            dp.set_mode(SERVICE_VIP, SERVICE_PORT, Mode.SIMPLEX)

        identity.set_sysctl(p, "net.ipv4.tcp_sack", "0")
        # the same sentence from either side: each host orders the settings by its role
        for dp, peer in ((bdp, p), (pdp, b)):
            with pytest.raises(DataPlaneError, match="tcp_sack is 0 on the primary but 1 on the"):
                dp.set_mode(
                    SERVICE_VIP,
                    SERVICE_PORT,
                    Mode.DUPLEX,
                    peer_settings=settings.read(peer, LAN_IF),
                )
            assert dp.mode(SERVICE_VIP, SERVICE_PORT) is Mode.SIMPLEX


def test_set_mode_changes_only_the_mode_and_bad_input_is_refused(lab: Lab) -> None:
    with plane(lab, "backup") as dp:
        add_backup_service(lab, dp)
        dp.renew_lease(9, 30)
        key, vip_key = ServiceKey.of(SERVICE_VIP, SERVICE_PORT), VipKey.of(SERVICE_VIP)
        before = dp.maps.services.get(key)
        assert before is not None and before.mode == Mode.FENCED
        dp.set_mode(SERVICE_VIP, SERVICE_PORT, "simplex")
        after = dp.maps.services.get(key)
        assert after is not None and after.mode == Mode.SIMPLEX
        after.mode = before.mode
        assert bytes(after) == bytes(before)
        vip = dp.maps.vips.get(vip_key)
        assert vip is not None and vip.mode == Mode.SIMPLEX and vip.epoch == 9

        # re-applying the same configuration keeps the mode; another peer fences
        add_backup_service(lab, dp)
        assert dp.mode(SERVICE_VIP, SERVICE_PORT) is Mode.SIMPLEX
        # the VIP speaks while any of its services is live
        add_backup_service(lab, dp, port=443)
        assert dp.mode(SERVICE_VIP, 443) is Mode.FENCED
        assert dp.maps.vips.get(vip_key).mode == Mode.SIMPLEX  # type: ignore[union-attr]
        dp.add_service(SERVICE_VIP, SERVICE_PORT, Role.BACKUP, "198.18.0.13", b"\x02" * 6)
        assert dp.mode(SERVICE_VIP, SERVICE_PORT) is Mode.FENCED
        assert dp.maps.vips.get(vip_key).mode == Mode.FENCED  # type: ignore[union-attr]
        dp.remove_service(SERVICE_VIP, 443)
        assert dp.maps.vips.get(vip_key) is not None
        dp.remove_service(SERVICE_VIP, SERVICE_PORT)
        assert dp.maps.vips.get(vip_key) is None and dp.services() == []

        add_backup_service(lab, dp)
        bad = [
            (lambda: dp.set_mode(SERVICE_VIP, SERVICE_PORT, "turbo"), "unknown mode 'turbo'"),
            (lambda: dp.set_mode(SERVICE_VIP, SERVICE_PORT, 7), "unknown mode 7"),  # type: ignore[arg-type]
            (lambda: dp.set_mode(SERVICE_VIP, 81, Mode.SIMPLEX), "no service 198.18.0.100:81"),
            (lambda: dp.add_service(SERVICE_VIP, 80, "leader", PRIMARY_IP, b"\2" * 6), "role"),
            (lambda: dp.add_service("198.18.0", 80, Role.BACKUP, PRIMARY_IP, b"\2" * 6), "VIP"),
            (lambda: dp.add_service(SERVICE_VIP, 0, Role.BACKUP, PRIMARY_IP, b"\2" * 6), "port"),
            (lambda: dp.add_service(SERVICE_VIP, 80, Role.BACKUP, "::1", b"\2" * 6), "peer"),
            (lambda: dp.add_service(SERVICE_VIP, 80, Role.BACKUP, PRIMARY_IP, "zz"), "MAC"),
            (lambda: dp.renew_lease(-1, 30), "bad epoch"),
            (lambda: dp.renew_lease(9, float("nan")), "bad lease duration"),
            (lambda: dp.gc(-1), "bad idle time"),
            (lambda: dp.mark_closing("client", 1, SERVICE_VIP, 80), "client address"),
            (lambda: dp.claim_vip("198.18.0.300"), "VIP"),
        ]
        for call, message in bad:
            with pytest.raises(DataPlaneError, match=message):
                call()
        assert dp.mode(SERVICE_VIP, SERVICE_PORT) is Mode.FENCED


def test_lease_renewals_and_mode_switches_from_two_threads_lose_nothing(lab: Lab) -> None:
    """The agent renews leases on its event loop while its netlink thread switches
    modes: each of those reads an entry, changes it and writes it back, and
    without the data plane's lock a renewal could write back the mode it read
    before a switch (a new backup stayed fenced: the campaign's cycle 51)."""
    with plane(lab, "backup") as dp:
        add_backup_service(lab, dp)
        dp.renew_lease(1, 30)
        stop = threading.Event()

        def renew() -> None:
            while not stop.is_set():
                dp.renew_lease(1, 30)

        renewer = threading.Thread(target=renew)
        renewer.start()
        try:
            for i in range(300):
                mode = (Mode.SIMPLEX, Mode.FENCED)[i % 2]
                dp.set_mode(SERVICE_VIP, SERVICE_PORT, mode)
                service = dp.maps.services.get(ServiceKey.of(SERVICE_VIP, SERVICE_PORT))
                vip = dp.maps.vips.get(VipKey.of(SERVICE_VIP))
                assert service is not None and vip is not None
                assert (service.mode, vip.mode) == (mode, mode), f"switch {i} lost"
        finally:
            stop.set()
            renewer.join()


def test_expired_lease_and_fencing_drop_a_real_client(lab: Lab) -> None:
    b, c1 = lab.namespace("backup"), lab.namespace("client1")
    with plane(lab, "backup") as dp, listener(b, "0.0.0.0", SERVICE_PORT):
        dp.attach()
        dp.claim_vip(SERVICE_VIP)
        add_backup_service(lab, dp)
        dp.renew_lease(5, 30)
        dp.set_mode(SERVICE_VIP, SERVICE_PORT, Mode.SIMPLEX)
        # also teaches the router the VIP's MAC: fenced ARP replies would hide the drops
        assert can_connect(c1, SERVICE_VIP, SERVICE_PORT, 2.0)
        assert 29 < dp.lease_remaining_s() <= 30

        with pytest.raises(StaleEpoch, match="epoch 4 is older than the data plane's epoch 5"):
            dp.renew_lease(4, 30)
        dp.renew_lease(5, 0)
        assert dp.lease_remaining_s() == 0
        assert not can_connect(c1, SERVICE_VIP, SERVICE_PORT, 0.3)
        assert dp.counters()["DROP_LEASE_EXPIRED"].packets >= 1

        dp.renew_lease(6, 30)  # a newer epoch replaces the old one; the mode is untouched
        assert dp.epoch() == 6
        assert can_connect(c1, SERVICE_VIP, SERVICE_PORT, 2.0)

        dp.fence()
        assert dp.mode(SERVICE_VIP, SERVICE_PORT) is Mode.FENCED
        assert dp.lease_remaining_s() == 0 and dp.epoch() == 6
        assert not can_connect(c1, SERVICE_VIP, SERVICE_PORT, 0.3)
        assert dp.counters()["DROP_FENCED"].packets >= 1


def test_connections_closing_marks_and_gc(lab: Lab) -> None:
    b, c1 = lab.namespace("backup"), lab.namespace("client1")
    client_ip = lab.topo.address("client1")
    with plane(lab, "backup") as dp, listener(b, BACKUP_IP, OTHER_PORT) as srv:
        cli = connect(c1, BACKUP_IP, OTHER_PORT, 2.0)
        assert cli is not None
        conn, _ = srv.accept()
        with cli, conn:
            with closing_marker(lab.bpffs / "backup") as mark:
                mark(conn)  # as the stream server or the proxy would, from its own process
            real = ConnKey.of(client_ip, cli.getsockname()[1], BACKUP_IP, OTHER_PORT)
            since = dp.maps.closing.get(real)
            assert since is not None and 0 <= time.monotonic_ns() - since.value < 5 * 10**9

            # entries as the programs would write them; one has no socket
            old = time.monotonic_ns() - 10 * 10**9
            gone = ConnKey.of(client_ip, 40000, SERVICE_VIP, SERVICE_PORT)
            state = ConnState(
                last_ns=old,
                primary_isn=1000,
                client_isn=2000,
                flags=ConnFlag.BACKUP_SEEN,
                mode=Mode.DUPLEX,
                backup_ack=2101,
                client_ack=1501,
                delivered_ack=1401,
                backup_snd_nxt=1451,
                primary_snd_nxt=1601,
                acked_to_client=2051,
            )
            dp.maps.conns.put(gone, state)
            dp.mark_closing(client_ip, 40000, SERVICE_VIP, SERVICE_PORT)
            dp.maps.conns.put(real, ConnState(last_ns=old, mode=Mode.SIMPLEX))
            fresh = ConnKey.of(client_ip, 40001, SERVICE_VIP, SERVICE_PORT)
            dp.maps.conns.put(fresh, ConnState(last_ns=time.monotonic_ns(), mode=Mode.DUPLEX))

            found = {c.client_port: c for c in dp.connections()}
            assert found[40000] == Connection(
                client_ip=client_ip,
                client_port=40000,
                vip=SERVICE_VIP,
                vip_port=SERVICE_PORT,
                mode=Mode.DUPLEX,
                flags=("BACKUP_SEEN",),
                primary_isn=1000,
                client_isn=2000,
                backup_ack=2101,
                client_ack=1501,
                delivered_ack=1401,
                backup_snd_nxt=1451,
                primary_snd_nxt=1601,
                acked_to_client=2051,
                last_ns=old,
                closing=True,
            )
            assert found[real.client_port].closing and found[real.client_port].mode is Mode.SIMPLEX
            assert not found[40001].closing
            assert dp.handshakes() == 0

            # no socket and quiet: forgotten; a live socket or recent traffic: kept
            assert dp.gc(idle_s=5) == 1
            assert {bytes(k) for k in dp.maps.conns} == {bytes(real), bytes(fresh)}
            assert dp.maps.closing.get(gone) is None and dp.maps.closing.get(real) is not None

            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # the server's socket is gone at once (RST on close): its entry and mark go too
        orphan = (client_ip, 40002, SERVICE_VIP, SERVICE_PORT)
        dp.mark_closing(*orphan)  # a mark with no connection entry (never replicated)
        assert dp.gc(idle_s=5) == 1
        assert {bytes(k) for k in dp.maps.conns} == {bytes(fresh)}
        assert dp.gc(idle_s=0) == 2  # fresh, and the orphan mark
        assert list(dp.maps.conns) == [] and list(dp.maps.closing) == []


def test_cli_reads_the_pinned_maps(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    pin = lab.bpffs / "backup"
    with plane(lab, "backup") as dp:
        dp.attach()
        add_backup_service(lab, dp)
        dp.renew_lease(2, 30)
        dp.set_mode(SERVICE_VIP, SERVICE_PORT, Mode.SIMPLEX)
        key = ConnKey.of("198.18.1.11", 40000, SERVICE_VIP, SERVICE_PORT)
        dp.maps.conns.put(key, ConnState(last_ns=time.monotonic_ns(), mode=Mode.DUPLEX))
        lab.run("router", ["ping", "-c2", "-i0.1", BACKUP_IP])
    # the object is closed: the CLI sees what the maps hold, loading nothing

    stats = coral("datapath", "stats", "--pin-dir", str(pin), "--json")
    assert stats.returncode == 0, stats.stderr
    report = json.loads(stats.stdout)
    assert report["counters"]["PASS_OTHER"]["packets"] >= 4  # 2 echo requests in, 2 replies out
    assert all(c["packets"] > 0 for c in report["counters"].values())
    [svc] = report["services"]
    assert (svc["vip"], svc["port"], svc["role"], svc["mode"], svc["epoch"]) == (
        SERVICE_VIP,
        SERVICE_PORT,
        "backup",
        "simplex",
        2,
    )
    assert 0 < svc["lease_remaining_s"] <= 30
    assert (report["connections"], report["conn_capacity"], report["handshakes"]) == (1, 65536, 0)

    every = json.loads(
        coral_here(capsys, "datapath", "stats", "--pin-dir", str(pin), "--json", "--all")[1]
    )
    assert every["counters"]["DROP_FENCED"] == {"packets": 0, "bytes": 0}
    assert "CONTINUE" not in every["counters"]

    table = coral_here(capsys, "datapath", "stats", "--pin-dir", str(pin))[1]
    assert "PASS_OTHER" in table and f"{SERVICE_VIP}:{SERVICE_PORT}" in table
    assert "simplex" in table and "DROP_FENCED" not in table

    conns = json.loads(coral_here(capsys, "datapath", "conns", "--pin-dir", str(pin), "--json")[1])
    assert [(c["client_port"], c["mode"], c["closing"]) for c in conns] == [
        (40000, "duplex", False)
    ]
    assert "198.18.1.11:40000" in coral_here(capsys, "datapath", "conns", "--pin-dir", str(pin))[1]


def test_missing_things_are_clear_errors(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    b = lab.namespace("backup")
    nowhere = lab.bpffs / "nothing"
    missing_ns = f"coral-{lab.name}-nosuch"
    pin = lab.bpffs / "x"
    bad_opens = [
        (lambda: DataPlane.open(missing_ns, LAN_IF, pin), "no network namespace"),
        (lambda: DataPlane.open(b, "nosuch0", pin), "no interface 'nosuch0'"),
        (lambda: DataPlane.open(b, LAN_IF, lab.dir / "plain"), "is not on a bpffs"),
        (lambda: DataPlane.open(b, LAN_IF, pin, conn_capacity=0), "capacity 0"),
    ]
    for call, message in bad_opens:
        with pytest.raises(DataPlaneError, match=message):
            call()
    assert not os.path.exists(f"/run/netns/{missing_ns}")  # never created by a lookup
    assert not (lab.dir / "plain").exists()
    with pytest.raises(DataPlaneError, match="no coral data plane pinned"):
        open_view(nowhere)
    with pytest.raises(DataPlaneError, match=r"cannot open .*coral_closing"):
        closing_marker(nowhere)
    out = coral("datapath", "stats", "--pin-dir", str(nowhere))
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("coral datapath: no coral data plane pinned in")
    assert "Traceback" not in out.stderr
    status, _, err = coral_here(capsys, "datapath", "conns", "--pin-dir", str(nowhere))
    assert status == 1 and "no coral data plane pinned" in err
