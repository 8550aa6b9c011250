#!/usr/bin/env python3
"""What HTTP replication costs: Apache direct, then through the replicating proxies; one run.

One lab and one run because the machine is shared and noisy (see
bench_dataplane.py, which measures the data plane alone). Phases, in order:

- direct:  the client asks the primary's Apache on its LAN address
           (198.18.0.11:8080); no data plane, no proxy.
- duplex:  Pair.up and Pair.start_proxies: `coral proxy` on both hosts on the
           VIP (198.18.0.100:80); the primary logs every reply to the backup
           before the client gets a byte of it.
- det-opt: the duplex pair's proxies restarted with /static/ configured as
           deterministic: the primary logs heads and digests, the backup
           generates the bodies (PHASES below shows how a phase is added).
- simplex: the backup fenced and the primary taken over, as an agent would:
           the primary's proxy notices the service is simplex and serves
           alone, still through its data plane.

Workloads: replies of 1, 15 and 50 KiB, static (/static/*.bin) and dynamic
(/cgi-bin/random, a shell CGI: random bytes and their digest). Per phase and
workload: latency p50/p99 with one connection and one request at a time
(`coral load`, which verifies every reply), peak throughput (wrk, closed loop
with --peak-connections, which checks status and reply bytes but not the
bodies) and busy CPU per 1000 requests during the wrk run (the whole machine,
each server host's processes through a cgroup per host: Apache, its CGIs,
the proxy; and wrk). Each
phase starts with a verified `coral load` of all workloads at the same
concurrency (also the warm-up). Figures are medians of --repeats runs; a run
during which the hypervisor or processes outside the lab took more than
--max-noise of the machine is measured again. Ratios are against direct in
the same run. Last, the latency is fitted to CoRAL's equation
latency = alpha * reply_length + beta + generation_time (dissertation 4.6).

Any failed or wrong reply, wrk error, or error the proxies count (their
counters and log are read after each phase) is printed and makes the exit
status 1. Run as root with the project's venv:
.venv/bin/python scripts/bench_proxy.py (docs/performance.md has figures).
Prints a table; --save also writes JSON (and a PNG when matplotlib is
installed) under bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import signal
import statistics
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from coral import bpf, netns
from coral.lab import Lab, LabError, bench
from coral.lab.bench import BenchError, fmt, median
from coral.lab.pair import Pair
from coral.lab.topology import (
    APACHE_PORT,
    SERVER_LAN_IPS,
    SERVICE_PORT,
    SERVICE_VIP,
    fresh_name,
)

CLIENT = "client1"
SERVERS = ("primary", "backup")
KIB = 1024
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
TARGET = ("p50_ms_dyn_15k", "duplex", 1.5)
"""(metric, phase, bound): the phase's figure at most BOUND times direct's."""
REQUEST_TIMEOUT = 5
"""Seconds a request may take, for coral load and wrk."""
HEADER_SLACK = 1024
"""Most header bytes a reply may carry, for wrk's byte count."""
STATS_TIMEOUT = 2.0
LOAD_PROBLEMS_SHOWN = 3
"""Failed requests of one `coral load` run described; the counts say how many in all."""
LOG_LINES_SHOWN = 40
"""Lines the proxies logged during a phase (warnings, tracebacks) printed at most."""
TAKEOVER_GRACE = 0.1
"""After take_over: ten times the proxies' mode poll (10 ms)."""
LATENCY_METRICS = ("p50_ms", "p99_ms")
"""From the latency runs; the other metrics come from the peak runs."""
METRICS = (
    *LATENCY_METRICS,
    "rps",
    "cpu_ms_per_1k",
    "primary_cpu_ms_per_1k",
    "backup_cpu_ms_per_1k",
    "client_cpu_ms_per_1k",
)
WRK_REPORT = """\
-- bench_proxy: wrk's totals and errors as one JSON line
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests": %d, "duration_us": %d, "bytes": %d, '
    .. '"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d, '
    .. '"p50_us": %.1f, "p99_us": %.1f}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(frozen=True)
class Workload:
    """One kind of reply, always the same size."""

    dynamic: bool
    size: int

    @property
    def kib(self) -> int:
        return self.size // KIB

    @property
    def tag(self) -> str:
        return f"{'dyn' if self.dynamic else 'st'}_{self.kib}k"

    @property
    def path(self) -> str:
        """As coral load takes it (it adds a unique rid= to CGI requests)."""
        return f"/cgi-bin/random?n={self.size}" if self.dynamic else f"/static/{self.kib}k.bin"

    @property
    def wrk_path(self) -> str:
        return f"{self.path}&rid=wrk" if self.dynamic else self.path


WORKLOADS = tuple(Workload(d, s * KIB) for d in (False, True) for s in (1, 15, 50))


@dataclass
class Bench:
    """The run's state, which each phase's enter() takes to the next phase."""

    lab: Lab
    args: argparse.Namespace
    wrk_script: Path
    host_cpu: bench.HostCpu
    pair: Pair | None = None

    def the_pair(self) -> Pair:
        if self.pair is None:
            raise BenchError("this phase needs the pair an earlier phase starts")
        return self.pair


@dataclass(frozen=True)
class Phase:
    name: str
    label: str
    """Its column in the table."""
    address: str
    port: int
    what: str
    enter: Callable[[Bench], list[str]] | None
    """Takes the lab from the previous phase's state to this one and returns the
    problems seen doing so; None: not built yet."""

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"


def enter_direct(b: Bench) -> list[str]:
    # The quickack route Pair.up sets, already for direct (as bench_dataplane).
    bench.quickack(b.lab, "primary")
    return []


def enter_duplex(b: Bench) -> list[str]:
    b.pair = Pair.up(b.lab)
    b.pair.start_proxies()
    return []


def enter_deterministic(b: Bench) -> list[str]:
    """The same pair, its proxies restarted with /static/ configured as deterministic:
    the primary logs the head and a digest, the backup generates the body."""
    pair = b.the_pair()
    pair.stop_services()
    pair.start_proxies("--deterministic", "/static/")
    return []


def enter_simplex(b: Bench) -> list[str]:
    """Fail the backup as an agent would; the primary's proxy must notice it is alone
    (else it would go on logging to the backup's proxy, which still runs)."""
    pair = b.the_pair()
    pair.planes["backup"].fence()
    pair.take_over("primary")
    time.sleep(TAKEOVER_GRACE)
    stats = proxy_stats(pair, "primary") or {}
    takeovers = stats.get("replication", {}).get("takeovers", 0)
    if takeovers < 1:
        return [f"the primary's proxy counted no takeover {TAKEOVER_GRACE} s after it: {stats}"]
    return []


PHASES = (
    Phase(
        "direct", "direct", SERVER_LAN_IPS["primary"], APACHE_PORT,
        "the primary's Apache, no data plane, no proxy", enter_direct,
    ),
    Phase(
        "duplex", "duplex", SERVICE_VIP, SERVICE_PORT,
        "replicating proxies on primary and backup, data plane duplex", enter_duplex,
    ),
    Phase(
        "deterministic-optimised", "det-opt", SERVICE_VIP, SERVICE_PORT,
        "duplex, /static/ deterministic: the primary logs heads and digests",
        enter_deterministic,
    ),
    Phase(
        "simplex", "simplex", SERVICE_VIP, SERVICE_PORT,
        "backup fenced, the primary's proxy alone, data plane simplex", enter_simplex,
    ),
)  # fmt: skip


# ---- measurements --------------------------------------------------------------


def load_problems(what: str, out: Mapping[str, Any]) -> list[str]:
    """What a `coral load` report says went wrong."""
    counts = out["counts"]
    problems = [
        f"{what}: {p['outcome']} {p['target']}: {p['detail']}"
        for p in out.get("problems", [])[:LOAD_PROBLEMS_SHOWN]
    ]
    if counts["failed"] or counts["corrupted"]:
        problems.append(f"{what}: {counts['failed']} failed, {counts['corrupted']} corrupted")
    if out["connection_errors"] or out["resets"]:
        problems.append(
            f"{what}: {out['connection_errors']} connection errors, {out['resets']} resets"
        )
    return problems


def coral_load(b: Bench, url: str, what: str, duration: float, *args: str) -> dict[str, Any]:
    """A `coral load` run of DURATION s on the client with ARGS; its report, and in
    "problems_seen" what went wrong."""
    run = b.lab.start_tool(
        CLIENT, "load", url, "--timeout", str(REQUEST_TIMEOUT), "--duration", str(duration), *args
    )
    try:
        out = run.result(timeout=duration + 30)
    except LabError as e:
        raise BenchError(f"{what}: {e}") from None
    out["problems_seen"] = load_problems(what, out)
    return out


def verify_once(b: Bench, phase: Phase) -> dict[str, Any]:
    """Every workload at the peak's concurrency, every reply verified (and warm-up)."""
    mix = ",".join(w.path for w in WORKLOADS)
    out = coral_load(
        b, phase.url, "verify", b.args.verify_seconds,
        "--connections", str(b.args.peak_connections), "--mix", mix,
    )  # fmt: skip
    return {
        "counts": out["counts"],
        "rps": out["throughput_rps"],
        "problems": out["problems_seen"],
    }


def latency_once(b: Bench, phase: Phase, w: Workload) -> dict[str, Any]:
    """One connection, one request at a time: the unloaded latency, every reply verified."""
    out = coral_load(
        b, phase.url, f"latency {w.tag}", b.args.latency_seconds,
        "--connections", "1", "--mix", w.path,
    )  # fmt: skip
    return {
        "counts": out["counts"],
        "p50_ms": out["latency_ms"]["p50"],
        "p99_ms": out["latency_ms"]["p99"],
        "rps_1conn": out["throughput_rps"],
        "problems": out["problems_seen"],
    }


def peak_once(b: Bench, phase: Phase, w: Workload) -> dict[str, Any]:
    """wrk at saturation; the busy CPU of the machine, each server host's processes
    and wrk, sampled around exactly it."""
    conns, seconds = b.args.peak_connections, b.args.peak_seconds
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", f"--timeout={REQUEST_TIMEOUT}s"]
    argv += ["-s", str(b.wrk_script), phase.url + w.wrk_path]
    b.host_cpu.adopt()
    hosts0 = b.host_cpu.sample()
    child0 = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk is the only child reaped
    busy0, _ = bench.cpu_jiffies()
    proc = b.lab.run(CLIENT, argv, check=False, timeout=seconds + 30)
    busy1, _ = bench.cpu_jiffies()
    child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    hosts = b.host_cpu.ms_between(hosts0, b.host_cpu.sample())
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        why = (proc.stderr.strip() or proc.stdout.strip()).replace("\n", " ")
        return {"problems": [f"peak {w.tag}: wrk exited {proc.returncode}: {why}"]}
    out = json.loads(lines[-1])
    n = out["requests"]
    problems = [
        f"peak {w.tag}: wrk counted {out[k]} {k} errors"
        for k in ("connect", "read", "write", "status", "timeout")
        if out[k]
    ]
    low, high = n * w.size, (n + conns) * (w.size + HEADER_SLACK)
    if not low <= out["bytes"] <= high:
        problems.append(
            f"peak {w.tag}: {out['bytes']} bytes for {n} replies of {w.size} "
            f"(expected {low}..{high})"
        )
    per_1k = 1000 / max(1, n)
    client_s = (child1.ru_utime - child0.ru_utime) + (child1.ru_stime - child0.ru_stime)
    return {
        "requests": n,
        "rps": n / (out["duration_us"] / 1e6),
        "wrk_p50_ms": out["p50_us"] / 1000,
        "wrk_p99_ms": out["p99_us"] / 1000,
        "cpu_ms_per_1k": bench.busy_ms(busy0, busy1) * per_1k,
        "client_cpu_ms_per_1k": client_s * 1000 * per_1k,
        **{f"{h}_cpu_ms_per_1k": ms * per_1k for h, ms in hosts.items()},
        "problems": problems,
    }


def log_lines(pair: Pair, host: str, start: int) -> list[str]:
    """The lines HOST's proxy logged from byte START on."""
    with pair.service_log(host).open("rb") as f:
        f.seek(start)
        return f.read().decode(errors="replace").splitlines()


def proxy_stats(pair: Pair, host: str) -> dict[str, Any] | None:
    """The counters of HOST's proxy (SIGUSR1 makes it print them to its log);
    None if it did not print any."""
    log = pair.service_log(host)
    start = log.stat().st_size
    pair.service(host).send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + STATS_TIMEOUT
    while time.monotonic() < deadline:
        if lines := [x for x in log_lines(pair, host, start) if x.startswith("{")]:
            stats: dict[str, Any] = json.loads(lines[-1])
            return stats
        time.sleep(0.05)
    return None


def flat(stats: Mapping[str, Any], prefix: str = "") -> dict[str, int]:
    """The numeric leaves of STATS as dotted names."""
    out: dict[str, int] = {}
    for k, v in stats.items():
        if isinstance(v, Mapping):
            out.update(flat(v, f"{prefix}{k}."))
        elif isinstance(v, int) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def stats_problems(host: str, d: Mapping[str, int]) -> list[str]:
    """What in the proxies' counters (the phase's delta D) means something went wrong."""
    bad = [
        k
        for k, v in d.items()
        if v
        and (
            k.startswith("errors.")
            or (k.startswith("replies.") and k != "replies.200")
            or k
            in (
                "internal_errors",
                "mark_failures",
                "replication.channel_failures",
                "replication.regenerated_mismatch",
            )
        )
    ]
    return [f"proxy on {host}: {k} = {d[k]}" for k in bad]


def proxies_since(
    pair: Pair,
    stats0: Mapping[str, dict[str, Any] | None],
    logs0: Mapping[str, int],
    problems: list[str],
) -> tuple[dict[str, dict[str, int]], dict[str, list[str]]]:
    """What each proxy counted since STATS0 and logged since LOGS0 (its log's size
    then), printed; what went wrong is added to PROBLEMS."""
    stats: dict[str, dict[str, int]] = {}
    for host in SERVERS:
        code = pair.service(host).poll()
        if code is not None:
            problems.append(f"proxy on {host}: exited {code}")
            continue
        after = proxy_stats(pair, host)
        if after is None:
            problems.append(f"proxy on {host}: printed no counters")
            continue
        stats[host] = bench.delta(flat(after), flat(stats0.get(host) or {}))
        problems += stats_problems(host, stats[host])
        role = after.get("replication", {}).get("role", "?")
        print(f"   proxy on {host} ({role}): {stats[host]}", flush=True)
    logged = {
        h: [x for x in log_lines(pair, h, start) if not x.startswith("{")]
        for h, start in logs0.items()
    }
    for host, lines in logged.items():
        for line in lines[:LOG_LINES_SHOWN]:
            print(f"   proxy log on {host}: {line}", flush=True)
        if len(lines) > LOG_LINES_SHOWN:
            print(f"   proxy log on {host}: ... {len(lines) - LOG_LINES_SHOWN} more lines")
    return stats, logged


def diagnose(b: Bench) -> list[str]:
    """What the server hosts look like when replies went wrong: their processes,
    listening sockets, whether Apache answers locally, and its error log."""
    out = []
    info = b.lab.info()["hosts"]
    for host in SERVERS:
        comms: Counter[str] = Counter()
        for pid in netns.pids_in(b.lab.namespace(host)):
            with contextlib.suppress(OSError):
                comms[Path(f"/proc/{pid}/comm").read_text().strip()] += 1
        out.append(f"{host} processes: {dict(comms)}")
        ss = b.lab.run(host, ["ss", "-Hltn"], check=False).stdout.splitlines()
        out.append(f"{host} listening: {', '.join(x.split()[3] for x in ss if x.split())}")
        curl = ["curl", "-sS", "-m", "2", "-o", "/dev/null", "-w", "%{http_code}"]
        local = b.lab.run(
            host, [*curl, f"http://127.0.0.1:{APACHE_PORT}/static/1k.bin"], check=False
        )
        out.append(f"{host} Apache on 127.0.0.1: {local.stdout.strip()} {local.stderr.strip()}")
        error_log = Path(info[host]["apache"]["logs"]) / "error.log"
        with contextlib.suppress(OSError):
            out += [f"{host} error.log: {x}" for x in error_log.read_text().splitlines()[-8:]]
    return out


def measure_phase(b: Bench, phase: Phase, problems: list[str]) -> dict[str, Any]:
    """Every figure of PHASE (medians of --repeats runs), the raw runs, and what the
    proxies, the data plane and the kernels counted meanwhile; PROBLEMS are
    those seen so far (entering the phase).

    The repeats go round the workloads, so a slow stretch of the machine spreads
    over all figures instead of spoiling one."""
    t0 = time.monotonic()
    print(f"== {phase.name}: {phase.url}, {phase.what}", flush=True)
    lab, args, pair = b.lab, b.args, b.pair
    lab_inodes = bench.lab_netns(lab)
    tcp_hosts = (CLIENT, *SERVERS)
    tcp0 = {h: bench.kernel_tcp(lab, h) for h in tcp_hosts}
    planes0 = bench.plane_counters(pair)
    stats0 = {h: proxy_stats(pair, h) for h in SERVERS} if pair else {}
    logs0 = {h: pair.service_log(h).stat().st_size for h in SERVERS} if pair else {}

    verify = verify_once(b, phase)
    print(f"   verify: {verify['counts']} at {verify['rps']:.0f} req/s", flush=True)
    repeats = args.repeats
    diagnosis: list[str] = []
    if verify["problems"]:
        print("   not measured: the verified load had failures", flush=True)
        repeats = 0
        diagnosis = diagnose(b)
        for line in diagnosis:
            print(f"   {line}", flush=True)
    raw: dict[str, list[dict[str, Any]]] = {}
    for _ in range(repeats):
        for w in WORKLOADS:
            for group, fn in (
                (f"latency_{w.tag}", partial(latency_once, b, phase, w)),
                (f"peak_{w.tag}", partial(peak_once, b, phase, w)),
            ):
                run = bench.quiet(fn, lab_inodes, args.max_noise, group, args.tries)
                raw.setdefault(group, []).append(run)

    metrics: dict[str, float | None] = {}
    problems = [*problems, *verify["problems"]]
    for w in WORKLOADS:
        latency, peak = raw.get(f"latency_{w.tag}", []), raw.get(f"peak_{w.tag}", [])
        problems += [p for r in (*latency, *peak) for p in r["problems"]]
        for key in METRICS:
            metrics[f"{key}_{w.tag}"] = median(latency if key in LATENCY_METRICS else peak, key)
        shown = ", ".join(f"{k} {fmt(metrics[f'{k}_{w.tag}'])}" for k in METRICS[:4])
        print(f"   {w.tag}: {shown}", flush=True)

    tcp = {h: bench.delta(bench.kernel_tcp(lab, h), tcp0[h]) for h in tcp_hosts}
    planes1 = bench.plane_counters(pair)
    planes = {h: bench.delta(planes1[h], planes0.get(h, {})) for h in planes1}
    stats, logged = proxies_since(pair, stats0, logs0, problems) if pair else ({}, {})
    for host, c in planes.items():
        print(f"   {host} data-plane drops: {bench.drops(c) or 'none'}", flush=True)
    for host, c in tcp.items():
        print(f"   {host} kernel TCP: {bench.notable_tcp(c) or 'nothing notable'}", flush=True)
    print(f"   ({time.monotonic() - t0:.0f} s)", flush=True)
    return {
        "metrics": metrics,
        "raw": raw,
        "verify": verify,
        "proxy_stats": stats,
        "proxy_log": logged,
        "diagnosis": diagnosis,
        "plane_counters": planes,
        "kernel_tcp": tcp,
        "problems": problems,
        "noisy": bench.noisy_runs(raw, args.max_noise),
    }


# ---- the run -----------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every built phase in one lab, in order; the lab is removed whatever happens."""
    bpf.build()
    lab = Lab.up(fresh_name("bp"), clients=2)
    host_cpu: bench.HostCpu | None = None
    try:
        host_cpu = bench.HostCpu(lab, SERVERS)
        if not host_cpu.complete:
            print("(no cgroup v2: host CPU misses processes nobody waits for, the CGIs)")
        wrk_script = lab.dir / "wrk-report.lua"
        wrk_script.write_text(WRK_REPORT)
        b = Bench(lab, args, wrk_script, host_cpu)
        try:
            phases: dict[str, Any] = {}
            for phase in PHASES:
                if phase.enter is None:
                    print(f"== {phase.name}: not built", flush=True)
                    continue
                problems = phase.enter(b)
                phases[phase.name] = measure_phase(b, phase, problems)
            return phases
        finally:
            if b.pair is not None:
                b.pair.close()
    finally:
        try:
            lab.down()
        finally:
            if host_cpu is not None:
                host_cpu.close()  # once the lab's processes are gone


def ratios(phases: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """Each phase's figures over direct's (none for the backup: direct has none)."""
    base = phases["direct"]["metrics"]
    return {
        name: {
            k: None if k.startswith("backup_") else bench.ratio(v, base.get(k))
            for k, v in ph["metrics"].items()
        }
        for name, ph in phases.items()
        if name != "direct"
    }


def fit(metrics: Mapping[str, float | None]) -> dict[str, float] | None:
    """CoRAL's equation 1 by least squares over the reply lengths (KiB), p50 in us:
    static replies give alpha and beta (generation ~0); dynamic replies' intercept
    minus beta is the CGI's generation time (their slope is alpha plus the
    CGI's own cost per byte)."""
    xs = [float(w.kib) for w in WORKLOADS if not w.dynamic]
    ys = {}
    for dynamic in (False, True):
        tags = [w.tag for w in WORKLOADS if w.dynamic is dynamic]
        values = [metrics.get(f"p50_ms_{t}") for t in tags]
        if any(v is None for v in values):
            return None
        ys[dynamic] = [1000 * v for v in values if v is not None]
    alpha, beta = statistics.linear_regression(xs, ys[False])
    slope, intercept = statistics.linear_regression(xs, ys[True])

    def residual(a: float, c: float, y: list[float]) -> float:
        return max(abs(yi - (a * x + c)) for x, yi in zip(xs, y, strict=True))

    return {
        "alpha_us_per_kib": alpha,
        "beta_us": beta,
        "static_max_residual_us": residual(alpha, beta, ys[False]),
        "dynamic_slope_us_per_kib": slope,
        "dynamic_intercept_us": intercept,
        "generation_us": intercept - beta,
        "dynamic_max_residual_us": residual(slope, intercept, ys[True]),
    }


def verdict(rat: Mapping[str, Mapping[str, float | None]]) -> tuple[float | None, bool | None]:
    metric, phase, bound = TARGET
    r = rat.get(phase, {}).get(metric)
    return r, None if r is None else r <= bound


def print_results(
    phases: Mapping[str, Any],
    rat: Mapping[str, Mapping[str, float | None]],
    fits: Mapping[str, dict[str, float] | None],
) -> None:
    others = [p for p in PHASES if p.name != "direct"]
    header = ["metric", *(p.label for p in PHASES), *(f"{p.label[:3]}/dir" for p in others)]
    rows = []
    for k in phases["direct"]["metrics"]:
        row = [k]
        row += [
            fmt(phases[p.name]["metrics"].get(k)) if p.name in phases else "n/a (not built)"
            for p in PHASES
        ]
        row += [fmt(rat[p.name].get(k)) if p.name in rat else "n/a" for p in others]
        rows.append(row)
    bench.print_table(header, rows)

    print("\nlatency = alpha * reply_length + beta + generation (CoRAL eq. 1), least squares")
    print("of the p50 over 1, 15 and 50 KiB; generation = dynamic intercept - static beta")
    fit_header = ["phase", "alpha us/KiB", "beta us", "static resid us"]
    fit_header += ["dyn slope us/KiB", "generation us", "dyn resid us"]
    fit_rows = []
    for p in PHASES:
        f = fits.get(p.name)
        if f is None:
            gap = "n/a (not built)" if p.name not in phases else "-"
            fit_rows.append([p.label, gap, *[""] * (len(fit_header) - 2)])
            continue
        fit_rows.append(
            [
                p.label,
                f"{f['alpha_us_per_kib']:.2f}",
                f"{f['beta_us']:.0f}",
                f"{f['static_max_residual_us']:.0f}",
                f"{f['dynamic_slope_us_per_kib']:.2f}",
                f"{f['generation_us']:.0f}",
                f"{f['dynamic_max_residual_us']:.0f}",
            ]
        )
    bench.print_table(fit_header, fit_rows)
    base = fits.get("direct")
    for name, f in fits.items():
        if name != "direct" and f is not None and base is not None:
            print(
                f"{name} - direct: alpha {f['alpha_us_per_kib'] - base['alpha_us_per_kib']:+.2f}"
                f" us/KiB, beta {f['beta_us'] - base['beta_us']:+.0f} us, generation "
                f"{f['generation_us'] - base['generation_us']:+.0f} us"
            )
    r, ok = verdict(rat)
    metric, phase, bound = TARGET
    met = {True: "met", False: "MISSED", None: "not measured"}[ok]
    print(f"\ntarget: {metric} {phase}/direct <= {bound}: {fmt(r)}, {met}")


def plot(plt: Any, result: dict[str, Any]) -> None:
    """p50 latency over reply length per phase, static and dynamic."""
    _, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, dynamic in zip(axes, (False, True), strict=True):
        ws = [w for w in WORKLOADS if w.dynamic is dynamic]
        for name, ph in result["phases"].items():
            ys = [ph["metrics"].get(f"p50_ms_{w.tag}") for w in ws]
            ax.plot([w.kib for w in ws], [y or 0 for y in ys], "o-", label=name)
        ax.set_title(f"{'dynamic' if dynamic else 'static'}: p50 latency (ms)", fontsize=9)
        ax.set_xlabel("reply KiB")
        ax.legend(fontsize=8)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="runs per figure; median kept (3)")
    p.add_argument(
        "--latency-seconds", type=float, default=1.5, help="length of a latency run (1.5)"
    )
    p.add_argument("--peak-seconds", type=int, default=2, help="length of a wrk run, whole s (2)")
    p.add_argument(
        "--peak-connections", type=int, default=8, help="wrk's (and verify's) connections (8)"
    )
    p.add_argument(
        "--verify-seconds", type=float, default=1.5, help="the verified load per phase (1.5)"
    )
    p.add_argument(
        "--max-noise",
        type=float,
        default=5.0,
        help="redo a run when steal plus other processes took more than this %% of the machine (5)",
    )
    p.add_argument(
        "--tries",
        type=int,
        default=bench.MAX_TRIES,
        help=f"runs of a measurement at most while each is too noisy ({bench.MAX_TRIES})",
    )
    p.add_argument("--save", action="store_true", help="write JSON (and PNG) to bench/results/")
    args = p.parse_args()
    if bench.needs_root("bench_proxy", "namespaces, tc, bpffs"):
        return 2
    started = bench.now()
    t0 = time.monotonic()
    try:
        phases = run(args)
    except (BenchError, LabError) as e:
        print(f"bench_proxy: {e}")
        return 1
    rat = ratios(phases)
    fits = {name: fit(ph["metrics"]) for name, ph in phases.items()}
    print_results(phases, rat, fits)
    problems = [f"{name}: {p}" for name, ph in phases.items() for p in ph["problems"]]
    for line in problems:
        print(f"PROBLEM {line}")
    for name, ph in phases.items():
        for line in ph["noisy"]:
            print(f"NOISY {name} {line}, kept after {args.tries} tries")
    elapsed = time.monotonic() - t0
    print(f"\n{bench.footer(elapsed)}")
    if args.save:
        r, ok = verdict(rat)
        result = {
            "started": started,
            "seconds": elapsed,
            "machine": bench.machine(),
            "args": vars(args),
            "phases": phases,
            "ratios": rat,
            "fit": fits,
            "target": {"metric": TARGET, "ratio": r, "met": ok},
        }
        print(f"saved {bench.save(result, RESULTS, 'proxy', plot)}")
    return 1 if problems else 0


if __name__ == "__main__":
    bench.run_script("bench_proxy", main)
