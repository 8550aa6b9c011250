"""A replicated pair in the lab: the data plane on primary and backup, one service.

Stands in for the node agents (which come later) wherever the data plane is
exercised on its own: tests, benchmarks. It configures identity and data
plane on both hosts and, when told a host failed, performs the agent's
takeover steps in the agent's order: the failed host's lease is gone
(fenced) before the survivor goes simplex; a surviving primary then takes
the VIP and announces it.

Call order: Pair.up(lab) -> start(argv) for the service processes ->
crash(host, mode) / take_over(survivor) -> rejoin(host) -> close(). The lab owns the
namespaces; close() only releases this process's data-plane handles (the
lab's removal takes the rest).
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from coral import netns
from coral.bpf.structs import Mode, Role
from coral.dataplane import DataPlane, identity, settings
from coral.lab.lab import Lab
from coral.lab.topology import (
    APACHE_PORT,
    LAN_IF,
    PRIVATE_IPS,
    ROUTER_LAN_IP,
    SERVER_LAN_IPS,
    SERVICE_PORT,
    SERVICE_VIP,
    LabError,
)

HOSTS = ("primary", "backup")
LOG_PORT = 7000
"""The proxies' logging channel (over the private link when the lab has one)."""
LEASE_S = 3600.0
"""The stand-in agent never lets a lease lapse by itself; crash() fences instead."""


def peer_of(host: str) -> str:
    return "backup" if host == "primary" else "primary"


@dataclass
class Pair:
    """Primary and backup of one lab, replicating VIP:PORT."""

    lab: Lab
    vip: str = SERVICE_VIP
    port: int = SERVICE_PORT
    planes: dict[str, DataPlane] = field(default_factory=dict)
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    """(host, process) of every service program started, oldest first."""

    @classmethod
    def up(
        cls,
        lab: Lab,
        vip: str = SERVICE_VIP,
        port: int = SERVICE_PORT,
        capacity: int = 65536,
        rto_min_ms: float = 0.0,
    ) -> Pair:
        """Data plane on both hosts (CAPACITY replicated connections, service
        sockets with a minimum RTO of RTO_MIN_MS if set), service duplex."""
        pair = cls(lab, vip, port)
        try:
            pair._configure(capacity, rto_min_ms)
        except BaseException:
            pair.close()
            raise
        return pair

    def pin_dir(self, host: str) -> Path:
        return self.lab.bpffs / host

    def _configure(self, capacity: int, rto_min_ms: float) -> None:
        for host in HOSTS:
            # No delayed ACKs toward clients: the primary's acknowledgement
            # waits for the backup's, and neither should wait for a timer.
            self.lab.run(
                host,
                ["ip", "route", "replace", "default", "via", ROUTER_LAN_IP, "dev", LAN_IF,
                 "quickack", "1"],
            )  # fmt: skip
            self.pin_dir(host).mkdir(exist_ok=True)
            plane = DataPlane.open(
                self.lab.namespace(host),
                LAN_IF,
                self.pin_dir(host),
                conn_capacity=capacity,
                rto_min_ms=rto_min_ms,
            )
            self.planes[host] = plane
            plane.attach()
        self.planes["primary"].hide_vip(self.vip)
        self.planes["backup"].claim_vip(self.vip)
        for host, role in (("primary", Role.PRIMARY), ("backup", Role.BACKUP)):
            self._add_service(host, role)
        for host in HOSTS:
            self._set_duplex(host)

    def _add_service(self, host: str, role: Role) -> None:
        """HOST's service entry with ROLE, under a live lease (FENCED if that is new)."""
        peer = peer_of(host)
        peer_mac = identity.mac_of(self.lab.namespace(peer), LAN_IF)
        plane = self.planes[host]
        plane.add_service(self.vip, self.port, role, SERVER_LAN_IPS[peer], peer_mac)
        plane.renew_lease(1, LEASE_S)

    def _set_duplex(self, host: str) -> None:
        theirs = settings.read(self.lab.namespace(peer_of(host)), LAN_IF)
        self.planes[host].set_mode(self.vip, self.port, Mode.DUPLEX, peer_settings=theirs)

    def start(self, argv: Callable[[str], list[str]], hosts: tuple[str, ...] = HOSTS) -> None:
        """Start the same service program on HOSTS (ARGV(host) builds its command);
        its output goes to service.log in the host's lab directory."""
        for host in hosts:
            with open(self.service_log(host), "ab") as log:
                proc = self.lab.popen(host, argv(host), stdout=log, stderr=subprocess.STDOUT)
                self.procs.append((host, proc))

    def service(self, host: str) -> subprocess.Popen[bytes]:
        """The service program started last on HOST."""
        return next(proc for h, proc in reversed(self.procs) if h == host)

    def start_proxies(self, *options: str, hosts: tuple[str, ...] = HOSTS) -> None:
        """The replicating front proxy on HOSTS (VIP:PORT -> the host's Apache), with
        extra `coral proxy` OPTIONS; returns once they listen."""
        key = self.lab.dir / "log.key"
        if not key.exists():
            key.touch(mode=0o600)
            key.write_bytes(secrets.token_hex(32).encode())
        addrs = PRIVATE_IPS if self.lab.topo.private_link else SERVER_LAN_IPS

        def argv(host: str) -> list[str]:
            own, peer = addrs[host], addrs[peer_of(host)]
            return [
                *(sys.executable, "-m", "coral", "proxy", "--listen", f"{self.vip}:{self.port}"),
                *("--backend", f"127.0.0.1:{APACHE_PORT}", "--pin-dir", str(self.pin_dir(host))),
                *("--log-key-file", str(key), "--log-listen", f"{own}:{LOG_PORT}"),
                *("--log-peer", f"{peer}:{LOG_PORT}", "--log-local", own, *options),
            ]

        self.start(argv, hosts)
        for host in hosts:
            if not netns.wait_tcp(self.lab.namespace(host), self.vip, self.port, 10):
                raise LabError(f"the proxy on {host} did not start: see {self.service_log(host)}")

    def service_log(self, host: str) -> Path:
        return self.lab.dir / host / "service.log"

    def wait_progress(self, count: int, progress: int, timeout: float) -> None:
        """Wait until COUNT replicated connections each moved PROGRESS bytes both ways
        (as the primary sees it: client bytes the backup holds, bytes sent); raise
        LabError with what was seen after TIMEOUT seconds."""

        def seen() -> list[tuple[int, int]]:
            return [
                (
                    (c.acked_to_client - c.client_isn) % 2**32,
                    (c.primary_snd_nxt - c.primary_isn) % 2**32,
                )
                for c in self.planes["primary"].connections()
                if "BACKUP_SEEN" in c.flags
            ]

        deadline = time.monotonic() + timeout
        while True:
            moved = seen()
            if len(moved) >= count and all(up > progress and dn > progress for up, dn in moved):
                return
            if time.monotonic() > deadline:
                raise LabError(
                    f"{count} connections did not move {progress} bytes each way within "
                    f"{timeout} s; (up, down) seen: {moved}"
                )
            time.sleep(0.01)

    def take_over(self, survivor: str) -> None:
        """The survivor serves alone: one map write; a primary also takes the VIP."""
        plane = self.planes[survivor]
        plane.set_mode(self.vip, self.port, Mode.SIMPLEX)
        if survivor == "primary":
            plane.claim_vip(self.vip)
            plane.gratuitous_arp(self.vip, count=3, spacing=0.01)

    def crash(self, host: str, mode: str) -> None:
        """Fail HOST (coral lab crash) and let its peer take over, as agents would."""
        self.lab.crash(host, mode)
        self.fail_over(host)

    def fail_over(self, host: str) -> None:
        """HOST failed (the caller made it so): its peer takes over, as agents would."""
        # A failed host's agent stops renewing: its lease lapses. Fencing
        # stands for that lapse, so the survivor never overlaps with it.
        self.planes[host].fence()
        self.take_over(peer_of(host))

    def rejoin(self, host: str) -> None:
        """HOST, fenced while its peer served alone, comes back as the peer's backup:
        the agents' re-integration steps in their order. The host serving alone
        becomes the primary and hides the VIP; HOST becomes the backup, claims the
        VIP, goes duplex and announces it; then its peer goes duplex."""
        survivor = peer_of(host)
        self.planes[survivor].hide_vip(self.vip)
        self._add_service(survivor, Role.PRIMARY)
        self.planes[survivor].set_mode(self.vip, self.port, Mode.SIMPLEX)
        self._add_service(host, Role.BACKUP)
        self.planes[host].claim_vip(self.vip)
        self._set_duplex(host)
        self.planes[host].gratuitous_arp(self.vip, count=3, spacing=0.01)
        self._set_duplex(survivor)

    def stop_services(self) -> None:
        """Stop every service program started (the data plane stays as it is)."""
        for _, proc in self.procs:
            proc.kill()
            proc.wait()
        self.procs.clear()

    def close(self) -> None:
        self.stop_services()
        for plane in self.planes.values():
            plane.close()
        self.planes.clear()
