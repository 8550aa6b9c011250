"""The agent's configuration file: the example parses, and every mistake an
operator can make is reported with its place and what is expected."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from coral.agent import config
from coral.agent.config import ConfigError

EXAMPLE_FILE = Path(__file__).resolve().parent.parent / "docs" / "agent.example.toml"
KEY = b"0123456789abcdef0123456789abcdef"


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "pair.key"
    path.write_bytes(KEY + b"\n")
    path.chmod(0o600)
    return path


def good(key_file: Path, host: str = "primary") -> str:
    """The example with a key file that exists."""
    return config.example(host).replace("/etc/coral/pair.key", str(key_file))


def problems(text: str, source: str = "agent.toml") -> str:
    with pytest.raises(ConfigError) as info:
        config.parse(text, source)
    return str(info.value)


def test_example_parses() -> None:
    cfg = config.parse(config.example(), check_files=False)
    assert cfg.host.name == "primary" and cfg.peer.name == "backup"
    assert cfg.host.lan_address == "198.18.0.11" and cfg.peer.private_address == "198.18.2.2"
    assert cfg.witness == config.WitnessConfig(("198.18.0.1", 7002))
    assert cfg.identity.confirm_hosts == ("198.18.1.1",)
    assert cfg.metrics.listen == ("127.0.0.1", 9477)
    (svc,) = cfg.services
    assert (svc.vip, svc.port, svc.role, svc.backend) == (
        "198.18.0.100",
        80,
        "primary",
        ("127.0.0.1", 8080),
    )
    assert svc.deterministic == ("/static/",)
    assert cfg.heartbeat.lease_s == pytest.approx(0.06)
    assert cfg.heartbeat.key == b""  # not read with check_files=False

    backup = config.parse(config.example("backup"), check_files=False)
    assert backup.host.name == "backup" and backup.host.lan_address == "198.18.0.12"
    assert backup.services[0].role == "backup"
    with pytest.raises(ValueError):
        config.example("spare")


def test_example_file_matches() -> None:
    """docs/agent.example.toml is example() verbatim; CORAL_UPDATE_EXAMPLE=1 rewrites it."""
    if os.environ.get("CORAL_UPDATE_EXAMPLE") == "1":
        EXAMPLE_FILE.write_text(config.example())
    assert EXAMPLE_FILE.read_text() == config.example(), (
        "docs/agent.example.toml is stale: run CORAL_UPDATE_EXAMPLE=1 pytest "
        "tests/test_agent_config.py"
    )


def test_load_reads_the_key(key_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(good(key_file))
    cfg = config.load(path)
    assert cfg.heartbeat.key == KEY
    assert cfg.heartbeat.key_file == str(key_file)
    assert "key=" not in repr(cfg.heartbeat)  # the secret stays out of logs


def test_defaults(key_file: Path) -> None:
    minimal = f"""
[host]
name = "a"
lan_interface = "eth0"
lan_address = "10.0.0.1"
[peer]
name = "b"
lan_address = "10.0.0.2"
[heartbeat]
key_file = "{key_file}"
[[service]]
vip = "10.0.0.100"
role = "backup"
"""
    cfg = config.parse(minimal)
    assert cfg.host == config.HostConfig("a", "eth0", "10.0.0.1")
    assert cfg.host.pin_dir == "/sys/fs/bpf/coral" and cfg.host.conn_capacity == 65536
    assert (cfg.heartbeat.port, cfg.heartbeat.interval_ms, cfg.heartbeat.misses) == (7001, 100, 3)
    assert cfg.heartbeat.lease_s == pytest.approx(0.3)
    assert cfg.witness is None
    assert cfg.identity == config.IdentityConfig()
    assert cfg.metrics.listen == ("127.0.0.1", 9477)
    assert cfg.notify.command == ()
    assert cfg.services == (config.ServiceConfig(vip="10.0.0.100", role="backup"),)
    assert config.parse(minimal + '[metrics]\nlisten = ""\n').metrics.listen is None


def test_service_rto_min_follows_the_heartbeats_unless_set(key_file: Path) -> None:
    """Just above the longest takeover (interval x (misses + 2)), at most the kernel's
    200 ms; an explicit value wins, 0 included."""
    text = good(key_file)
    assert config.parse(text).service_rto_min_ms == 20 * (3 + 2)
    slow = text.replace("interval_ms = 20", "interval_ms = 100")
    assert config.parse(slow).service_rto_min_ms == 200
    for value in (0, 150):
        explicit = text.replace(
            "conn_capacity = 65536", f"conn_capacity = 65536\nrto_min_ms = {value}"
        )
        assert config.parse(explicit).service_rto_min_ms == value


def test_two_services_on_one_vip(key_file: Path) -> None:
    text = good(key_file) + '\n[[service]]\nvip = "198.18.0.100"\nport = 443\nrole = "primary"\n'
    text += "log_port = 7003\n"
    cfg = config.parse(text)
    assert [(s.port, s.log_port) for s in cfg.services] == [(80, 7000), (443, 7003)]


def _sub(old: str, new: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        assert old in text, old
        return text.replace(old, new, 1)

    return edit


def _add(extra: str) -> Callable[[str], str]:
    return lambda text: text + extra


SECOND = '\n[[service]]\nvip = "198.18.0.100"\nport = {port}\nrole = "{role}"\nlog_port = {log}\n'

INVALID: list[tuple[str, Callable[[str], str], str]] = [
    (
        "unknown key",
        _sub("lan_interface =", "lan_interfce ="),
        "agent.toml: [host] lan_interfce: unknown key (did you mean lan_interface?)",
    ),
    (
        "unknown section",
        _add("[heartbeats]\n"),
        "[heartbeats]: unknown section (did you mean [heartbeat]?)",
    ),
    (
        "wrong type",
        _sub("interval_ms = 20", 'interval_ms = "20"'),
        "[heartbeat] interval_ms: must be an integer",
    ),
    ("float for integer", _sub("port = 7001", "port = 7001.0"), "not a float (7001.0)"),
    (
        "bool for integer",
        _sub("misses = 3", "misses = true"),
        "[heartbeat] misses: must be an integer",
    ),
    (
        "string for bool",
        _sub("sync_static = false", 'sync_static = "no"'),
        "sync_static: must be true or false",
    ),
    (
        "bad IP",
        _sub('"198.18.0.12"', '"198.18.0.300"'),
        "[peer] lan_address: '198.18.0.300' is not an IPv4",
    ),
    (
        "IPv6 where IPv4",
        _sub('vip = "198.18.0.100"', 'vip = "fd00::1"'),
        "[service #1] vip: 'fd00::1' is not an IPv4",
    ),
    (
        "bad confirm host",
        _sub('["198.18.1.1"]', '["198.18.1.1", "router"]'),
        "confirm_hosts: 'router' is not an IPv4",
    ),
    (
        "bad host:port",
        _sub('"127.0.0.1:8080"', '"127.0.0.1"'),
        "[service #1] backend: '127.0.0.1' is not ADDRESS:PORT",
    ),
    (
        "port out of range",
        _sub("port = 80\n", "port = 65536\n"),
        "[service #1] port: 65536 is out of range (expected an integer from 1 to 65535)",
    ),
    ("port zero", _sub("port = 7001", "port = 0"), "[heartbeat] port: 0 is out of range"),
    (
        "interval too short",
        _sub("interval_ms = 20", "interval_ms = 1"),
        "interval_ms: 1 is out of range (expected an integer from 5 to 10000)",
    ),
    (
        "capacity",
        _sub("conn_capacity = 65536", "conn_capacity = 4194305"),
        "conn_capacity: 4194305 is out of range",
    ),
    (
        "arp refresh",
        _sub("arp_refresh_s = 10", "arp_refresh_s = 3601"),
        "arp_refresh_s: 3601 is out of range",
    ),
    (
        "small reply buffer",
        _sub("max_buffered_reply = 8388608", "max_buffered_reply = 1000"),
        "an integer >= 1024",
    ),
    (
        "bad name",
        _sub('name = "primary"', 'name = "Primary"'),
        "[host] name: 'Primary': use 1 to 32 of a-z",
    ),
    (
        "same names",
        _sub('name = "backup"', 'name = "primary"'),
        "[peer] name: 'primary' is [host] name too",
    ),
    (
        "bad role",
        _sub('role = "primary"', 'role = "primry"'),
        '[service #1] role: \'primry\': expected "primary" or "backup" (did you mean primary?)',
    ),
    (
        "relative path",
        _sub('"/run/coral"', '"run/coral"'),
        "[host] state_dir: 'run/coral' must be an absolute path",
    ),
    (
        "path prefix",
        _sub('["/static/"]', '["static/"]'),
        "deterministic: 'static/' is not a URL path",
    ),
    (
        "missing key",
        _sub('lan_address = "198.18.0.11"', ""),
        "[host] lan_address: missing (required: an IPv4 address)",
    ),
    ("missing section", _sub("\n[peer]\n", "\n[peerx]\n"), "[peer]: missing section (required)"),
    (
        "no service",
        lambda t: t[: t.index("[[service]]")],
        "[service]: missing: at least one [[service]]",
    ),
    (
        "service as table",
        _sub("[[service]]", "[service]"),
        "write [[service]] (an array of tables)",
    ),
    (
        "duplicate service",
        _add(SECOND.format(port=80, role="primary", log=7003)),
        "[service #2] port: 198.18.0.100:80 is service #1 too",
    ),
    (
        "VIP with two roles",
        _add(SECOND.format(port=443, role="backup", log=7003)),
        "[service #2] role: 198.18.0.100 is 'backup' here but 'primary' in service #1",
    ),
    (
        "shared log port",
        _add(SECOND.format(port=443, role="primary", log=7000)),
        "[service #2] log_port: 7000 is service #1's too",
    ),
    (
        "log port is heartbeat port",
        _sub("log_port = 7000", "log_port = 7001"),
        "[service #1] log_port: 7001 is [heartbeat] port too",
    ),
    (
        "VIP is a host",
        _sub('vip = "198.18.0.100"', 'vip = "198.18.0.12"'),
        "vip: 198.18.0.12 is a host's own address",
    ),
    (
        "private on host only",
        _sub('private_address = "198.18.2.2"', ""),
        "[peer] private_address: missing: required since [host] has a private link",
    ),
    (
        "private on peer only",
        lambda t: t.replace('private_interface = "priv0"', "").replace(
            'private_address = "198.18.2.1"', ""
        ),
        "[peer] private_address: set, but [host] has no private link",
    ),
    (
        "private interface alone",
        _sub('private_address = "198.18.2.1"', ""),
        "[host] private_address: missing: a private link needs both",
    ),
    (
        "witness is a host",
        _sub('"198.18.0.1:7002"', '"198.18.0.12:7002"'),
        "[witness] address: 198.18.0.12 is one of the pair's hosts",
    ),
    (
        "key outside sections",
        lambda t: "debug = true\n" + t,
        "agent.toml: debug: key outside any section",
    ),
    (
        "rto_min_ms above the kernel's",
        _sub("conn_capacity = 65536", "conn_capacity = 65536\nrto_min_ms = 250"),
        "[host] rto_min_ms: 250 is out of range (expected an integer from 0 to 200)",
    ),
    (
        "rejoin_after_s negative",
        _sub("rejoin_after_s = 0", "rejoin_after_s = -5"),
        "[host] rejoin_after_s: -5 is out of range (expected an integer from 0 to 86400)",
    ),
    (
        "rejoin_after_s a float",
        _sub("rejoin_after_s = 0", "rejoin_after_s = 1.5"),
        "[host] rejoin_after_s: must be an integer from 0 to 86400, not a float (1.5)",
    ),
    (
        "empty notify argv",
        _sub("command = []", 'command = ["/bin/hook", ""]'),
        "[notify] command: empty strings",
    ),
    (
        "notify not argv",
        _sub("command = []", 'command = "/bin/hook arg"'),
        "[notify] command: must be an array of strings",
    ),
]


@pytest.mark.parametrize(
    ("edit", "expected"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid(key_file: Path, edit: Callable[[str], str], expected: str) -> None:
    assert expected in problems(edit(good(key_file)))


def test_several_problems_listed_together(key_file: Path) -> None:
    text = good(key_file).replace("port = 7001", "port = 70010").replace('"198.18.0.100"', '"x"')
    text = text.replace("misses = 3", "mises = 3")
    lines = problems(text).splitlines()
    assert len(lines) == 3, lines
    assert all(line.startswith("agent.toml: [") for line in lines)
    assert any("[heartbeat] port: 70010 is out of range" in line for line in lines)
    assert any("[heartbeat] mises: unknown key (did you mean misses?)" in line for line in lines)
    assert any("[service #1] vip: 'x' is not an IPv4 address" in line for line in lines)
    with pytest.raises(ConfigError) as info:
        config.parse(text, "agent.toml")
    assert len(info.value.problems) == 3


def test_toml_syntax_error_names_the_line() -> None:
    text = '[host]\nname = "a"\nlan_address = 198.18.0.11\n'
    assert problems(text, "/etc/coral/agent.toml").startswith("/etc/coral/agent.toml: line 3")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read: No such file"):
        config.load(tmp_path / "nope.toml")


def test_key_file_missing(tmp_path: Path) -> None:
    text = config.example().replace("/etc/coral/pair.key", str(tmp_path / "none.key"))
    message = problems(text)
    assert "[heartbeat] key_file: cannot read" in message
    assert "No such file or directory" in message


def test_key_file_too_short(key_file: Path) -> None:
    key_file.write_bytes(b"  short-key \n")
    assert "at least 16 bytes" in problems(good(key_file))


def test_key_file_readable_by_others(key_file: Path) -> None:
    key_file.chmod(0o644)
    message = problems(good(key_file))
    assert "[heartbeat] key_file:" in message and "has mode 0644" in message
    assert "chmod 600" in message


def test_key_file_relative() -> None:
    text = config.example().replace("/etc/coral/pair.key", "pair.key")
    assert "[heartbeat] key_file: 'pair.key' must be an absolute path" in problems(text)


def test_config_is_frozen(key_file: Path) -> None:
    cfg = config.parse(good(key_file))
    with pytest.raises(AttributeError):
        cfg.host.name = "other"  # type: ignore[misc]
