"""Build, drive and remove a lab: namespaces, links, Apache, faults.

Call order: :meth:`Lab.up` (or :meth:`Lab.load` for a lab another process
built) -> :meth:`Lab.run` / :meth:`Lab.popen` / :meth:`Lab.crash` /
:meth:`Lab.heal` -> :meth:`Lab.down`. The lab owns everything it creates and
records it in a state file under ``/run/coral/lab/<name>/`` so that any later
process (the CLI, a test, ``coral lab down --all`` after an interrupted run)
can find and remove it. :meth:`Lab.up` removes what it built if it fails
halfway.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coral import content, netns
from coral.lab import apache
from coral.lab.topology import (
    APACHE_PORT,
    PREFIX,
    SECOND_VIP,
    SERVICE_PORT,
    SERVICE_VIP,
    LabError,
    Topology,
)

LAB_ROOT_DEFAULT = "/run/coral/lab"
CRASH_MODES = ("kill", "link", "freeze")
APACHE_START_TIMEOUT = 15.0


def lab_root() -> Path:
    return Path(os.environ.get("CORAL_LAB_ROOT", LAB_ROOT_DEFAULT))


@dataclass
class Lab:
    """A running lab; see the module docstring for the call order."""

    topo: Topology
    pids: dict[str, int] = field(default_factory=dict)
    """Main PID of the Apache this lab started, per server host."""
    faults: dict[str, str] = field(default_factory=dict)
    """Host -> crash mode currently applied (undone by heal)."""

    # ---- life cycle -------------------------------------------------------

    @property
    def name(self) -> str:
        return self.topo.lab

    @property
    def dir(self) -> Path:
        return lab_root() / self.name

    @property
    def bpffs(self) -> Path:
        """A bpffs mounted for this lab in the root mount namespace (pins survive nsenter)."""
        return self.dir / "bpffs"

    @classmethod
    def up(cls, name: str = "lab", clients: int = 2, private_link: bool = True) -> Lab:
        """Build lab NAME; raise LabError (having removed everything) on failure."""
        topo = Topology(name, clients, private_link)
        if (lab_root() / name).exists() or netns.list_namespaces(f"{PREFIX}{name}-"):
            raise LabError(f"lab {name!r} exists already; remove it with `coral lab down {name}`")
        lab = cls(topo)
        try:
            lab._build()
        except BaseException:
            lab.down()
            raise
        return lab

    @classmethod
    def load(cls, name: str) -> Lab:
        """The lab NAME that some process built, from its state file."""
        state = lab_root() / name / "state.json"
        try:
            data = json.loads(state.read_text())
        except FileNotFoundError:
            raise LabError(f"no lab {name!r} (no {state}); start one with `coral lab up`") from None
        topo = Topology(data["name"], data["clients"], data["private_link"])
        return cls(topo, pids=data["pids"], faults=data["faults"])

    def save(self) -> None:
        data = {
            "name": self.name,
            "clients": self.topo.clients,
            "private_link": self.topo.private_link,
            "pids": self.pids,
            "faults": self.faults,
        }
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.dir / "state.json")

    def _build(self) -> None:
        self.dir.mkdir(parents=True)
        self.dir.chmod(0o755)
        self.dir.parent.chmod(0o755)
        self.save()
        self.bpffs.mkdir()
        netns.run(["mount", "-t", "bpf", f"bpffs-{self.name}", str(self.bpffs)])
        hosts = self.topo.hosts()
        for h in hosts:
            netns.create(self.topo.namespace(h.name))
        for h in hosts:
            ns = self.topo.namespace(h.name)
            # IPv6 off: its autoconfiguration chatter has no place in packet captures.
            sysctls = {"net.ipv6.conf.all.disable_ipv6": "1", **h.sysctls}
            netns.run(["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in sysctls.items())], ns)
            for br, addr in h.bridges.items():
                netns.run(
                    [
                        "ip",
                        "link",
                        "add",
                        br,
                        "type",
                        "bridge",
                        "stp_state",
                        "0",
                        "forward_delay",
                        "0",
                    ],
                    ns,
                )
                netns.run(["ip", "addr", "add", addr, "dev", br], ns)
                netns.run(["ip", "link", "set", br, "up"], ns)
        for (ha, ia), (hb, ib) in self.topo.veths():
            na, nb = self.topo.namespace(ha), self.topo.namespace(hb)
            netns.run(
                ["ip", "link", "add", ia, "type", "veth", "peer", "name", ib, "netns", nb], na
            )
        for h in hosts:
            ns = self.topo.namespace(h.name)
            for i in h.ifaces:
                # Checksum offload off, so a wrong checksum is dropped here as on a real NIC.
                netns.run(["ethtool", "-K", i.name, "rx", "off", "tx", "off"], ns)
                if i.bridge:
                    netns.run(["ip", "link", "set", i.name, "master", i.bridge], ns)
                if i.address:
                    netns.run(["ip", "addr", "add", i.address, "dev", i.name], ns)
                netns.run(["ip", "link", "set", i.name, "up"], ns)
            if h.gateway:
                netns.run(["ip", "route", "add", "default", "via", h.gateway], ns)
        for h in hosts:
            if h.kind == "server":
                self._start_apache(h.name)
        self.save()

    def _apache_conf(self, host: str) -> Path:
        return self.dir / host / "apache" / "apache2.conf"

    def _start_apache(self, host: str) -> None:
        ns = self.topo.namespace(host)
        addr = self.topo.address(host)
        conf = apache.write_site(
            self._apache_conf(host).parent, [f"127.0.0.1:{APACHE_PORT}", f"{addr}:{APACHE_PORT}"]
        )
        self.dir.joinpath(host).chmod(0o755)
        self.pids[host] = apache.start(ns, conf)
        self.save()
        for ip in ("127.0.0.1", addr):
            if not netns.wait_tcp(ns, ip, APACHE_PORT, APACHE_START_TIMEOUT):
                raise LabError(
                    f"Apache on {host} did not listen on {ip}:{APACHE_PORT} within "
                    f"{APACHE_START_TIMEOUT:.0f} s; its log says:\n{apache.error_log_tail(conf)}"
                )
        if not netns.call_in_netns(ns, lambda: apache.wait_cgi(APACHE_PORT, APACHE_START_TIMEOUT)):
            raise LabError(
                f"Apache on {host} listens but its CGIs fail after {APACHE_START_TIMEOUT:.0f} s; "
                f"its log says:\n{apache.error_log_tail(conf)}"
            )

    def restart_apache(self, host: str) -> None:
        """Start HOST's Apache again (after a kill crash or stop_apache)."""
        if host in self.pids:
            raise LabError(f"Apache already runs on {host}")
        self._start_apache(host)

    def stop_apache(self, host: str) -> None:
        """Stop HOST's Apache (its backend fails; the host lives on)."""
        pid = self.pids.pop(host, None)
        if pid is None:
            raise LabError(f"no Apache runs on {host}")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # its own session: the workers go too
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        self.save()

    def down(self) -> None:
        """Remove everything of this lab: processes, namespaces, bpffs, files."""
        remove_lab(self.name)

    # ---- using the lab ----------------------------------------------------

    def namespace(self, host: str) -> str:
        self.topo.host(host)  # validates the name
        return self.topo.namespace(host)

    def argv(self, host: str, argv: Sequence[str]) -> list[str]:
        """ARGV wrapped to run on HOST."""
        return netns.ns_argv(self.namespace(host), argv)

    def run(
        self, host: str, argv: Sequence[str], *, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run ARGV on HOST and wait; raise netns.CommandError if CHECK and it fails."""
        return netns.run(argv, self.namespace(host), check=check, timeout=timeout)

    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ARGV on HOST; the caller owns the process and must wait for it."""
        return subprocess.Popen(self.argv(host, argv), **kwargs)

    def start_tool(self, host: str, *args: str) -> ToolRun:
        """Start `coral ARGS` on HOST (a tool that prints a JSON report: load, stream run)."""
        argv = [sys.executable, "-m", "coral", *args]
        proc = subprocess.Popen(
            self.argv(host, argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        return ToolRun(host, proc, args)

    def crash(self, host: str, mode: str) -> None:
        """Fail HOST: kill -9 all its processes, unplug its links, or SIGSTOP them."""
        ns = self.namespace(host)
        if mode not in CRASH_MODES:
            raise LabError(f"crash mode {mode!r}: use one of {', '.join(CRASH_MODES)}")
        if host in self.faults:
            raise LabError(f"{host} is already crashed ({self.faults[host]}); heal it first")
        if mode == "kill":
            netns.kill_now(ns)
            self.pids.pop(host, None)
        elif mode == "freeze":
            netns.stop_all(ns)
        else:
            for peer_host, ifname in self.topo.links_of(host):
                self.run(peer_host, ["ip", "link", "set", ifname, "down"])
        if mode != "kill":
            self.faults[host] = mode
        self.save()

    def heal(self, host: str) -> None:
        """Undo a link or freeze crash of HOST (a killed host stays dead)."""
        ns = self.namespace(host)
        mode = self.faults.pop(host, None)
        if mode is None:
            raise LabError(f"{host} has no link or freeze crash to heal")
        if mode == "freeze":
            netns.signal_all(ns, signal.SIGCONT)
        else:
            for peer_host, ifname in self.topo.links_of(host):
                self.run(peer_host, ["ip", "link", "set", ifname, "up"])
        self.save()

    def info(self) -> dict[str, Any]:
        """Everything a user needs to drive the lab, as plain data."""
        hosts = {}
        for h in self.topo.hosts():
            ns = self.topo.namespace(h.name)
            ifaces = {}
            for link in json.loads(self.run(h.name, ["ip", "-j", "addr", "show"]).stdout):
                if link["ifname"] == "lo":
                    continue
                ifaces[link["ifname"]] = {
                    "mac": link.get("address"),
                    "state": link.get("operstate"),
                    "addresses": [
                        f"{a['local']}/{a['prefixlen']}"
                        for a in link.get("addr_info", [])
                        if a.get("family") == "inet"
                    ],
                }
            entry: dict[str, Any] = {
                "kind": h.kind,
                "namespace": ns,
                "address": self.topo.address(h.name),
                "interfaces": ifaces,
                "fault": self.faults.get(h.name),
            }
            if h.kind == "server":
                entry["apache"] = {
                    "pid": self.pids.get(h.name),
                    "urls": [
                        f"http://127.0.0.1:{APACHE_PORT}/",
                        f"http://{self.topo.address(h.name)}:{APACHE_PORT}/",
                    ],
                    "logs": str(self._apache_conf(h.name).parent / "logs"),
                }
            hosts[h.name] = entry
        return {
            "name": self.name,
            "dir": str(self.dir),
            "bpffs": str(self.bpffs),
            "service": {"vip": SERVICE_VIP, "port": SERVICE_PORT, "second_vip": SECOND_VIP},
            "apache_port": APACHE_PORT,
            "hosts": hosts,
            "paths": [
                {"path": e.path, "method": e.method, "returns": e.returns}
                for e in content.ENDPOINTS
            ],
        }


@dataclass
class ToolRun:
    """A coral tool running on a lab host; :meth:`result` waits for its JSON report."""

    host: str
    proc: subprocess.Popen[str]
    args: tuple[str, ...]
    """The coral tool's arguments, for messages."""

    def result(self, timeout: float) -> dict[str, Any]:
        """The client's JSON report; raise LabError if it did not produce one in TIMEOUT s."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise LabError(f"{self._name} on {self.host} still running after {timeout} s") from None
        try:
            report: dict[str, Any] = json.loads(out)
        except json.JSONDecodeError:
            raise LabError(
                f"{self._name} on {self.host} exited {self.proc.returncode} without a report: {err}"
            ) from None
        return report

    @property
    def _name(self) -> str:
        return "coral " + " ".join(self.args[:2])


def remove_lab(name: str) -> None:
    """Remove lab NAME, also a half-built or half-removed one; idempotent."""
    namespaces = netns.list_namespaces(f"{PREFIX}{name}-")
    errors = []
    for ns in namespaces:
        try:
            netns.kill_all(ns)
        except netns.CommandError as e:
            errors.append(str(e))
    for ns in namespaces:
        try:
            netns.delete(ns)
        except netns.CommandError as e:
            errors.append(str(e))
    d = lab_root() / name
    bpffs = d / "bpffs"
    if os.path.ismount(bpffs):
        try:
            netns.run(["umount", str(bpffs)])
        except netns.CommandError as e:
            errors.append(str(e))
    if not errors:
        shutil.rmtree(d, ignore_errors=True)
    if errors:
        raise LabError(f"could not fully remove lab {name!r}:\n" + "\n".join(errors))


def lab_names() -> list[str]:
    """Every lab present: with a state directory, or only leftover namespaces."""
    names: set[str] = set()
    with contextlib.suppress(FileNotFoundError):
        names.update(p.name for p in lab_root().iterdir() if p.is_dir())
    for ns in netns.list_namespaces(PREFIX):
        names.add(ns.removeprefix(PREFIX).split("-", 1)[0])
    return sorted(names)


def remove_all() -> list[str]:
    """Remove every lab, including leftovers of interrupted runs; return their names."""
    names = lab_names()
    for name in names:
        remove_lab(name)
    return names
