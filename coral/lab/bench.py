"""What the lab's benchmarks share: CPU accounting, noise control, medians, output.

The benchmarks (scripts/bench_*.py) measure several phases back to back in
one lab, because the machine is shared and noisy. Each measured run is
bracketed by the machine's busy time (/proc/stat) and the CPU time of the
processes it is about; a run during which the hypervisor or processes
outside the lab took more than a bound of the machine is done again
(quiet()). This module holds those pieces, the kernel and data-plane
counters printed per phase, the table formatting, saving results and the
scripts' interrupt handling, so every benchmark measures the same way.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from coral.lab.lab import Lab
from coral.lab.pair import Pair
from coral.lab.topology import LAN_IF, ROUTER_LAN_IP
from coral.netns import ns_path, pids_in

MS_PER_JIFFY = 1000 / os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
MAX_TRIES = 3
"""Runs of one measurement at most, while each is noisier than allowed."""
NOTABLE_TCP = (
    "TcpRetransSegs",
    "TcpExtTCPTimeouts",
    "TcpExtPAWSEstab",
    "TcpExtBeyondWindow",
    "TcpExtOfoPruned",
    "TcpExtTCPRcvQDrop",
    "TcpExtTCPBacklogDrop",
    "TcpInCsumErrors",
)
"""Kernel TCP counters printed per phase: retransmissions, timeouts and drops."""


class BenchError(Exception):
    """The benchmark could not measure; the message says what went wrong."""


# ---- CPU ---------------------------------------------------------------------


def cpu_jiffies() -> tuple[int, int]:
    """Busy and stolen time of the whole machine (every host, client and softirq
    share it). Steal is the hypervisor running someone else: noise, not work."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return user + nice + system + irq + softirq, steal


def busy_ms(before: int, after: int) -> float:
    """Busy jiffies between two cpu_jiffies() samples, in ms of CPU."""
    return (after - before) * MS_PER_JIFFY


def process_cpu_s(proc: subprocess.Popen[bytes]) -> float:
    t = psutil.Process(proc.pid).cpu_times()
    return float(t.user + t.system)


def lab_netns(lab: Lab, hosts: Sequence[str] | None = None) -> dict[int, str]:
    """Network-namespace inode -> host, for HOSTS of LAB (all by default)."""
    names = lab.topo.host_names if hosts is None else hosts
    return {os.stat(ns_path(lab.namespace(h))).st_ino: h for h in names}


def _netns_of(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None  # gone meanwhile, or a kernel thread without one


CGROUP_PREFIX = "coral-bench-"


def cgroup2_mount() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted, if it is."""
    with open("/proc/mounts") as f:
        for line in f:
            _dev, mount, fstype, *_ = line.split()
            if fstype == "cgroup2":
                return Path(mount)
    return None


class HostCpu:
    """The CPU time of each lab host's processes (those in its network namespace).

    Each host gets a cgroup (v2) that its processes are moved into (adopt())
    and their children inherit: a cgroup's usage keeps the time of processes
    that are gone, which per-process times lose when nobody waits for them
    (the benchmarks' runs used Apache's cgid, which ignores SIGCHLD, so its CGIs' time
    would be missing).
    Where no cgroup v2 hierarchy is writable, the per-process times of the
    processes alive at each sample stand in (with their waited-for children).
    Call close() once the lab's processes are gone (a benchmark killed with
    SIGKILL leaves its empty coral-bench-* cgroups behind: rmdir them)."""

    def __init__(self, lab: Lab, hosts: Sequence[str]) -> None:
        self.lab = lab
        self.hosts = tuple(hosts)
        self.netns = lab_netns(lab, hosts)
        self.groups: dict[str, Path] = {}
        root = cgroup2_mount()
        if root is None:
            return
        try:
            for host in self.hosts:
                group = root / f"{CGROUP_PREFIX}{lab.name}-{host}"
                group.mkdir(exist_ok=True)
                self.groups[host] = group
        except OSError:
            self.close()

    @property
    def complete(self) -> bool:
        """True when exited processes count too (cgroups)."""
        return bool(self.groups)

    def adopt(self) -> None:
        """Move every process of each host into the host's cgroup (new ones since the
        last call: a command run on the host from outside does not inherit it)."""
        for host, group in self.groups.items():
            for pid in pids_in(self.lab.namespace(host)):
                try:
                    (group / "cgroup.procs").write_text(str(pid))
                except OSError:
                    continue  # gone meanwhile

    def sample(self) -> dict[str, dict[int, float]]:
        """Host -> an id -> CPU seconds (the cgroup's total under id 0, or each process's)."""
        if self.groups:
            out = {}
            for host, group in self.groups.items():
                stat = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines())
                out[host] = {0: int(stat["usage_usec"]) / 1e6}
            return out
        return _process_cpu(self.netns)

    @staticmethod
    def ms_between(
        before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]
    ) -> dict[str, float]:
        """CPU ms of each host between two samples (per process: one born in between
        counts whole, one that ended unwaited in between is missed)."""
        return {
            host: 1000 * sum(t - before.get(host, {}).get(k, 0.0) for k, t in ids.items())
            for host, ids in after.items()
        }

    def close(self) -> None:
        """Remove the cgroups; processes still in one go back to the root group."""
        for group in self.groups.values():
            with contextlib.suppress(OSError):
                for pid in (group / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        (group.parent / "cgroup.procs").write_text(pid)
            with contextlib.suppress(OSError):
                group.rmdir()
        self.groups.clear()


def _process_cpu(netns: Mapping[int, str]) -> dict[str, dict[int, float]]:
    """Host -> pid -> CPU seconds of every process in the namespaces NETNS names,
    with the time of their waited-for children."""
    out: dict[str, dict[int, float]] = {h: {} for h in netns.values()}
    for proc in psutil.process_iter():
        host = netns.get(_netns_of(proc.pid) or 0)
        if host is None:
            continue
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        out[host][proc.pid] = t.user + t.system + t.children_user + t.children_system
    return out


# ---- noise -------------------------------------------------------------------

NoiseSample = tuple[int, dict[int, float]]
"""Stolen jiffies, and pid -> CPU seconds of the processes outside the lab."""


def noise_sample(lab_inodes: Mapping[int, str] | set[int]) -> NoiseSample:
    """Stolen jiffies, and the CPU seconds of every process outside the lab (the
    namespaces LAB_INODES) except this one and kernel threads: other work on the
    machine, such as someone's test run."""
    me = os.getpid()
    cpu: dict[int, float] = {}
    for proc in psutil.process_iter():
        try:
            if proc.pid in (me, 2) or proc.ppid() == 2:
                continue
            ns = _netns_of(proc.pid)
            if ns is None or ns in lab_inodes:
                continue
            t = proc.cpu_times()
            cpu[proc.pid] = t.user + t.system
        except psutil.Error:
            continue  # gone meanwhile
    return cpu_jiffies()[1], cpu


def noise_pct(before: NoiseSample, after: NoiseSample, wall_s: float) -> float:
    """Steal plus foreign CPU between two samples, in % of the machine's capacity
    (processes that ended in between are missed)."""
    steal_s = busy_ms(before[0], after[0]) / 1000
    foreign_s = sum(t - before[1].get(pid, 0.0) for pid, t in after[1].items())
    return (steal_s + foreign_s) / (wall_s * NCPU) * 100


def quiet(
    fn: Callable[[], dict[str, Any]],
    lab_inodes: Mapping[int, str] | set[int],
    max_noise: float,
    label: str,
    tries: int = MAX_TRIES,
) -> dict[str, Any]:
    """FN's figures with "noise_pct" added: the steal and foreign CPU during it.
    A run noisier than MAX_NOISE % is done again, up to TRIES runs; the last is kept."""
    result: dict[str, Any] = {}
    for _ in range(tries):
        before, t0 = noise_sample(lab_inodes), time.monotonic()
        result = fn()
        result["noise_pct"] = noise_pct(before, noise_sample(lab_inodes), time.monotonic() - t0)
        if result["noise_pct"] <= max_noise:
            break
        print(f"   ({label}: {result['noise_pct']:.0f}% noise, measured again)", flush=True)
    return result


def noisy_runs(raw: Mapping[str, Sequence[Mapping[str, Any]]], max_noise: float) -> list[str]:
    """The runs of RAW (group -> runs) kept although noisier than MAX_NOISE."""
    return [
        f"{group}: {r['noise_pct']:.0f}% noise"
        for group, runs in raw.items()
        for r in runs
        if r["noise_pct"] > max_noise
    ]


# ---- the lab's counters ------------------------------------------------------


def quickack(lab: Lab, host: str) -> None:
    """The route Pair.up gives a host (no delayed ACKs toward clients), for phases
    without a pair: the phases then differ by what they measure alone."""
    lab.run(
        host,
        ["ip", "route", "replace", "default", "via", ROUTER_LAN_IP, "dev", LAN_IF,
         "quickack", "1"],
    )  # fmt: skip


def kernel_tcp(lab: Lab, host: str) -> dict[str, int]:
    """HOST's kernel TCP counters (/proc/net/snmp and netstat are per namespace):
    the data plane's misdeeds show up there, as PAWS or out-of-window drops."""
    lines = lab.run(host, ["cat", "/proc/net/snmp", "/proc/net/netstat"]).stdout.splitlines()
    out = {}
    for head, values in zip(lines[::2], lines[1::2], strict=True):
        proto, *names = head.split()
        if proto in ("Tcp:", "TcpExt:"):
            out.update(
                {proto[:-1] + n: int(v) for n, v in zip(names, values.split()[1:], strict=True)}
            )
    return out


def notable_tcp(counters: Mapping[str, int]) -> dict[str, int]:
    return {k: counters[k] for k in NOTABLE_TCP if counters.get(k)}


def plane_counters(pair: Pair | None) -> dict[str, dict[str, int]]:
    """Packets per verdict and reason, per host (nothing without a data plane)."""
    if pair is None:
        return {}
    return {
        h: {name: c.packets for name, c in plane.counters().items()}
        for h, plane in pair.planes.items()
    }


def delta(after: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    """The counters that changed, by how much."""
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def drops(counters: Mapping[str, int]) -> dict[str, int]:
    """The data plane's drop reasons among COUNTERS."""
    return {k.removeprefix("DROP_"): n for k, n in counters.items() if k.startswith("DROP_")}


# ---- servers -----------------------------------------------------------------


def wait_listening(
    lab: Lab, host: str, proc: subprocess.Popen[bytes], port: int, timeout: float
) -> None:
    """Poll HOST's listening sockets until something listens on PORT: a probe
    connection would itself go through the data plane and end up in the figures."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise BenchError(f"server on {host} exited {proc.returncode}: {err}")
        if lab.run(host, ["ss", "-Hltn", f"sport = :{port}"]).stdout.strip():
            return
        time.sleep(0.05)
    raise BenchError(f"server on {host} not listening after {timeout} s")


def stop(procs: Mapping[str, subprocess.Popen[bytes]]) -> None:
    for proc in procs.values():
        proc.kill()
        proc.wait()


# ---- figures -----------------------------------------------------------------


def percentile(values: Iterable[float], p: float) -> float | None:
    """Nearest-rank percentile (as `coral load` reports them); None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def median_of(values: Iterable[float | None]) -> float | None:
    """The median of the values present; None if there are none."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def median(runs: Sequence[Mapping[str, Any]], key: str) -> float | None:
    """The median of KEY over RUNS that have it (None: none has)."""
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}" if v < 10 else f"{v:.0f}"


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> None:
    """Columns as wide as they need; ALIGN has "l" or "r" per column (default: the
    first column left, the others right)."""
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    sides = [align[i] if i < len(align) else "l" if i == 0 else "r" for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return " ".join(
            f"{c:<{w}}" if side == "l" else f"{c:>{w}}"
            for c, w, side in zip(cells, widths, sides, strict=True)
        ).rstrip()

    print()
    print(line(header))
    print("-" * len(line(header)))
    for row in rows:
        print(line(row))


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def save(
    result: dict[str, Any],
    directory: Path,
    name: str,
    plot: Callable[[Any, dict[str, Any]], None] | None = None,
) -> Path:
    """Write RESULT as DIRECTORY/NAME-<its "started" time>.json; with PLOT and
    matplotlib installed, PLOT(pyplot, RESULT) draws the same-named .png."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"{name}-{result['started'].replace(':', '').replace('-', '')}"
    path = stem.with_suffix(".json")
    path.write_text(json.dumps(result, indent=1))
    if plot is None:
        return path
    try:
        import matplotlib
    except ImportError:
        return path
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot(plt, result)
    plt.gcf().tight_layout()
    plt.savefig(stem.with_suffix(".png"))
    plt.close("all")
    return path


# ---- the script --------------------------------------------------------------


def needs_root(prog: str, why: str) -> bool:
    """True (having said so) if this process is not root."""
    if os.geteuid() == 0:
        return False
    print(f"{prog}: needs root ({why})", file=sys.stderr)
    return True


def _stop_handler(main_pid: int) -> Callable[[int, FrameType | None], None]:
    """SIGTERM and SIGINT unwind the benchmark through its finally blocks, so its
    lab is removed. A forked copy of this process (pyroute2 forks one into a lab
    namespace to open netlink sockets there, and terminates it with SIGTERM)
    must not: its cleanup would remove the lab from inside it. It exits at once
    (as in coral.cli)."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        if os.getpid() != main_pid:
            os._exit(128 + signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    return handler


def run_script(prog: str, main: Callable[[], int]) -> None:
    """Exit with MAIN's status; SIGTERM and Ctrl-C unwind through MAIN's finally
    blocks first, so the benchmark's lab is removed."""
    handler = _stop_handler(os.getpid())
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the lab is removed", file=sys.stderr)
        sys.exit(130)


def machine() -> dict[str, Any]:
    return {"cpus": NCPU, "kernel": platform.release()}


def footer(seconds: float) -> str:
    """The last line of a benchmark's output: how long, and where."""
    return f"{seconds:.0f} s; {platform.node()}, {NCPU} CPUs, kernel {platform.release()}"
