"""The lab's address plan: which hosts exist, how they are wired, what they are called.

Pure data, no side effects, so the plan can be read (``coral lab info``) and
tested without root. Every namespace is called ``coral-<lab>-<host>``: two
labs with different names never collide, and ``coral lab down --all``
recognises leftovers by the prefix. Addresses come from 198.18.0.0/15
(RFC 2544, reserved for benchmarking and never routed); every lab reuses the
same plan, isolated by its own namespaces.

Wiring::

    client1..N --(cli bridge in router)-- router --(lan bridge in router)-- primary
                                                                        |-- backup
                                                                        `-- spare
    primary --(optional private link)-- backup
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field

PREFIX = "coral-"
NAME_RE = re.compile(r"^[a-z0-9]{1,12}$")
"""Lab names: short and dash-free, so ``coral-<lab>-<host>`` parses unambiguously."""

LAN_NET = "198.18.0"
CLIENT_NET = "198.18.1"
PRIVATE_NET = "198.18.2"
PREFIXLEN = 24
ROUTER_LAN_IP = f"{LAN_NET}.1"
ROUTER_CLIENT_IP = f"{CLIENT_NET}.1"
SERVICE_VIP = f"{LAN_NET}.100"
SECOND_VIP = f"{LAN_NET}.101"
"""A second service address, for dual-role pairs (crossed roles need distinct VIPs)."""
SERVICE_PORT = 80
APACHE_PORT = 8080
SERVER_HOSTS = ("primary", "backup", "spare")
SERVER_LAN_IPS = {"primary": f"{LAN_NET}.11", "backup": f"{LAN_NET}.12", "spare": f"{LAN_NET}.13"}
PRIVATE_IPS = {"primary": f"{PRIVATE_NET}.1", "backup": f"{PRIVATE_NET}.2"}
LAN_BRIDGE = "br-lan"
CLIENT_BRIDGE = "br-cli"
LAN_IF = "lan0"
PRIVATE_IF = "priv0"
CLIENT_IF = "eth0"
MAX_CLIENTS = 50

TCP_TIMESTAMPS = {"primary": 1, "backup": 2, "spare": 1}
"""Force the server hosts apart: all namespaces share one kernel, so with equal
settings two hosts answering the same 4-tuple pick identical timestamp offsets
and sequence bugs stay invisible. 1 = random per-connection offsets, 2 = none."""


def fresh_name(prefix: str = "t") -> str:
    """A new lab name, so labs of concurrent runs (tests, demo, benchmarks) never collide."""
    return prefix + secrets.token_hex(4)


class LabError(Exception):
    """A lab operation failed; the message says what and how to recover."""


@dataclass(frozen=True)
class Iface:
    """One interface inside a host; ``peer`` is (host, ifname) at the other end of its veth."""

    name: str
    address: str | None
    peer: tuple[str, str] | None
    bridge: str | None = None


@dataclass(frozen=True)
class Host:
    name: str
    kind: str  # "router", "server" or "client"
    ifaces: tuple[Iface, ...]
    gateway: str | None = None
    sysctls: dict[str, str] = field(default_factory=dict)
    bridges: dict[str, str] = field(default_factory=dict)
    """Bridges inside this host (the router's switches), with their address."""


@dataclass(frozen=True)
class Topology:
    """The complete plan for one lab."""

    lab: str
    clients: int
    private_link: bool

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.lab):
            raise LabError(f"lab name {self.lab!r}: use 1-12 lower-case letters or digits")
        if not 1 <= self.clients <= MAX_CLIENTS:
            raise LabError(f"clients={self.clients}: must be between 1 and {MAX_CLIENTS}")

    def namespace(self, host: str) -> str:
        return f"{PREFIX}{self.lab}-{host}"

    @property
    def client_names(self) -> list[str]:
        return [f"client{i}" for i in range(1, self.clients + 1)]

    @property
    def host_names(self) -> list[str]:
        return ["router", *SERVER_HOSTS, *self.client_names]

    def hosts(self) -> list[Host]:
        router_ifaces = [
            *(Iface(f"p-{h}", None, (h, LAN_IF), LAN_BRIDGE) for h in SERVER_HOSTS),
            *(Iface(f"p-{c}", None, (c, CLIENT_IF), CLIENT_BRIDGE) for c in self.client_names),
        ]
        hosts = [
            Host(
                "router",
                "router",
                tuple(router_ifaces),
                sysctls={"net.ipv4.ip_forward": "1"},
                bridges={
                    LAN_BRIDGE: f"{ROUTER_LAN_IP}/{PREFIXLEN}",
                    CLIENT_BRIDGE: f"{ROUTER_CLIENT_IP}/{PREFIXLEN}",
                },
            )
        ]
        for h in SERVER_HOSTS:
            ifaces = [Iface(LAN_IF, f"{SERVER_LAN_IPS[h]}/{PREFIXLEN}", ("router", f"p-{h}"))]
            if self.private_link and h in PRIVATE_IPS:
                other = "backup" if h == "primary" else "primary"
                ifaces.append(
                    Iface(PRIVATE_IF, f"{PRIVATE_IPS[h]}/{PREFIXLEN}", (other, PRIVATE_IF))
                )
            hosts.append(
                Host(
                    h,
                    "server",
                    tuple(ifaces),
                    gateway=ROUTER_LAN_IP,
                    sysctls={
                        "net.ipv4.tcp_timestamps": str(TCP_TIMESTAMPS[h]),
                        "net.ipv4.tcp_syncookies": "1",
                        "net.ipv4.conf.all.rp_filter": "0",
                        "net.ipv4.conf.default.rp_filter": "0",
                    },
                )
            )
        for i, c in enumerate(self.client_names, start=11):
            hosts.append(
                Host(
                    c,
                    "client",
                    (Iface(CLIENT_IF, f"{CLIENT_NET}.{i}/{PREFIXLEN}", ("router", f"p-{c}")),),
                    gateway=ROUTER_CLIENT_IP,
                )
            )
        return hosts

    def host(self, name: str) -> Host:
        for h in self.hosts():
            if h.name == name:
                return h
        raise LabError(f"no host {name!r} in lab {self.lab!r}; hosts: {', '.join(self.host_names)}")

    def veths(self) -> list[tuple[tuple[str, str], tuple[str, str]]]:
        """Each veth pair once, as ((host, ifname), (host, ifname))."""
        pairs = []
        seen: set[tuple[str, str]] = set()
        for h in self.hosts():
            for i in h.ifaces:
                if i.peer is None or (h.name, i.name) in seen:
                    continue
                seen.add(i.peer)
                pairs.append(((h.name, i.name), i.peer))
        return pairs

    def links_of(self, host: str) -> list[tuple[str, str]]:
        """The far ends (host, ifname) of HOST's cables: downing them unplugs HOST.

        The far end, not HOST's own interface, goes down, so HOST keeps its
        addresses and routes and sees only a lost carrier, as with a pulled cable.
        """
        return [i.peer for i in self.host(host).ifaces if i.peer is not None]

    def address(self, host: str) -> str:
        """HOST's main address (its LAN or client address; the router's LAN side)."""
        if host == "router":
            return ROUTER_LAN_IP
        h = self.host(host)
        assert h.ifaces[0].address is not None
        return h.ifaces[0].address.split("/")[0]
