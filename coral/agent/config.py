"""The node agent's configuration: one TOML file per host.

Every problem in a file is found in one pass and reported together, one per
line, as ``FILE: [section] key: what is wrong (what is expected)``, so an
operator fixes a file in one edit instead of one error per restart. Values
are checked against each other too (the two hosts' names and addresses, the
services' VIPs and ports), because a pair that starts with a contradiction
fails only later, during a failover.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast

from coral.agent.keys import read_key
from coral.dataplane.plane import RTO_MIN_MAX_MS
from proxy.config import parse_hostport

__all__ = [
    "AgentConfig",
    "ConfigError",
    "HeartbeatConfig",
    "HostConfig",
    "IdentityConfig",
    "MetricsConfig",
    "NotifyConfig",
    "PeerConfig",
    "ServiceConfig",
    "WitnessConfig",
    "example",
    "load",
    "parse",
]

Role = Literal["primary", "backup"]
_MAKE_KEY = "make one: head -c 32 /dev/urandom | base64 > {0}; chmod 600 {0}"
MAX_CONN_CAPACITY = 1 << 22
MAX_REJOIN_AFTER_S = 86400
NAME_RE = re.compile(r"[a-z0-9-]{1,32}")


class ConfigError(Exception):
    """A configuration file that cannot be used; the message lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True)
class HostConfig:
    """This host. Addresses are IPv4 strings in canonical form."""

    name: str
    lan_interface: str
    lan_address: str
    private_interface: str | None = None
    private_address: str | None = None
    pin_dir: str = "/sys/fs/bpf/coral"
    state_dir: str = "/run/coral"
    conn_capacity: int = 65536
    rto_min_ms: int | None = None
    """Minimum RTO of service sockets; None: just above the takeover time
    (AgentConfig.service_rto_min_ms)."""
    rejoin_after_s: int = 0
    """A host fenced while its peer serves alone rejoins by itself once it has heard
    the peer serving alone this long; 0: only `coral reintegrate` brings it back."""


@dataclass(frozen=True)
class PeerConfig:
    """The other host of the pair."""

    name: str
    lan_address: str
    private_address: str | None = None


@dataclass(frozen=True)
class HeartbeatConfig:
    """How the hosts watch each other. ``key`` holds the key file's content
    (whitespace stripped) once the file has been checked; it is empty when
    parsed with ``check_files=False``."""

    key_file: str
    port: int = 7001
    interval_ms: int = 100
    misses: int = 3
    key: bytes = field(default=b"", repr=False, compare=False)

    @property
    def lease_s(self) -> float:
        """How long the peer may stay silent before it is declared lost."""
        return self.interval_ms * self.misses / 1000


@dataclass(frozen=True)
class WitnessConfig:
    """A third party that breaks ties when the hosts lose each other."""

    address: tuple[str, int]


@dataclass(frozen=True)
class IdentityConfig:
    """How a VIP is taken over: gratuitous ARP, then a check through the router."""

    arp_count: int = 3
    arp_spacing_ms: int = 20
    arp_refresh_s: int = 10
    confirm_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint; ``listen`` is None when disabled."""

    listen: tuple[str, int] | None = ("127.0.0.1", 9477)


@dataclass(frozen=True)
class NotifyConfig:
    """A hook run on every state change and failover (event JSON on stdin)."""

    command: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServiceConfig:
    """One replicated service: a VIP and port, and this host's role for it."""

    vip: str
    role: Role
    port: int = 80
    backend: tuple[str, int] = ("127.0.0.1", 8080)
    log_port: int = 7000
    deterministic: tuple[str, ...] = ()
    sync_static: bool = False
    max_buffered_reply: int = 8 * 1024 * 1024


@dataclass(frozen=True)
class AgentConfig:
    """Everything one host's agent needs."""

    host: HostConfig
    peer: PeerConfig
    heartbeat: HeartbeatConfig
    witness: WitnessConfig | None
    identity: IdentityConfig
    metrics: MetricsConfig
    notify: NotifyConfig
    services: tuple[ServiceConfig, ...]

    @property
    def service_rto_min_ms(self) -> int:
        """The minimum RTO of service sockets: as configured, else the longest a
        takeover can take after a host's last word (a lease, one interval of
        detection and one of slack), so that the survivor's first resend of
        what the dead host sent last is not suppressed yet already due; never
        above the kernel's own 200 ms."""
        if self.host.rto_min_ms is not None:
            return self.host.rto_min_ms
        hb = self.heartbeat
        return min(RTO_MIN_MAX_MS, hb.interval_ms * (hb.misses + 2))


# --- reading values -------------------------------------------------------------------------

_SCHEMA: dict[str, frozenset[str]] = {
    "host": frozenset(
        {
            "name",
            "lan_interface",
            "lan_address",
            "private_interface",
            "private_address",
            "pin_dir",
            "state_dir",
            "conn_capacity",
            "rto_min_ms",
            "rejoin_after_s",
        }
    ),
    "peer": frozenset({"name", "lan_address", "private_address"}),
    "heartbeat": frozenset({"port", "interval_ms", "misses", "key_file"}),
    "witness": frozenset({"address"}),
    "identity": frozenset({"arp_count", "arp_spacing_ms", "arp_refresh_s", "confirm_hosts"}),
    "metrics": frozenset({"listen"}),
    "notify": frozenset({"command"}),
    "service": frozenset(
        {
            "vip",
            "port",
            "role",
            "backend",
            "log_port",
            "deterministic",
            "sync_static",
            "max_buffered_reply",
        }
    ),
}
_REQUIRED_SECTIONS = ("host", "peer", "heartbeat")

T = TypeVar("T")
_MISSING: Any = object()


def _toml_type(value: object) -> str:
    """The TOML name of a value's type, as an operator wrote it."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"


def _hint(word: str, choices: frozenset[str] | list[str], fmt: str = "{}") -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {fmt.format(close[0])}?)"
    return f" (known: {', '.join(fmt.format(c) for c in sorted(choices))})"


class _Problems:
    """Collects problems with their place in the file."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: list[str] = []

    def add(self, section: str, key: str | None, message: str) -> None:
        where = f"[{section}]" if key is None else f"[{section}] {key}"
        self.lines.append(f"{self.source}: {where}: {message}")


class _Section:
    """One table of the file. Each getter returns a well-typed placeholder
    after reporting a problem, so checking goes on and finds the next one;
    ``ok`` tells whether the section's values can be used."""

    def __init__(self, problems: _Problems, name: str, table: dict[str, Any], kind: str) -> None:
        self.problems = problems
        self.name = name
        self.table = table
        self.ok = True
        known = _SCHEMA[kind]
        for key in table:
            if key not in known:
                self.error(key, "unknown key" + _hint(key, known))

    def error(self, key: str | None, message: str) -> None:
        self.ok = False
        self.problems.add(self.name, key, message)

    def _get(self, key: str, default: Any, check: Callable[[Any], bool], expect: str) -> Any:
        if key not in self.table:
            if default is _MISSING:
                self.error(key, f"missing (required: {expect})")
            return default
        value = self.table[key]
        if not check(value):
            shown = str(value).lower() if isinstance(value, bool) else repr(value)
            self.error(key, f"must be {expect}, not {_toml_type(value)} ({shown})")
            return _MISSING
        return value

    def text(self, key: str, default: str = _MISSING, expect: str = "a string") -> str:
        """A string; '' stands for a bad or missing value (already reported)."""
        value = self._get(key, default, lambda v: isinstance(v, str), expect)
        return "" if value is _MISSING else cast(str, value)

    def optional_text(self, key: str, expect: str = "a string") -> str | None:
        value = self._get(key, None, lambda v: isinstance(v, str), expect)
        return None if value is _MISSING else cast("str | None", value)

    def integer(self, key: str, lo: int, hi: int | None, default: int = _MISSING) -> int:
        expect = f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}"
        value = self._get(
            key, default, lambda v: isinstance(v, int) and not isinstance(v, bool), expect
        )
        if value is _MISSING:
            return lo
        if value < lo or (hi is not None and value > hi):
            self.error(key, f"{value} is out of range (expected {expect})")
            return lo
        return cast(int, value)

    def port(self, key: str, default: int = _MISSING) -> int:
        return self.integer(key, 1, 65535, default)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, default, lambda v: isinstance(v, bool), "true or false")
        return default if value is _MISSING else cast(bool, value)

    def strings(self, key: str, expect: str) -> tuple[str, ...]:
        value = self._get(
            key,
            [],
            lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v),
            f"an array of strings ({expect})",
        )
        return () if value is _MISSING else tuple(value)

    def ipv4(self, key: str, value: str | None = None) -> str:
        """An IPv4 address for KEY (or VALUE, an element of KEY's array)."""
        text = self.text(key, expect="an IPv4 address") if value is None else value
        if not text:
            return ""
        try:
            return str(ipaddress.IPv4Address(text))
        except ValueError:
            self.error(key, f"{text!r} is not an IPv4 address (expected like 198.18.0.11)")
            return ""

    def optional_ipv4(self, key: str) -> str | None:
        return None if key not in self.table else self.ipv4(key)

    def hostport(self, key: str, default: str = _MISSING) -> tuple[str, int]:
        """'ADDRESS:PORT' with an IP address (no name: nothing is resolved)."""
        text = self.text(key, default, expect="'ADDRESS:PORT'")
        if not text:
            return ("", 0)
        try:
            host, port = parse_hostport(text)
            host = str(ipaddress.ip_address(host))
        except ValueError:
            self.error(key, f"{text!r} is not ADDRESS:PORT (expected like 127.0.0.1:8080)")
            return ("", 0)
        return host, port

    def hostname(self, key: str) -> str:
        text = self.text(key, expect="a host name")
        if text and not NAME_RE.fullmatch(text):
            self.error(key, f"{text!r}: use 1 to 32 of a-z, 0-9 and '-'")
            return ""
        return text

    def interface(self, key: str, optional: bool = False) -> str | None:
        text = self.optional_text(key) if optional else self.text(key, expect="an interface name")
        if text is None or text == "":
            return text
        if len(text) > 15 or any(c in text for c in "/: \t\n") or text in (".", ".."):
            self.error(key, f"{text!r} is not an interface name (at most 15 characters, no '/')")
        return text

    def path(self, key: str, default: str) -> str:
        text = self.text(key, default, expect="an absolute path")
        if text and not text.startswith("/"):
            self.error(key, f"{text!r} must be an absolute path")
        return text


def _read_key(path: str) -> tuple[bytes, str | None]:
    """The key file's content, or why it cannot be used. The content is read by
    keys.read_key, so the agent refuses exactly the keys the proxy refuses; the
    mode is checked here since a secret others can read is no secret."""
    try:
        st = os.stat(path)
    except OSError as e:
        return b"", f"cannot read {path}: {e.strerror or e} ({_MAKE_KEY.format(path)})"
    if not stat.S_ISREG(st.st_mode):
        return b"", f"{path} is not a regular file"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        return b"", (
            f"{path} has mode {mode:04o}: group and others may read the pair's secret "
            f"(expected 0600 or stricter: chmod 600 {path})"
        )
    try:
        return read_key(path, "pair key"), None
    except ValueError as e:
        return b"", f"{e} ({_MAKE_KEY.format(path)})"


# --- sections -------------------------------------------------------------------------------


def _host(s: _Section) -> HostConfig:
    priv_if = s.interface("private_interface", optional=True)
    priv_addr = s.optional_ipv4("private_address")
    if (priv_if is None) != (priv_addr is None):
        s.error(
            "private_interface" if priv_if is None else "private_address",
            "missing: a private link needs both private_interface and private_address",
        )
    return HostConfig(
        name=s.hostname("name"),
        lan_interface=s.interface("lan_interface") or "",
        lan_address=s.ipv4("lan_address"),
        private_interface=priv_if,
        private_address=priv_addr,
        pin_dir=s.path("pin_dir", "/sys/fs/bpf/coral"),
        state_dir=s.path("state_dir", "/run/coral"),
        conn_capacity=s.integer("conn_capacity", 1, MAX_CONN_CAPACITY, 65536),
        rto_min_ms=s.integer("rto_min_ms", 0, RTO_MIN_MAX_MS) if "rto_min_ms" in s.table else None,
        rejoin_after_s=s.integer("rejoin_after_s", 0, MAX_REJOIN_AFTER_S, 0),
    )


def _peer(s: _Section) -> PeerConfig:
    return PeerConfig(
        name=s.hostname("name"),
        lan_address=s.ipv4("lan_address"),
        private_address=s.optional_ipv4("private_address"),
    )


def _heartbeat(s: _Section, check_files: bool) -> HeartbeatConfig:
    key_file = s.text("key_file", expect="the path of the pair's shared key")
    key = b""
    if key_file and not key_file.startswith("/"):
        s.error("key_file", f"{key_file!r} must be an absolute path")
    elif key_file and check_files:
        key, why = _read_key(key_file)
        if why:
            s.error("key_file", why)
    return HeartbeatConfig(
        key_file=key_file,
        port=s.port("port", 7001),
        interval_ms=s.integer("interval_ms", 5, 10000, 100),
        misses=s.integer("misses", 2, 100, 3),
        key=key,
    )


def _witness(s: _Section) -> WitnessConfig:
    return WitnessConfig(address=s.hostport("address"))


def _identity(s: _Section) -> IdentityConfig:
    refresh = s.integer("arp_refresh_s", 0, 3600, 10)
    hosts = tuple(s.ipv4("confirm_hosts", h) for h in s.strings("confirm_hosts", "IPv4 addresses"))
    return IdentityConfig(
        arp_count=s.integer("arp_count", 1, 20, 3),
        arp_spacing_ms=s.integer("arp_spacing_ms", 0, 1000, 20),
        arp_refresh_s=refresh,
        confirm_hosts=hosts,
    )


def _metrics(s: _Section) -> MetricsConfig:
    if s.table.get("listen") == "":
        return MetricsConfig(listen=None)
    return MetricsConfig(listen=s.hostport("listen", "127.0.0.1:9477"))


def _notify(s: _Section) -> NotifyConfig:
    argv = s.strings("command", "the hook's argv")
    if any(not a for a in argv):
        s.error("command", "empty strings in the argv")
    return NotifyConfig(command=argv)


def _service(s: _Section) -> ServiceConfig:
    vip = s.ipv4("vip")
    role = s.text("role", expect='"primary" or "backup"')
    if role and role not in ("primary", "backup"):
        s.error(
            "role", f'{role!r}: expected "primary" or "backup"' + _hint(role, ["primary", "backup"])
        )
    prefixes = s.strings("deterministic", "URL path prefixes")
    for p in prefixes:
        if not p.startswith("/"):
            s.error("deterministic", f"{p!r} is not a URL path: it starts with '/'")
    return ServiceConfig(
        vip=vip,
        role=cast(Role, role),
        port=s.port("port", 80),
        backend=s.hostport("backend", "127.0.0.1:8080"),
        log_port=s.port("log_port", 7000),
        deterministic=prefixes,
        sync_static=s.boolean("sync_static", False),
        max_buffered_reply=s.integer("max_buffered_reply", 1024, None, 8 * 1024 * 1024),
    )


# --- the whole file -------------------------------------------------------------------------


def _cross_check(cfg: AgentConfig, ok: dict[str, bool], problems: _Problems) -> None:
    """Checks between sections, each only when the sections involved are sound."""
    host, peer, hb = cfg.host, cfg.peer, cfg.heartbeat
    if ok["host"] and ok["peer"]:
        if peer.name == host.name:
            problems.add(
                "peer", "name", f"{peer.name!r} is [host] name too: the hosts need two names"
            )
        if peer.lan_address == host.lan_address:
            problems.add("peer", "lan_address", f"{peer.lan_address} is [host] lan_address too")
        if host.private_address is not None and peer.private_address is None:
            problems.add(
                "peer", "private_address", "missing: required since [host] has a private link"
            )
        if host.private_address is None and peer.private_address is not None:
            problems.add(
                "peer",
                "private_address",
                "set, but [host] has no private link (set private_interface and private_address "
                "there, or remove this)",
            )
        if host.private_address is not None and host.private_address == peer.private_address:
            problems.add("peer", "private_address", f"{peer.private_address} is [host]'s too")
    own = {a for a in (host.lan_address, host.private_address) if a} if ok["host"] else set()
    pair = own | (
        {a for a in (peer.lan_address, peer.private_address) if a} if ok["peer"] else set()
    )

    seen: dict[tuple[str, int], int] = {}
    roles: dict[str, tuple[str, int]] = {}
    log_ports: dict[int, int] = {}
    for i, svc in enumerate(cfg.services):
        sect = f"service #{i + 1}"
        if not ok[sect]:
            continue
        if svc.vip in pair:
            problems.add(
                sect, "vip", f"{svc.vip} is a host's own address: a VIP must be a third one"
            )
        if (svc.vip, svc.port) in seen:
            problems.add(
                sect,
                "port",
                f"{svc.vip}:{svc.port} is service #{seen[svc.vip, svc.port]} too "
                "(each VIP and port once)",
            )
        else:
            seen[svc.vip, svc.port] = i + 1
        if svc.vip in roles and roles[svc.vip][0] != svc.role:
            role, other = roles[svc.vip]
            problems.add(
                sect,
                "role",
                f"{svc.vip} is {svc.role!r} here but {role!r} in service #{other}: one host "
                "owns a VIP's address (ARP), so every service on it has the same role",
            )
        roles.setdefault(svc.vip, (svc.role, i + 1))
        if ok["heartbeat"] and svc.log_port == hb.port:
            problems.add(
                sect, "log_port", f"{svc.log_port} is [heartbeat] port too: choose another"
            )
        if svc.log_port in log_ports:
            problems.add(
                sect,
                "log_port",
                f"{svc.log_port} is service #{log_ports[svc.log_port]}'s too: each service's "
                "proxy listens on its own",
            )
        else:
            log_ports[svc.log_port] = i + 1

    if cfg.witness is not None and ok["witness"] and cfg.witness.address[0] in pair:
        problems.add(
            "witness",
            "address",
            f"{cfg.witness.address[0]} is one of the pair's hosts: the witness must be a third",
        )
    if ok["identity"]:
        for h in cfg.identity.confirm_hosts:
            if h in pair or h in roles:
                problems.add(
                    "identity",
                    "confirm_hosts",
                    f"{h} is the pair's own: confirm through a host beyond the router",
                )
    listen = cfg.metrics.listen
    if ok["metrics"] and listen is not None:
        wildcard = listen[0] in ("0.0.0.0", "::") or listen[0] in own
        if wildcard and listen[1] in log_ports:
            problems.add("metrics", "listen", f"port {listen[1]} is a service's log_port")


def parse(text: str, source: str = "<config>", *, check_files: bool = True) -> AgentConfig:
    """Parse and check a configuration. ``check_files=False`` leaves the key file
    unread (for checking a file on another machine, and for the example)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", msg)
        if m:
            where = f"line {m.group(1)}, column {m.group(2)}"
            msg = msg[: m.start()]
        else:
            where = "end of file" if "end of document" in msg else "TOML"
        raise ConfigError([f"{source}: {where}: not valid TOML: {msg}"]) from None

    problems = _Problems(source)
    ok: dict[str, bool] = {}

    def section(
        name: str, fn: Callable[[_Section], T], table: Any = None, kind: str | None = None
    ) -> T:
        """Check one table with FN, noting whether it is sound."""
        if table is None:
            table = data.get(name, {})
        sink = problems
        if not isinstance(table, dict):
            problems.add(name, None, f"must be a table ([{name}]), not {_toml_type(table)}")
            table, sink = {}, _Problems(source)
        elif name in _REQUIRED_SECTIONS and name not in data:
            sink = _Problems(source)  # reported once as a missing section
        s = _Section(sink, name, table, kind or name)
        value = fn(s)
        ok[name] = s.ok
        return value

    for name, value in data.items():
        if name not in _SCHEMA:
            if isinstance(value, dict | list):
                hint = _hint(name, frozenset(_SCHEMA), "[{}]")
                problems.add(name, None, "unknown section" + hint)
            else:
                problems.lines.append(
                    f"{source}: {name}: key outside any section (keys belong in one: "
                    f"{', '.join(f'[{n}]' for n in _SCHEMA)})"
                )
    for name in _REQUIRED_SECTIONS:
        if name not in data:
            problems.add(name, None, "missing section (required)")

    host = section("host", _host)
    peer = section("peer", _peer)
    heartbeat = section("heartbeat", lambda s: _heartbeat(s, check_files))
    witness = section("witness", _witness) if "witness" in data else None
    ok.setdefault("witness", True)
    identity = section("identity", _identity)
    metrics = section("metrics", _metrics)
    notify = section("notify", _notify)

    services: list[ServiceConfig] = []
    raw = data.get("service", [])
    if isinstance(raw, dict):
        problems.add("service", None, "write [[service]] (an array of tables), not [service]")
        raw = []
    elif not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        problems.add("service", None, "must be an array of tables ([[service]])")
        raw = []
    elif not raw:
        problems.add("service", None, "missing: at least one [[service]] is required")
    for i in range(len(raw)):  # one name per service: [service #1], ...
        services.append(section(f"service #{i + 1}", _service, raw[i], "service"))

    cfg = AgentConfig(host, peer, heartbeat, witness, identity, metrics, notify, tuple(services))
    _cross_check(cfg, ok, problems)
    if problems.lines:
        raise ConfigError(problems.lines)
    return cfg


def load(path: str | os.PathLike[str], *, check_files: bool = True) -> AgentConfig:
    """Read and check the configuration file at PATH."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            text = f.read().decode()
    except OSError as e:
        raise ConfigError([f"{name}: cannot read: {e.strerror or e}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{name}: not UTF-8 text: {e}"]) from None
    return parse(text, name, check_files=check_files)


# --- the example ----------------------------------------------------------------------------

_LAB = {
    "primary": ("198.18.0.11", "198.18.2.1"),
    "backup": ("198.18.0.12", "198.18.2.2"),
}

_EXAMPLE = """\
# Coral node agent configuration for the host "{host}" (the lab's addresses).
# Its peer "{peer}" has the same file with [host] and [peer] swapped and each
# service's role reversed. Durations are in the unit their name ends with.

[host]
name = "{host}"                  # this host: 1 to 32 of a-z, 0-9 and '-'
lan_interface = "lan0"           # the interface on the clients' LAN (where the VIPs live)
lan_address = "{lan}"      # this host's own address on it
private_interface = "priv0"      # optional: a private link to the peer (with private_address)
private_address = "{priv}"
pin_dir = "/sys/fs/bpf/coral"    # where the data plane's maps are pinned (a bpffs directory)
state_dir = "/run/coral"         # the control socket and runtime files
conn_capacity = 65536            # replicated connections at once (1 to 4194304)
# rto_min_ms = 100               # minimum RTO of service sockets (0 to 200; 0 = the kernel's
                                 # 200 ms); default: interval_ms x (misses + 2), at most 200
rejoin_after_s = 0               # fenced while the peer serves alone (a thawed or reconnected
                                 # host): rejoin as its backup after hearing it this long
                                 # (0 to 86400; 0 = only by coral reintegrate)

[peer]
name = "{peer}"
lan_address = "{peer_lan}"
private_address = "{peer_priv}"  # required exactly when [host] has a private link

[heartbeat]
port = 7001                      # UDP, on every path between the hosts
interval_ms = 20                 # one heartbeat per path every 20 ms (5 to 10000)
misses = 3                       # the peer is lost after 3 missed intervals: 60 ms (2 to 100)
key_file = "/etc/coral/pair.key" # the pair's shared secret (>= 16 bytes, mode 0600), the same
                                 # on both hosts: head -c 32 /dev/urandom | base64 > pair.key

[witness]                        # optional: breaks the tie when the hosts lose each other
address = "198.18.0.1:7002"      # but not the clients (only one host may then keep the VIP)

[identity]
arp_count = 3                    # gratuitous ARPs sent when taking over a VIP (1 to 20)
arp_spacing_ms = 20              # between them (0 to 1000)
arp_refresh_s = 10               # re-announce every VIP this often (0 = never)
confirm_hosts = ["198.18.1.1"]   # beyond the router: reaching one confirms a VIP's move

[metrics]
listen = "127.0.0.1:9477"        # Prometheus /metrics; "" turns it off

[notify]
command = []                     # argv of a hook run on every state change and failover,
                                 # with the event as JSON on stdin; [] = none

[[service]]                      # one per VIP and port; at least one
vip = "198.18.0.100"
port = 80
role = "{role}"                # this host's role for the service: "primary" or "backup"
backend = "127.0.0.1:8080"       # the server application (Apache) on this host
log_port = 7000                  # the proxies' logging channel (TCP, on the private link)
deterministic = ["/static/"]     # URL prefixes whose replies are the same on both hosts
sync_static = false              # true: the primary waits for the backup to check them too
max_buffered_reply = 8388608     # a longer reply is logged and sent in pieces of this size
"""


def example(host: str = "primary") -> str:
    """A complete, commented configuration for one of the lab's two hosts."""
    if host not in _LAB:
        raise ValueError(f"example for 'primary' or 'backup', not {host!r}")
    peer = "backup" if host == "primary" else "primary"
    lan, priv = _LAB[host]
    peer_lan, peer_priv = _LAB[peer]
    text = _EXAMPLE.format(
        host=host,
        peer=peer,
        lan=lan,
        priv=priv,
        peer_lan=peer_lan,
        peer_priv=peer_priv,
        role=host,
    )
    return "".join(_align(line) for line in text.splitlines(keepends=True))


def _align(line: str, column: int = 33) -> str:
    """Start a setting's trailing comment at COLUMN, whatever its value's length."""
    setting, sep, comment = line.partition(" # ")
    if not sep or not setting.strip():
        return line
    return f"{setting.rstrip():<{column - 1}} # {comment}"
