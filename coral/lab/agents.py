"""The product running in the lab: a node agent (with its proxies) on the primary
and on the backup, and the split-brain witness on the router.

`coral lab up --pair` and the agent tests use it. Everything it starts lives
in the lab's namespaces (so `coral lab down` removes it) and writes into the
lab's directory: <host>/agent/agent.toml, agent.log, the proxies' logs and
the control socket <host>.sock; router/witness.log.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coral import netns
from coral.agent.agent import REJOIN_EXIT
from coral.agent.cli import request, wait_state
from coral.lab.lab import Lab
from coral.lab.pair import HOSTS, LOG_PORT, peer_of
from coral.lab.topology import (
    LAN_IF,
    PRIVATE_IF,
    PRIVATE_IPS,
    ROUTER_CLIENT_IP,
    ROUTER_LAN_IP,
    SECOND_VIP,
    SERVER_LAN_IPS,
    SERVICE_PORT,
    SERVICE_VIP,
    LabError,
)

HEARTBEAT_PORT = 7001
WITNESS_PORT = 7002
START_TIMEOUT_S = 20.0


@dataclass
class LabPair:
    """The agents of one lab (and its witness)."""

    lab: Lab
    witness: bool

    def agent_dir(self, host: str) -> Path:
        return self.lab.dir / host / "agent"

    def config(self, host: str) -> Path:
        return self.agent_dir(host) / "agent.toml"

    def socket(self, host: str) -> Path:
        return self.agent_dir(host) / f"{host}.sock"

    def log(self, host: str) -> Path:
        return self.agent_dir(host) / "agent.log"

    def events_dir(self, host: str) -> Path:
        """Where HOST's notify hook writes each event (one JSON file each)."""
        return self.agent_dir(host) / "events"

    def events(self, host: str) -> list[dict[str, Any]]:
        """HOST's notify events so far, oldest first."""
        files = sorted(self.events_dir(host).glob("*.json"))
        return [json.loads(f.read_text()) for f in files if f.stat().st_size]

    def status(self, host: str) -> dict[str, Any]:
        reply = request(str(self.socket(host)), {"cmd": "status"})
        status: dict[str, Any] = reply["status"]
        return status

    def wait(self, host: str, states: set[str], timeout: float) -> dict[str, Any]:
        """HOST's status once its state is one of STATES; LabError after TIMEOUT s."""
        try:
            return wait_state(str(self.socket(host)), states, timeout)
        except TimeoutError as e:
            raise LabError(f"{e}; its log ends:\n{_tail(self.log(host))}") from None

    def reintegrate(self, host: str, timeout: float = START_TIMEOUT_S) -> dict[str, Any]:
        """Bring HOST back after a crash (undo a link or freeze fault, Apache again
        after a kill), restart its agent, and wait until the pair is duplex again
        with HOST as the backup; the status of its peer (which kept serving)."""
        lab = self.lab
        if host in lab.faults:
            lab.heal(host)
        if host not in lab.pids:
            lab.restart_apache(host)
        try:
            pid = self.status(host)["pid"]
        except OSError:
            pid = None  # killed with its host: the socket file is stale
            self.socket(host).unlink(missing_ok=True)
        if pid is None:
            self.start_agent(host)  # the host's boot
        else:  # a fenced agent exits to rejoin (coral reintegrate); its manager restarts it
            self.wait(host, {"fenced"}, timeout)  # it may still be finding out
            reply = request(str(self.socket(host)), {"cmd": "reintegrate"})
            if not reply.get("ok"):
                raise LabError(f"{host}'s agent refused to reintegrate: {reply.get('error')}")
            self.wait_restarted(host, pid, timeout)
        self.wait(host, {"duplex"}, timeout)
        return self.wait(peer_of(host), {"duplex"}, timeout)

    def wait_restarted(self, host: str, old_pid: int, timeout: float) -> None:
        """Until an agent other than OLD_PID answers on HOST's control socket."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):  # between the two: no socket, or a stale one
                if self.status(host)["pid"] != old_pid:
                    return
            if time.monotonic() > deadline:
                raise LabError(f"{host}'s agent did not restart: {_tail(self.log(host))}")
            time.sleep(0.02)

    def wait_socket(self, host: str, timeout: float) -> None:
        """Until HOST's agent has started (its control socket exists)."""
        deadline = time.monotonic() + timeout
        while not self.socket(host).exists():
            if time.monotonic() > deadline:
                raise LabError(f"{host}'s agent did not start: {_tail(self.log(host))}")
            time.sleep(0.02)

    def start_agent(self, host: str) -> None:
        """HOST's agent under the lab's stand-in for systemd: started again whenever it
        exits to rejoin (REJOIN_EXIT, as deploy/coral-agent.service does); a crash
        of the host (any other exit, or the lab's kill) ends it."""
        agent = [sys.executable, "-m", "coral", "agent", "run", str(self.config(host))]
        manager = f'while "$@"; [ $? -eq {REJOIN_EXIT} ]; do :; done'
        _detached(self.lab, host, ["sh", "-c", manager, "coral-agent-manager", *agent],
                  self.log(host))  # fmt: skip


@dataclass(frozen=True)
class LabService:
    """One service of the lab pair: which lab host is its primary (the other is
    its backup), and extra [[service]] keys (e.g. deterministic=["/static/"])."""

    vip: str = SERVICE_VIP
    primary: str = "primary"
    log_port: int = LOG_PORT
    extra: tuple[tuple[str, Any], ...] = ()


DUAL_ROLE = (LabService(), LabService(SECOND_VIP, "backup", LOG_PORT + 10))
"""Two services with crossed roles: each host primary for one, backup for the other."""


def start(
    lab: Lab,
    *,
    interval_ms: int = 20,
    misses: int = 3,
    witness: bool = True,
    services: tuple[LabService, ...] = (LabService(),),
    rejoin_after_s: int = 0,
) -> LabPair:
    """Agents on primary and backup for SERVICES, the witness on the router;
    returns once both agents run duplex. REJOIN_AFTER_S: [host] rejoin_after_s."""
    pair = LabPair(lab, witness)
    key = lab.dir / "pair.key"
    if not key.exists():
        key.touch(mode=0o600)
        key.write_bytes(secrets.token_hex(32).encode())
    if witness:
        argv = [sys.executable, "-m", "coral", "witness", "--listen",
                f"{ROUTER_LAN_IP}:{WITNESS_PORT}", "--key-file", str(key),
                "--state-file", str(lab.dir / "router" / "witness.json")]  # fmt: skip
        _detached(lab, "router", argv, lab.dir / "router" / "witness.log")
        if not netns.wait_udp_bound(lab.namespace("router"), WITNESS_PORT, 10):
            raise LabError(f"the witness did not start: {_tail(lab.dir / 'router/witness.log')}")
    for host in HOSTS:
        # No delayed ACKs toward clients: the primary's acknowledgement waits
        # for the backup's, and neither should wait for a timer.
        lab.run(host, ["ip", "route", "replace", "default", "via", ROUTER_LAN_IP, "dev", LAN_IF,
                       "quickack", "1"])  # fmt: skip
        (lab.bpffs / host).mkdir(exist_ok=True)
        pair.agent_dir(host).mkdir(parents=True, exist_ok=True)
        pair.events_dir(host).mkdir(exist_ok=True)
        pair.config(host).write_text(
            config_text(lab, host, key, interval_ms, misses, witness, services, rejoin_after_s)
        )
    # One after the other: loading the data plane (the BPF verifier) holds a CPU
    # in the kernel for a while, and on a non-preemptive kernel that can starve
    # an agent already in a pair long enough to fail it over.
    for host in HOSTS:
        pair.start_agent(host)
        pair.wait_socket(host, START_TIMEOUT_S)
    for host in HOSTS:
        pair.wait(host, {"duplex"}, START_TIMEOUT_S)
    return pair


def config_text(
    lab: Lab,
    host: str,
    key: Path,
    interval_ms: int,
    misses: int,
    witness: bool,
    services: tuple[LabService, ...],
    rejoin_after_s: int = 0,
) -> str:
    """HOST's agent configuration in the lab (TOML)."""
    peer = peer_of(host)
    private = lab.topo.private_link
    lines = [
        "[host]",
        f'name = "{host}"',
        f'lan_interface = "{LAN_IF}"',
        f'lan_address = "{SERVER_LAN_IPS[host]}"',
        *(
            [f'private_interface = "{PRIVATE_IF}"', f'private_address = "{PRIVATE_IPS[host]}"']
            if private
            else []
        ),
        f'pin_dir = "{lab.bpffs / host}"',
        f'state_dir = "{lab.dir / host / "agent"}"',
        f"rejoin_after_s = {rejoin_after_s}",
        "",
        "[peer]",
        f'name = "{peer}"',
        f'lan_address = "{SERVER_LAN_IPS[peer]}"',
        *([f'private_address = "{PRIVATE_IPS[peer]}"'] if private else []),
        "",
        "[heartbeat]",
        f"port = {HEARTBEAT_PORT}",
        f"interval_ms = {interval_ms}",
        f"misses = {misses}",
        f'key_file = "{key}"',
        "",
        *(["[witness]", f'address = "{ROUTER_LAN_IP}:{WITNESS_PORT}"', ""] if witness else []),
        "[identity]",
        f'confirm_hosts = ["{ROUTER_CLIENT_IP}"]',
        "",
        "[metrics]",
        'listen = ""',
        "",
        "[notify]",  # each event in a file of its own, named by the time it came
        f"command = {_toml(['sh', '-c', _EVENT_HOOK.format(dir=lab.dir / host / 'agent/events')])}",
        "",
    ]
    for svc in services:
        lines += [
            "[[service]]",
            f'vip = "{svc.vip}"',
            f"port = {SERVICE_PORT}",
            f'role = "{"primary" if svc.primary == host else "backup"}"',
            f"log_port = {svc.log_port}",
            *(f"{k} = {_toml(v)}" for k, v in svc.extra),
            "",
        ]
    return "\n".join(lines)


_EVENT_HOOK = 'f={dir}/$(date +%s%N)-$$; cat > "$f.tmp" && mv "$f.tmp" "$f.json"'
"""The lab's notify hook: the event's JSON (stdin) into a file, renamed when whole."""


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: the same escapes
    return str(value)


def _detached(lab: Lab, host: str, argv: list[str], log: Path) -> None:
    """Start ARGV on HOST in its own session (it outlives the command that started
    it; the lab's removal kills it), output to LOG."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        subprocess.Popen(
            lab.argv(host, argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
