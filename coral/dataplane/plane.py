"""One host's data plane, controlled from Python: services, modes, the lease,
connections, counters, and the service identity on the LAN.

Call order (each step's preconditions are the steps before it)::

    dp = DataPlane.open(ns, "lan0", pin_dir)   # load coral_dp; reuse maps pinned in pin_dir
    dp.attach()                                # tc ingress + egress of lan0 (replaces)
    dp.add_service(vip, 80, Role.BACKUP, peer_ip, peer_mac)   # FENCED until set_mode
    dp.claim_vip(vip)                          # backup; the primary calls hide_vip(vip)
    dp.renew_lease(epoch, 3.0)                 # only with fresh evidence for EPOCH
    dp.set_mode(vip, 80, Mode.DUPLEX, peer_settings=peer)     # checked; one map write
    ...                                        # steady state, by the agent:
    dp.renew_lease(epoch, 3.0)                 #   well before the lease runs out
    dp.set_mode(vip, 80, Mode.SIMPLEX)         #   the peer failed: one map write
    dp.gc(idle_s=60)                           #   forget connections without a socket
    dp.connections(), dp.counters()            #   status
    dp.fence()                                 # stop speaking for every service, now
    dp.close()                                 # programs stay attached, maps pinned
    dp.detach()                                # only to take the data plane away

Ownership and lifetime:

- Maps are pinned in PIN_DIR (a bpffs) and outlive the DataPlane and its
  process: an agent that restarts and opens the same PIN_DIR finds its
  services, lease, epoch and connections as it left them. Programs
  attached to tc hold their own reference and keep running after close()
  or a crash, enforcing the last lease: a host whose agent dies fences
  itself when the lease runs out (design brief, section 3).
- The DataPlane owns the loaded object (program and map fds) until close().
  PlaneView (read only, no program load) and ClosingMarker open the pinned
  maps from other processes and own only the fds they opened.
- The lease and its epoch live in every service and VIP entry;
  renew_lease() and fence() write them all. A service added later takes
  the current lease and epoch, so it can go live without a renewal.
- Nothing here starts a process: maps through bpf(2), tc and addresses
  through netlink, sysctls through /proc, sockets through sock_diag.
- ns None means the caller's own network namespace (a production agent);
  tests pass a lab host's namespace, which must exist.
- The service and VIP entries are read, changed and written back whole
  (lease renewals, mode switches, configuration); those steps hold one lock,
  so two threads may drive a DataPlane (the agent renews leases on its event
  loop while its netlink thread switches modes: without the lock a renewal
  that read an entry before a mode switch wrote it back with the old mode,
  and a new backup stayed fenced). Connection entries are the programs'.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import math
import os
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Self, TypeVar

from pyroute2 import DiagSocket
from pyroute2.netlink.diag import SS_ALL, SS_LISTEN

from coral import bpf
from coral import netns as netns_mod
from coral.bpf import cgroup, tc
from coral.bpf.libbpf import BpfObject, LibbpfError
from coral.bpf.maps import CoralMaps, Counts, TypedMap
from coral.bpf.structs import (
    ConnFlag,
    ConnKey,
    ConnState,
    Mac,
    Mode,
    Reason,
    Role,
    ServiceKey,
    ServiceState,
    VipKey,
    VipState,
    ip4,
)
from coral.bpf.syscall import BpfError, Map, UpdateFlag, is_bpffs
from coral.dataplane import identity, settings

OBJECT = "coral_dp"
PROGRAMS = (("coral_ingress", tc.Hook.INGRESS), ("coral_egress", tc.Hook.EGRESS))
SOCKOPS_LINK = "coral_sockops_link"
"""The pinned link of coral_sockops, next to the maps."""
RTO_MIN_MAX_MS = 200
"""The kernel's own minimum RTO: TCP_BPF_RTO_MIN may only lower it."""
_SO_NETNS_COOKIE = 71
_LIVE_SOCKETS = SS_ALL & ~(1 << SS_LISTEN)
"""Every socket state that belongs to one connection (TIME_WAIT included)."""

E = TypeVar("E", bound=IntEnum)


class DataPlaneError(Exception):
    """A data-plane operation was refused or failed; the message says why."""


class StaleEpoch(DataPlaneError):
    """A lease renewal for an epoch older than the one the data plane holds."""


# ---- input checks: every public entry point turns bad input into DataPlaneError


def _member(enum: type[E], value: E | str | int, what: str) -> E:
    """VALUE as a member of ENUM: a member, its name (any case) or its number."""
    try:
        if isinstance(value, str):
            return enum[value.upper()]
        return enum(value)
    except (KeyError, ValueError):
        names = ", ".join(m.name.lower() for m in enum)
        raise DataPlaneError(f"unknown {what} {value!r}: use one of {names}") from None


def _ipv4(addr: str, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(addr))
    except ValueError as e:
        raise DataPlaneError(f"bad {what} {addr!r}: {e}") from None


def _port(port: int) -> int:
    if not isinstance(port, int) or not 1 <= port <= 0xFFFF:
        raise DataPlaneError(f"bad port {port!r}: use 1-65535")
    return port


def _mac(value: bytes | str) -> bytes:
    try:
        raw = value if isinstance(value, bytes) else bytes.fromhex(value.replace(":", ""))
    except ValueError:
        raw = b""
    if len(raw) != 6:
        raise DataPlaneError(f"bad MAC address {value!r}: want 6 bytes (02:00:5e:10:00:01)")
    return raw


def _netns_cookie() -> int:
    """The calling thread's network namespace's cookie (what the socket program
    compares with its socket's, to act only on its own namespace's)."""
    with socket.socket() as s:
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, _SO_NETNS_COOKIE, 8), "little")


def _conn_key(client_ip: str, client_port: int, vip: str, vip_port: int) -> ConnKey:
    return ConnKey.of(
        _ipv4(client_ip, "client address"), _port(client_port), _ipv4(vip, "VIP"), _port(vip_port)
    )


def _unmapped(addr: str) -> str | None:
    """The IPv4 address of an AF_INET or v4-mapped AF_INET6 socket; None for real IPv6."""
    ip = ipaddress.ip_address(addr)
    if isinstance(ip, ipaddress.IPv6Address):
        return None if ip.ipv4_mapped is None else str(ip.ipv4_mapped)
    return str(ip)


def _mode_of(value: int) -> Mode:
    """A mode read from a map, as the programs treat it: unknown is FENCED."""
    try:
        return Mode(value)
    except ValueError:
        return Mode.FENCED


def _role_of(value: int) -> Role | None:
    """A role read from a map; None for a value this version does not know."""
    try:
        return Role(value)
    except ValueError:
        return None


def _mark(closing: TypedMap[ConnKey, ctypes.c_uint64], key: ConnKey) -> None:
    closing.put(key, ctypes.c_uint64(time.monotonic_ns()))


def _why(e: OSError) -> str:
    """The reason of a failed system call, without the call's name."""
    return os.strerror(e.errno) if e.errno else str(e)


def _remaining_s(expiry_ns: int, now_ns: int) -> float:
    return max(0, expiry_ns - now_ns) / 1e9


# ---- what the maps hold, decoded


@dataclass(frozen=True)
class Service:
    """One configured service (coral_services). A mode the mirror does not
    know reads as FENCED, as the programs treat it."""

    vip: str
    port: int
    role: Role | None
    mode: Mode
    epoch: int
    lease_remaining_s: float
    peer_ip: str
    peer_mac: str
    own_mac: str

    @classmethod
    def of(cls, key: ServiceKey, s: ServiceState, now_ns: int) -> Service:
        return cls(
            vip=str(ipaddress.IPv4Address(key.vip)),
            port=key.port,
            role=_role_of(s.role),
            mode=_mode_of(s.mode),
            epoch=s.epoch,
            lease_remaining_s=_remaining_s(s.lease_expiry_ns, now_ns),
            peer_ip=str(ipaddress.IPv4Address(s.peer_ip)),
            peer_mac=bytes(s.peer_mac).hex(":"),
            own_mac=bytes(s.own_mac).hex(":"),
        )


@dataclass(frozen=True)
class Connection:
    """One replicated connection (coral_conns), with the sequence anchors
    of both roles (bpf/coral_structs.h says what each one means) and
    whether the application marked it closing (coral_closing)."""

    client_ip: str
    client_port: int
    vip: str
    vip_port: int
    mode: Mode
    flags: tuple[str, ...]
    primary_isn: int
    client_isn: int
    backup_ack: int
    client_ack: int
    delivered_ack: int
    backup_snd_nxt: int
    primary_snd_nxt: int
    acked_to_client: int
    last_ns: int
    closing: bool

    @classmethod
    def of(cls, key: ConnKey, s: ConnState, closing: bool) -> Connection:
        return cls(
            client_ip=str(ipaddress.IPv4Address(key.client_ip)),
            client_port=key.client_port,
            vip=str(ipaddress.IPv4Address(key.vip)),
            vip_port=key.vip_port,
            mode=_mode_of(s.mode),
            flags=tuple(str(f.name) for f in ConnFlag if s.flags & f),
            primary_isn=s.primary_isn,
            client_isn=s.client_isn,
            backup_ack=s.backup_ack,
            client_ack=s.client_ack,
            delivered_ack=s.delivered_ack,
            backup_snd_nxt=s.backup_snd_nxt,
            primary_snd_nxt=s.primary_snd_nxt,
            acked_to_client=s.acked_to_client,
            last_ns=s.last_ns,
            closing=closing,
        )


class PlaneView:
    """Read-only access to a data plane's maps, for `coral datapath` and
    other processes (open_view(), no program load). DataPlane adds the
    control operations on top."""

    def __init__(self, maps: CoralMaps) -> None:
        self.maps = maps

    def close(self) -> None:
        self.maps.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def services(self) -> list[Service]:
        now = time.monotonic_ns()
        found = [Service.of(k, s, now) for k, s in self.maps.services.items()]
        return sorted(found, key=lambda s: (ip4(s.vip), s.port))

    def mode(self, vip: str, port: int) -> Mode:
        return _mode_of(self._service(vip, port)[1].mode)

    def service(self, vip: str, port: int) -> Service:
        """VIP:PORT's entry; DataPlaneError if it is not configured."""
        return Service.of(*self._service(vip, port), time.monotonic_ns())

    def _service(self, vip: str, port: int) -> tuple[ServiceKey, ServiceState]:
        key = ServiceKey.of(_ipv4(vip, "VIP"), _port(port))
        state = self.maps.services.get(key)
        if state is None:
            raise DataPlaneError(f"no service {vip}:{port}")
        return key, state

    def _leases(self) -> list[tuple[int, int]]:
        """(epoch, lease expiry) of every service and VIP entry."""
        entries: Iterable[ServiceState | VipState] = [
            *(s for _, s in self.maps.services.items()),
            *(v for _, v in self.maps.vips.items()),
        ]
        return [(e.epoch, e.lease_expiry_ns) for e in entries]

    def _lease(self) -> tuple[int, int]:
        """(epoch, expiry) of the newest renewal; (0, 0) before any."""
        return max(self._leases(), default=(0, 0))

    def epoch(self) -> int:
        """The newest epoch a lease was renewed with; 0 before any renewal."""
        return self._lease()[0]

    def lease_remaining_s(self) -> float:
        """Seconds until the first service or VIP lease runs out (0 if
        expired, fenced, or nothing is configured)."""
        now = time.monotonic_ns()
        return min((_remaining_s(exp, now) for _, exp in self._leases()), default=0.0)

    @property
    def conn_capacity(self) -> int:
        return self.maps.conns.map.max_entries

    @property
    def handshake_capacity(self) -> int:
        return self.maps.handshakes.map.max_entries

    def connections(self) -> list[Connection]:
        closing = {bytes(k) for k in self.maps.closing}
        return [Connection.of(k, s, bytes(k) in closing) for k, s in self.maps.conns.items()]

    def connection_of(self, sock: socket.socket) -> Connection | None:
        """The replicated connection of the accepted socket SOCK; None if this
        host serves it alone (not in coral_conns)."""
        key = socket_key(sock)
        state = self.maps.conns.get(key)
        return None if state is None else Connection.of(key, state, False)

    def handshakes(self) -> int:
        """Half-open handshakes awaiting adoption (coral_handshakes entries)."""
        return sum(1 for _ in self.maps.handshakes)

    def counters(self, include_zero: bool = False) -> dict[str, Counts]:
        """Packets and bytes per verdict and drop reason (Reason names, in
        enum order), summed over CPUs; only the non-zero ones unless
        INCLUDE_ZERO. CONTINUE ("no verdict yet") is never counted and
        never listed."""
        return {
            r.name: c
            for r, c in self.maps.read_counters().items()
            if r is not Reason.CONTINUE and (include_zero or c.packets)
        }


class DataPlane(PlaneView):
    """The data plane of one host. See the module docstring for the call
    order and who owns what."""

    def __init__(
        self,
        obj: BpfObject,
        maps: CoralMaps,
        ns: str | None,
        lan_if: str,
        pin_dir: Path,
        rto_min_ms: float = 0.0,
    ) -> None:
        super().__init__(maps)
        self._obj = obj
        self.ns = ns
        self.lan_if = lan_if
        self.pin_dir = pin_dir
        self.rto_min_ms = rto_min_ms
        self._entries = threading.Lock()
        """Held while a service or VIP entry is read, changed and written back."""

    @classmethod
    def open(
        cls,
        ns: str | None,
        lan_if: str,
        pin_dir: str | os.PathLike[str],
        conn_capacity: int = 65536,
        handshake_capacity: int = 16384,
        obj_path: str | os.PathLike[str] | None = None,
        rto_min_ms: float = 0.0,
    ) -> DataPlane:
        """Load coral_dp (or OBJ_PATH) for LAN_IF in namespace NS, its maps
        pinned in PIN_DIR (created on a mounted bpffs; maps pinned there
        already are reused, with their state). Capacities size the
        connection maps (coral_conns and coral_closing: CONN_CAPACITY) and
        the handshake map; pinned maps keep their size, so a different
        configuration is refused rather than silently ignored. RTO_MIN_MS
        (0: the kernel's) is the minimum retransmission timeout of the
        service sockets established while the data plane is attached
        (coral_sockops.h); at most the kernel's own 200 ms."""
        pin = Path(pin_dir)
        if not 0 <= rto_min_ms <= RTO_MIN_MAX_MS:
            raise DataPlaneError(f"minimum RTO {rto_min_ms} ms: use 0 to {RTO_MIN_MAX_MS}")
        if ns is not None and not os.path.exists(netns_mod.ns_path(ns)):
            raise DataPlaneError(f"no network namespace {ns!r}")
        try:
            identity.mac_of(ns, lan_if)
        except LookupError:
            raise DataPlaneError(f"no interface {lan_if!r} in namespace {ns or '(own)'}") from None
        if not is_bpffs(str(pin)):
            raise DataPlaneError(f"{pin} is not on a bpffs: mount one there first")
        sizes = {
            "coral_conns": conn_capacity,
            "coral_closing": conn_capacity,
            "coral_handshakes": handshake_capacity,
        }
        for name, n in sizes.items():
            if not 1 <= n <= 2**24:
                raise DataPlaneError(f"capacity {n} for {name}: use 1 to {2**24}")
        pin.mkdir(parents=True, exist_ok=True)
        _check_pinned_sizes(pin, sizes)
        path = Path(obj_path) if obj_path is not None else bpf.object_path(OBJECT)
        try:
            obj = BpfObject.open(path, pin_root=str(pin))
        except LibbpfError as e:
            raise DataPlaneError(f"cannot open {path}: {e.strerror}") from None
        try:
            for name, n in sizes.items():
                obj.set_max_entries(name, n)
            obj.set_rodata("coral_rto_min_us", round(rto_min_ms * 1000).to_bytes(4, "little"))
            cookie = netns_mod.call_in_netns(ns, _netns_cookie)
            obj.set_rodata("coral_netns_cookie", cookie.to_bytes(8, "little"))
            obj.load()
            maps = CoralMaps.of(obj)
        except (LibbpfError, TypeError) as e:
            obj.close()
            raise DataPlaneError(f"cannot load {path} with maps in {pin}: {e}") from None
        except BaseException:
            obj.close()
            raise
        return cls(obj, maps, ns, lan_if, pin, rto_min_ms)

    def close(self) -> None:
        """Release the object. Attached programs and pinned maps stay."""
        self._obj.close()

    # ---- programs

    def attach(self) -> None:
        """Put the programs on LAN_IF's tc ingress and egress, and the socket
        program (with a minimum RTO set) on the cgroup v2 root; replaces
        earlier ones atomically (a restarted agent's new programs take
        over the same pinned maps)."""
        for prog, hook in PROGRAMS:
            tc.attach(self.lan_if, self._obj.prog_fd(prog), prog, hook, netns=self.ns)
        link = self.pin_dir / SOCKOPS_LINK
        try:
            if self.rto_min_ms:
                cgroup.attach(self._obj.prog_fd("coral_sockops"), link)
            else:
                cgroup.detach(link)
        except (OSError, LibbpfError) as e:
            raise DataPlaneError(f"cannot attach the socket program: {e}") from None

    def detach(self) -> None:
        """Remove the programs from LAN_IF and the cgroup (the maps stay pinned)."""
        tc.detach(self.lan_if, netns=self.ns)
        cgroup.detach(self.pin_dir / SOCKOPS_LINK)

    # ---- services and modes

    def add_service(
        self, vip: str, port: int, role: Role | str, peer_ip: str, peer_mac: bytes | str
    ) -> None:
        """Configure service VIP:PORT with this host's ROLE and the peer's
        LAN address and MAC. A new service starts FENCED (fail closed) under
        the current lease; set_mode() makes it live. Re-adding an identical
        configuration (an agent restarting) keeps its mode; any change to
        role or peer fences it until set_mode() decides again."""
        vip = _ipv4(vip, "VIP")
        key = ServiceKey.of(vip, _port(port))
        role = _member(Role, role, "role")
        peer = ip4(_ipv4(peer_ip, "peer address"))
        pmac = _mac(peer_mac)
        own_mac = Mac(*identity.mac_of(self.ns, self.lan_if))
        with self._entries:
            old = self.maps.services.get(key)
            mode = Mode.FENCED
            if old is not None and (old.role, old.peer_ip, bytes(old.peer_mac)) == (
                role,
                peer,
                pmac,
            ):
                mode = _mode_of(old.mode)  # an agent re-applying its configuration
            epoch, expiry = self._lease()
            state = ServiceState(
                lease_expiry_ns=expiry,
                epoch=epoch,
                peer_ip=peer,
                own_mac=own_mac,
                peer_mac=Mac(*pmac),
                mode=mode,
                role=role,
            )
            self.maps.services.put(key, state)
            self._sync_vip(vip)

    def remove_service(self, vip: str, port: int) -> None:
        """Forget VIP:PORT (and the VIP's entry with its last service).
        Its connections' entries go with gc()."""
        with self._entries:
            key, _ = self._service(vip, port)
            self.maps.services.delete(key)
            self._sync_vip(vip)

    def set_mode(
        self,
        vip: str,
        port: int,
        mode: Mode | str,
        *,
        peer_settings: settings.TcpSettings | None = None,
    ) -> None:
        """Switch VIP:PORT to MODE: one update of its coral_services entry
        (read, change the mode, write back), then the VIP's entry.
        Connections opened in simplex stay simplex (the programs keep a
        mode per connection). DUPLEX needs PEER_SETTINGS (the peer's
        settings.read()) and is refused, naming every mismatch, if the
        two hosts' TCP settings cannot replicate connections."""
        key, state = self._service(vip, port)
        mode = _member(Mode, mode, "mode")
        if mode is Mode.DUPLEX:  # slow (reads settings): outside the lock
            self._check_duplex(vip, port, state, peer_settings)
        with self._entries:
            key, state = self._service(vip, port)
            state.mode = mode
            self.maps.services.put(key, state, UpdateFlag.EXIST)
            self._sync_vip(vip)

    def _check_duplex(
        self, vip: str, port: int, state: ServiceState, peer: settings.TcpSettings | None
    ) -> None:
        if peer is None:
            raise DataPlaneError(f"duplex for {vip}:{port} needs the peer's TCP settings")
        local = settings.read(self.ns, self.lan_if)
        primary, backup = (local, peer) if state.role == Role.PRIMARY else (peer, local)
        problems = settings.mismatches(primary, backup)
        if problems:
            raise DataPlaneError(f"{vip}:{port} cannot run duplex: " + "; ".join(problems))

    def _sync_vip(self, vip: str) -> None:
        """Give VIP's entry the liveliest mode of its services (it speaks
        ARP while any of them is live), or remove it with its last one.
        With the entries' lock held."""
        key = VipKey.of(vip)
        modes = {s.mode for k, s in self.maps.services.items() if k.vip == key.vip}
        if not modes:
            self.maps.vips.delete(key)
            return
        state = self.maps.vips.get(key)
        if state is None:
            epoch, expiry = self._lease()
            state = VipState(lease_expiry_ns=expiry, epoch=epoch)
        state.mode = next((m for m in (Mode.DUPLEX, Mode.SIMPLEX) if m in modes), Mode.FENCED)
        self.maps.vips.put(key, state)

    # ---- lease and epoch

    def renew_lease(self, epoch: int, duration_s: float) -> None:
        """Let this host speak for its live services for DURATION_S more
        seconds, under EPOCH. The caller must hold fresh evidence that the
        host is entitled to EPOCH (the peer's heartbeats acknowledging it,
        or the witness's grant; design brief, section 3); an EPOCH older
        than the stored one is refused with StaleEpoch, so a host that
        thaws with old evidence stays fenced. A newer EPOCH replaces it.
        Modes are not touched: fence() followed by renew_lease() still
        needs set_mode(). The epoch is kept in the service entries, so with
        no service configured there is nothing to renew and nothing kept."""
        if not isinstance(epoch, int) or not 0 <= epoch <= 0xFFFFFFFF:
            raise DataPlaneError(f"bad epoch {epoch}: use 0 to 2**32-1")
        if not (math.isfinite(duration_s) and duration_s >= 0):
            raise DataPlaneError(f"bad lease duration {duration_s!r}: use seconds >= 0")
        current = self.epoch()
        if epoch < current:
            raise StaleEpoch(f"epoch {epoch} is older than the data plane's epoch {current}")
        expiry = time.monotonic_ns() + round(duration_s * 1e9)
        self._write_leases(epoch, expiry, mode=None)

    def fence(self) -> None:
        """Stop speaking for every service and VIP at once: mode FENCED and
        lease expired everywhere (services first, so TCP stops before ARP).
        The epoch stays."""
        self._write_leases(None, 0, mode=Mode.FENCED)

    def _write_leases(self, epoch: int | None, expiry: int, mode: Mode | None) -> None:
        tables: tuple[TypedMap[ServiceKey, ServiceState] | TypedMap[VipKey, VipState], ...] = (
            self.maps.services,
            self.maps.vips,
        )
        with self._entries:
            for table in tables:
                for key, state in list(table.items()):
                    state.lease_expiry_ns = expiry
                    if epoch is not None:
                        state.epoch = epoch
                    if mode is not None:
                        state.mode = mode
                    table.map.update(key, state, UpdateFlag.EXIST)

    # ---- connections

    def pin_simplex(self, vip: str, port: int) -> int:
        """Pin every connection of VIP:PORT to simplex (how many were duplex). Called
        once a survivor serves alone: these connections lived through the peer's
        loss, and when a new peer joins they stay this host's alone (its backup
        forwards their packets here), while new connections are replicated."""
        key = ServiceKey.of(_ipv4(vip, "VIP"), _port(port))
        pinned = 0
        for ckey, state in list(self.maps.conns.items()):
            if (ckey.vip, ckey.vip_port) == (key.vip, key.port) and state.mode != Mode.SIMPLEX:
                state.mode = Mode.SIMPLEX
                with contextlib.suppress(BpfError):  # closed meanwhile
                    self.maps.conns.put(ckey, state, UpdateFlag.EXIST)
                    pinned += 1
        return pinned

    def mark_closing(self, client_ip: str, client_port: int, vip: str, vip_port: int) -> None:
        """The application is about to close this connection on purpose:
        its FIN or RST may leave the host. Call before shutdown()."""
        _mark(self.maps.closing, _conn_key(client_ip, client_port, vip, vip_port))

    def gc(self, idle_s: float) -> int:
        """Forget connections that no socket of this host's namespace holds
        any more (sock_diag, every state but LISTEN) and that have been
        quiet for IDLE_S (last packet, or for a closing mark alone, the
        mark's time): their coral_conns and coral_closing entries. Returns
        how many connections were forgotten."""
        if not (math.isfinite(idle_s) and idle_s >= 0):
            raise DataPlaneError(f"bad idle time {idle_s!r}: use seconds >= 0")
        live = netns_mod.call_in_netns(self.ns, _socket_keys)
        cutoff = time.monotonic_ns() - round(idle_s * 1e9)
        gone: set[bytes] = set()
        for key, state in list(self.maps.conns.items()):
            if bytes(key) not in live and state.last_ns <= cutoff:
                self.maps.conns.delete(key)
                self.maps.closing.delete(key)
                gone.add(bytes(key))
        for key, since in list(self.maps.closing.items()):
            raw = bytes(key)
            if raw in gone or raw in live or since.value > cutoff:
                continue
            if self.maps.conns.get(key) is None:
                self.maps.closing.delete(key)
                gone.add(raw)
        return len(gone)

    # ---- identity (coral.dataplane.identity, on this plane's namespace and interface)

    def hide_vip(self, vip: str) -> None:
        identity.hide_vip(self.ns, _ipv4(vip, "VIP"), self.lan_if)

    def claim_vip(self, vip: str) -> None:
        identity.claim_vip(self.ns, _ipv4(vip, "VIP"), self.lan_if)

    def remove_vip(self, vip: str) -> None:
        identity.remove_vip(self.ns, _ipv4(vip, "VIP"), self.lan_if)

    def gratuitous_arp(self, vip: str, count: int = 3, spacing: float = 0.02) -> None:
        identity.gratuitous_arp(self.ns, _ipv4(vip, "VIP"), self.lan_if, count, spacing)


def _check_pinned_sizes(pin: Path, sizes: dict[str, int]) -> None:
    """libbpf refuses to reuse a pinned map of another size with a vague
    error; say which map and what to do."""
    for name, n in sizes.items():
        if not (pin / name).exists():
            continue
        with Map.open_pinned(str(pin / name)) as m:
            if m.max_entries != n:
                raise DataPlaneError(
                    f"{name} pinned in {pin} holds {m.max_entries} entries but {n} are "
                    f"configured: configure {m.max_entries}, or remove the pins (which "
                    "forgets every live connection)"
                )


def _socket_keys() -> set[bytes]:
    """The ConnKey (client -> local address) of every IPv4 TCP connection
    socket of the calling thread's namespace, as bytes."""
    keys: set[bytes] = set()
    with DiagSocket() as ds:
        ds.bind()
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in ds.get_sock_stats(family=family, states=_LIVE_SOCKETS):
                local, remote = _unmapped(msg["idiag_src"]), _unmapped(msg["idiag_dst"])
                if local is not None and remote is not None:
                    key = ConnKey.of(remote, msg["idiag_dport"], local, msg["idiag_sport"])
                    keys.add(bytes(key))
    return keys


def socket_key(sock: socket.socket) -> ConnKey:
    """The coral_conns key of the accepted socket SOCK (client -> local address)."""
    client, client_port = sock.getpeername()[:2]
    local, local_port = sock.getsockname()[:2]
    client4, local4 = _unmapped(client), _unmapped(local)
    if client4 is None or local4 is None:
        raise DataPlaneError(f"{client} -> {local}: the data plane handles IPv4 only")
    return ConnKey.of(client4, client_port, local4, local_port)


def open_view(pin_dir: str | os.PathLike[str]) -> PlaneView:
    """The data plane whose maps are pinned in PIN_DIR, read only. The view
    owns the map fds until close()."""
    try:
        return PlaneView(CoralMaps.pinned(pin_dir))
    except BpfError as e:
        raise DataPlaneError(f"no coral data plane pinned in {pin_dir}: {_why(e)}") from None
    except TypeError as e:  # a stale Python mirror (coral.bpf.maps.TypedMap)
        raise DataPlaneError(f"maps in {pin_dir} do not match this coral: {e}") from None


class ClosingMarker:
    """Marks the connection of an accepted socket as closing, from any
    process (the stream server, the proxy): a map write, a few
    microseconds. Owns the pinned coral_closing fd until close(). Marks are
    removed by DataPlane.gc() once the socket is gone."""

    def __init__(self, pin_dir: str | os.PathLike[str]) -> None:
        path = os.path.join(pin_dir, "coral_closing")
        try:
            m = Map.open_pinned(path)
        except BpfError as e:
            raise DataPlaneError(f"cannot open {path}: {_why(e)}") from None
        try:
            self._closing = TypedMap(m, ConnKey, ctypes.c_uint64)
        except TypeError as e:
            m.close()
            raise DataPlaneError(f"{path}: {e}") from None

    def __call__(self, sock: socket.socket) -> None:
        """Mark SOCK's connection; call before shutting it down."""
        _mark(self._closing, socket_key(sock))

    def close(self) -> None:
        self._closing.map.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def closing_marker(pin_dir: str | os.PathLike[str]) -> ClosingMarker:
    """A function marking accepted sockets' connections as closing, for an
    application in another process than the agent. Precondition: the
    agent has opened a DataPlane on PIN_DIR (the map is pinned)."""
    return ClosingMarker(pin_dir)
