#!/usr/bin/env python3
"""What the data plane costs: the same servers direct, duplex and simplex, in one lab, one run.

One lab and one run because the machine is shared and noisy: phases measured
minutes apart on different labs would compare the noise. Phases, in order:

- direct:  the server on the primary's LAN address; no data plane loaded yet.
- duplex:  Pair.up (data plane on primary and backup), the server on both
           hosts on the VIP; the backup clones, the primary clamps.
- simplex: the primary fenced, the backup serving alone through its data plane.

Per phase: request-reply latency and throughput (`coral reqrep`, 1 KiB and
15 KiB replies, 1 connection = unloaded and 4 = saturating the machine),
busy CPU per 1000 requests (the whole machine from /proc/stat, the client,
and each host's server process), bulk throughput (`coral stream`, download
and upload measured separately), the data plane's counters and the hosts'
kernel TCP counters. Each figure is the median of --repeats runs; a run
during which the hypervisor or other processes took more than --max-noise
of the machine is measured again. Every request and every stream byte is
verified; any failure is printed and makes the exit status 1.

Run as root with the project's venv: .venv/bin/python scripts/bench_dataplane.py
(docs/performance.md has figures and caveats). Prints a table; --save also
writes JSON (and a PNG when matplotlib is installed) under bench/results/.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from coral import bpf, reqrep
from coral.lab import Lab, bench
from coral.lab.bench import BenchError, fmt, median
from coral.lab.pair import Pair
from coral.lab.topology import SERVER_LAN_IPS, SERVICE_PORT, SERVICE_VIP, fresh_name
from coral.netns import call_in_netns

CLIENT = "client1"
CLIENT_CPU, SERVER_CPU = 0, 1
"""With --pin, to take the scheduler's placement out of an experiment."""
SIZES = (1024, 15 * 1024)
MIB = 2**20
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
TARGETS = (
    # (metric prefix, bound on duplex/direct, True if the ratio must stay at or below it)
    ("p50_ms_", 1.3, True),
    ("p99_ms_", 1.5, True),
    ("bulk_", 0.6, False),
)
SERVER_START_TIMEOUT = 10.0
BULK_TIMEOUT = 20
"""Seconds a stream may stall: a stall is a finding, not a reason to wait a minute."""


@dataclass(frozen=True)
class Phase:
    """Where the servers run and what they listen on."""

    name: str
    address: str
    hosts: tuple[str, ...]
    pair: Pair | None
    """The data plane, for the servers' closing marks; None for direct."""
    pin: bool
    """Client on CLIENT_CPU, every server on SERVER_CPU."""

    def argv(self, argv: list[str], cpu: int) -> list[str]:
        """ARGV, pinned to CPU if the phase pins."""
        return ["taskset", "-c", str(cpu), *argv] if self.pin else argv


def size_tag(size: int) -> str:
    return f"{size // 1024}k"


# ---- servers -----------------------------------------------------------------


def start_servers(lab: Lab, phase: Phase, program: str) -> dict[str, subprocess.Popen[bytes]]:
    """`coral PROGRAM serve` on each host of PHASE, listening when this returns."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for host in phase.hosts:
            argv = [sys.executable, "-m", "coral", program, "serve"]
            argv.append(f"{phase.address}:{SERVICE_PORT}")
            if phase.pair is not None:
                argv += ["--pin-dir", str(phase.pair.pin_dir(host))]
            procs[host] = lab.popen(
                host,
                phase.argv(argv, SERVER_CPU),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        for host, proc in procs.items():
            bench.wait_listening(lab, host, proc, SERVICE_PORT, SERVER_START_TIMEOUT)
    except BaseException:
        bench.stop(procs)
        raise
    return procs


# ---- measurements --------------------------------------------------------------


def reqrep_once(
    lab: Lab,
    phase: Phase,
    procs: dict[str, subprocess.Popen[bytes]],
    size: int,
    connections: int,
    seconds: float,
) -> dict[str, Any]:
    """One verified request-reply run from the client; CPU sampled around exactly it.

    The client runs in this process (on a thread inside the client's namespace),
    so the CPU bracket holds no interpreter start-up. Runs are bounded by time,
    not count: CPU times tick in 10 ms, and every phase gets the same resolution."""
    cfg = reqrep.ReqRepConfig(
        phase.address, SERVICE_PORT, connections=connections, size=size, duration=seconds
    )
    ns = lab.namespace(CLIENT)
    cpu0 = {h: bench.process_cpu_s(p) for h, p in procs.items()}
    busy0, _ = bench.cpu_jiffies()

    def client() -> reqrep.ReqRepReport:
        if phase.pin:
            os.sched_setaffinity(0, {CLIENT_CPU})  # this thread only
        return reqrep.run(cfg)

    report = call_in_netns(ns, client)
    busy1, _ = bench.cpu_jiffies()
    out = report.to_json()
    per_1k = 1000 / max(1, out["counts"]["ok"])
    return {
        "counts": out["counts"],
        "problems": out["problems"],
        "p50_ms": out["latency_ms"]["p50"] if out["latency_ms"] else None,
        "p99_ms": out["latency_ms"]["p99"] if out["latency_ms"] else None,
        "rps": out["throughput_rps"],
        "cpu_ms_per_1k": bench.busy_ms(busy0, busy1) * per_1k,
        "client_cpu_ms_per_1k": out["client_cpu_ms"] * per_1k,
        **{
            f"{h}_cpu_ms_per_1k": (bench.process_cpu_s(p) - cpu0[h]) * 1000 * per_1k
            for h, p in procs.items()
        },
    }


def bulk_once(lab: Lab, phase: Phase, streams: int, up: int, down: int) -> dict[str, Any]:
    """One verified `coral stream run`: MiB/s over all streams (bytes / slowest stream)."""
    argv = [sys.executable, "-m", "coral", "stream", "run"]
    argv += [f"{phase.address}:{SERVICE_PORT}", "--streams", str(streams)]
    argv += ["--up", str(up), "--down", str(down), "--timeout", str(BULK_TIMEOUT)]
    proc = lab.run(CLIENT, phase.argv(argv, CLIENT_CPU), check=False, timeout=120)
    try:
        out = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise BenchError(f"coral stream run printed no report: {proc.stderr}") from None
    seconds = max(s["seconds"] for s in out["streams"])
    return {
        "ok": out["ok"],
        "errors": [s["error"] for s in out["streams"] if s["error"]],
        "mibps": streams * (up + down) / MIB / seconds if out["ok"] else None,
    }


def measure_phase(lab: Lab, phase: Phase, args: argparse.Namespace) -> dict[str, Any]:
    """Every metric of PHASE (medians of ARGS.repeats runs), the raw runs, and the
    data plane's counters per measurement.

    The repeats go round the configurations, so a slow stretch of the machine
    spreads over all figures instead of spoiling one."""
    print(f"== {phase.name}: servers on {', '.join(phase.hosts)} at {phase.address}", flush=True)
    raw: dict[str, list[dict[str, Any]]] = {}
    counts: dict[str, dict[str, dict[str, int]]] = {}
    lab_inodes = bench.lab_netns(lab)

    def measured(group: str, fn: Callable[[], dict[str, Any]]) -> None:
        """FN's figures, with the data plane's counters and the noise during it;
        a noisy run is done again (up to bench.MAX_TRIES)."""

        def with_counters() -> dict[str, Any]:
            before = bench.plane_counters(phase.pair)
            result = fn()
            after = bench.plane_counters(phase.pair)
            result["counters"] = {h: bench.delta(after[h], before.get(h, {})) for h in after}
            return result

        result = bench.quiet(with_counters, lab_inodes, args.max_noise, group)
        raw.setdefault(group, []).append(result)
        total = counts.setdefault(group, {})
        for host, c in result["counters"].items():
            for reason, n in c.items():
                total.setdefault(host, {})[reason] = total.get(host, {}).get(reason, 0) + n

    tcp_hosts = (CLIENT, "primary", "backup")
    tcp0 = {h: bench.kernel_tcp(lab, h) for h in tcp_hosts}
    configs = list(itertools.product(args.connections, SIZES))
    procs = start_servers(lab, phase, "reqrep")
    try:
        for conns, size in configs:
            reqrep_once(lab, phase, procs, size, conns, args.warmup)
        for _, (conns, size) in itertools.product(range(args.repeats), configs):
            measured(
                f"reqrep_{size_tag(size)}_c{conns}",
                partial(reqrep_once, lab, phase, procs, size, conns, args.seconds),
            )
    finally:
        bench.stop(procs)
    procs = start_servers(lab, phase, "stream")
    try:
        size = args.bulk_mib * MIB
        for _, direction in itertools.product(range(args.repeats), ("down", "up")):
            up, down = (0, size) if direction == "down" else (size, 0)
            measured(
                f"bulk_{direction}",
                partial(bulk_once, lab, phase, args.streams, up, down),
            )
    finally:
        bench.stop(procs)

    tcp = {h: bench.delta(bench.kernel_tcp(lab, h), tcp0[h]) for h in tcp_hosts}
    metrics: dict[str, float | None] = {}
    problems: list[str] = []
    for conns, size in configs:
        tag = f"{size_tag(size)}_c{conns}"
        runs = raw[f"reqrep_{tag}"]
        problems += [f"reqrep {tag}: {p}" for r in runs for p in r["problems"]]
        keys = ["p50_ms", "p99_ms", "rps", "cpu_ms_per_1k", "client_cpu_ms_per_1k"]
        keys += [f"{h}_cpu_ms_per_1k" for h in ("primary", "backup")]  # same rows everywhere
        for key in keys:
            metrics[f"{key}_{tag}"] = median(runs, key)
        shown = ", ".join(f"{k} {fmt(metrics[f'{k}_{tag}'])}" for k in keys[:4])
        print(f"   reqrep {tag}: {shown}", flush=True)
    for direction in ("down", "up"):
        runs = raw[f"bulk_{direction}"]
        problems += [f"bulk {direction}: {e}" for r in runs for e in r["errors"]]
        metrics[f"bulk_{direction}_mibps"] = median(runs, "mibps")
        print(f"   bulk {direction}: {fmt(metrics[f'bulk_{direction}_mibps'])} MiB/s", flush=True)
    for group, per_host in counts.items():
        for host, c in per_host.items():
            if d := bench.drops(c):
                print(f"   {group} {host} drops: {d}", flush=True)
    for host, c in tcp.items():
        print(f"   {host} kernel TCP: {bench.notable_tcp(c) or 'nothing notable'}", flush=True)
    return {
        "metrics": metrics,
        "raw": raw,
        "counters": counts,
        "kernel_tcp": tcp,
        "problems": problems,
        "noisy": bench.noisy_runs(raw, args.max_noise),
    }


# ---- the run -----------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    """All three phases in one lab; the lab is removed whatever happens."""
    bpf.build()
    lab = Lab.up(fresh_name("perf"), clients=1)  # "bench" + 8 hex digits exceeds 12 characters
    phases: dict[str, Any] = {}
    try:
        # The quickack route Pair.up sets, already for direct: the phases then
        # differ by the data plane alone.
        bench.quickack(lab, "primary")
        direct = Phase("direct", SERVER_LAN_IPS["primary"], ("primary",), None, args.pin)
        phases["direct"] = measure_phase(lab, direct, args)
        pair = Pair.up(lab)
        try:
            duplex = Phase("duplex", SERVICE_VIP, ("primary", "backup"), pair, args.pin)
            phases["duplex"] = measure_phase(lab, duplex, args)
            pair.planes["primary"].fence()
            pair.take_over("backup")
            simplex = Phase("simplex", SERVICE_VIP, ("backup",), pair, args.pin)
            phases["simplex"] = measure_phase(lab, simplex, args)
        finally:
            pair.close()
    finally:
        lab.down()
    return phases


def ratios(phases: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    base = phases["direct"]["metrics"]
    return {
        name: {k: bench.ratio(v, base.get(k)) for k, v in phases[name]["metrics"].items()}
        for name in ("duplex", "simplex")
    }


def target_of(metric: str) -> tuple[float, bool] | None:
    for prefix, bound, at_most in TARGETS:
        if metric.startswith(prefix):
            return bound, at_most
    return None


def verdicts(rat: dict[str, dict[str, float | None]]) -> dict[str, bool | None]:
    """Each target of the issue against the duplex/direct ratio (None: not measured)."""
    out: dict[str, bool | None] = {}
    for metric, r in rat["duplex"].items():
        target = target_of(metric)
        if target is not None:
            bound, at_most = target
            out[metric] = None if r is None else (r <= bound if at_most else r >= bound)
    return out


def print_table(phases: dict[str, Any], rat: dict[str, Any], ok: dict[str, bool | None]) -> None:
    cols = ("direct", "duplex", "simplex")
    header = ["metric", *cols, "dup/dir", "smp/dir", " target (duplex/direct)"]
    rows = []
    for k in phases["direct"]["metrics"]:
        row = [k, *(fmt(phases[p]["metrics"].get(k)) for p in cols)]
        row += [fmt(rat[p].get(k)) for p in ("duplex", "simplex")]
        target = target_of(k)
        verdict = ""
        if target is not None:
            bound, at_most = target
            met = {True: "met", False: "MISSED", None: "-"}[ok[k]]
            verdict = f"{'<=' if at_most else '>='} {bound}: {met}"
        rows.append([*row, f" {verdict}"])
    bench.print_table(header, rows, align="lrrrrrl")


def plot(plt: Any, result: dict[str, Any]) -> None:
    keys = list(result["targets"])
    cols = ["direct", "duplex", "simplex"]
    _, axes = plt.subplots(1, len(keys), figsize=(3 * len(keys), 3))
    for ax, k in zip(axes, keys, strict=True):
        ax.bar(cols, [result["phases"][p]["metrics"].get(k) or 0 for p in cols])
        ax.set_title(k, fontsize=9)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=1.5, help="length of a reqrep run (1.5)")
    p.add_argument("--warmup", type=float, default=0.3, help="discarded reqrep seconds (0.3)")
    p.add_argument(
        "--connections",
        type=lambda t: [int(c) for c in t.split(",")],
        default=[1, 4],
        help="reqrep connection counts, comma-separated (1,4): unloaded and saturated",
    )
    p.add_argument("--repeats", type=int, default=3, help="runs per figure; median kept (3)")
    p.add_argument("--streams", type=int, default=2, help="bulk streams (2)")
    p.add_argument("--bulk-mib", type=int, default=50, help="MiB per stream and direction (50)")
    p.add_argument(
        "--max-noise",
        type=float,
        default=5.0,
        help="redo a run when steal plus other processes took more than this %% of the machine (5)",
    )
    p.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=False,
        help=f"client on CPU {CLIENT_CPU}, servers on CPU {SERVER_CPU} (default: off)",
    )
    p.add_argument("--save", action="store_true", help="write JSON (and PNG) to bench/results/")
    args = p.parse_args()
    if bench.needs_root("bench_dataplane", "namespaces, tc, bpffs"):
        return 2
    started = bench.now()
    t0 = time.monotonic()
    phases = run(args)
    rat = ratios(phases)
    ok = verdicts(rat)
    print_table(phases, rat, ok)
    problems = [f"{name}: {p}" for name, ph in phases.items() for p in ph["problems"]]
    for line in problems[:20]:
        print(f"PROBLEM {line}")
    for name, ph in phases.items():
        for line in ph["noisy"]:
            print(f"NOISY {name} {line}, kept after {bench.MAX_TRIES} tries")
    elapsed = time.monotonic() - t0
    print(f"\n{bench.footer(elapsed)}")
    if args.save:
        result = {
            "started": started,
            "seconds": elapsed,
            "machine": bench.machine(),
            "args": vars(args),
            "phases": phases,
            "ratios": rat,
            "targets": ok,
        }
        print(f"saved {bench.save(result, RESULTS, 'dataplane', plot)}")
    return 1 if problems else 0


if __name__ == "__main__":
    bench.run_script("bench_dataplane", main)
