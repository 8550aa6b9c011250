#!/usr/bin/env python3
"""The long fault campaign: N cycles of a random crash on a random host, each
followed by the host's re-integration, under the verifying load.

One lab and one pair for the whole campaign (`coral.lab.agents`: a node agent
and its proxy on primary and backup, the witness on the router). Per cycle:

1. `coral load` on both clients (4 connections each, every reply verified)
   against the VIP for --load-seconds: one load run per cycle, so that each
   cycle has its own counts and its own longest gap;
2. once the primary of the moment holds 8 more replicated connections than
   before the load started (its agent's status is polled: the data plane
   keeps the entries of closed connections, so the count only grows);
3. the victim, a host picked at random by name (roles alternate: the host
   that kept serving stays primary, the returning one becomes backup), is
   crashed with a kind picked at random from --kinds: kill (SIGKILL to every
   process of the host), link (its links unplugged) or freeze (SIGSTOP);
4. the survivor's agent reaches simplex by itself; the victim is then brought
   back (`LabPair.reintegrate`: link or freeze undone, Apache restarted after a
   kill, its agent restarted) and the pair waits to be duplex again;
5. the load runs to its end; its reports give the cycle's counts, and its
   records the cycle's client-visible gap (the longest time without a
   completed request, the worse of the two clients; it covers the failover
   and the re-integration), also split at the moment the survivor served
   alone: the failover's gap and the return's.

Printed per cycle: the victim (and its role then), the crash kind, the gap
(where it began, relative to the crash; the failover's and the return's),
the survivor's failover total (its agent's `last_failover`), the
re-integration (the survivor's `last_reintegration`: the returning host's
join request to duplex; and the wall time of the whole return, restarts
included), the load's counts and the machine's noise. At the end: the
totals, the gap distribution overall, per kind, per victim host and per
victim role, the median failover and re-integration phases.

After each cycle both agents must be duplex. A pair that left duplex by
itself (an "unplanned failover": on a shared VM, a stall of the whole machine
longer than the lease does that) is recorded and made whole again (the host
serving alone stays, its peer rejoins), and the campaign goes on; so does it
after a step of a cycle that failed. A troubled cycle prints the load
client's problems, the times of its steps and the tails of the agents',
proxies', Apaches' and witness's logs. The campaign ends early only if the
pair cannot be made whole or a load client gave no report.

Exit status: 0 if every request of every cycle was right, nothing was reset
and nothing unplanned happened; 1 otherwise; 2 without root.
Run as root: .venv/bin/python scripts/campaign.py --cycles 100
(docs/operations.md, "Long campaign"; figures in docs/performance.md).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import itertools
import json
import math
import random
import select
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from coral.lab import CRASH_MODES, Lab, LabError, agents, bench
from coral.lab.agents import LabPair
from coral.lab.bench import fmt, median_of, percentile
from coral.lab.lab import ToolRun
from coral.lab.pair import HOSTS, peer_of
from coral.lab.topology import SERVICE_VIP, fresh_name

CLIENTS = ("client1", "client2")
URL = f"http://{SERVICE_VIP}"
CONNECTIONS = 4
REPLICATED = len(CLIENTS) * CONNECTIONS
"""New replicated connections the primary must hold before the crash: all of the load's."""
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
REPLICATE_TIMEOUT_S = 15.0
TAKEOVER_TIMEOUT_S = 10.0
REINTEGRATE_TIMEOUT_S = 30.0
SLOW_REINTEGRATION_MS = 100.0
"""A re-integration above this prints its phases (the target is 50 ms)."""
RESULT_SLACK_S = 30.0
"""A load run's report is due this long after its --duration."""
MIN_LOAD_AFTER_S = 1.0
"""Load time at least left once the pair is duplex again, so the returned pair
serves (and replicates) the clients' new connections under load before the run ends."""
POLL_S = 0.02
SETTLE_ATTEMPTS = 3
TRANSIENT = {"starting", "lost", "takeover", "joining"}
"""Agent states on the way to another: settle() waits them out."""
LOG_LINES_SHOWN = 25
PERCENTILES = (50, 90, 99)


@dataclass
class CycleRecord:
    """One cycle: what was done, what the clients saw, what the agents recorded."""

    n: int
    victim: str
    victim_role: str
    kind: str
    load_seeds: list[int]
    events: dict[str, str] = field(default_factory=dict)
    """Wall-clock times (as in the agents' logs) of the cycle's steps: load, crash,
    simplex, fenced (the victim knows it is out), reintegrated, load_end."""
    ok: int = 0
    failed: int = 0
    corrupted: int = 0
    resets: int = 0
    connection_errors: int = 0
    gap_ms: float | None = None
    """The longest time without a completed request, the worse of the two clients
    (`coral load`'s longest_gap_ms, or the time to the first reply if longer)."""
    gap_from_crash_s: float | None = None
    """Where that gap began, relative to the start of the crash call."""
    failover_gap_ms: float | None = None
    """The longest gap that began before the survivor was serving alone."""
    reintegration_gap_ms: float | None = None
    """The longest gap that began after that: while the victim came back, and later."""
    replicated_after_s: float | None = None
    """Load start -> the primary holds the load's connections replicated."""
    crash_to_simplex_s: float | None = None
    """Crash call -> the survivor's status says simplex (seen from outside)."""
    reintegrate_wall_ms: float | None = None
    """The whole return: heal or Apache restart, agent restart, until both are duplex."""
    load_after_reintegration_s: float | None = None
    """Load time left once the pair was duplex again (negative: the load ended first)."""
    failover: dict[str, Any] | None = None
    reintegration: dict[str, Any] | None = None
    conns_entries: int | None = None
    """Entries in the primary's connection table at the cycle's start (duplex + simplex)."""
    noise_pct: float | None = None
    """Steal plus CPU of processes outside the lab during the cycle, % of the machine."""
    loads: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    crashed: bool = False
    unplanned: list[str] = field(default_factory=list)
    """The pair leaving duplex by itself (no crash of the campaign's), and when."""
    aborted: str | None = None
    """Why the campaign could not go on after this cycle."""
    logs: dict[str, list[str]] = field(default_factory=dict)

    @property
    def bad(self) -> bool:
        return bool(self.failed or self.corrupted or self.resets or self.connection_errors)

    @property
    def troubled(self) -> bool:
        return bool(self.bad or self.problems or self.unplanned or self.aborted)


def csv_of(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)}")
        return items

    return parse


def wall_clock() -> str:
    """Now, as the agents' logs write it (local time, milliseconds)."""
    return datetime.datetime.now().strftime("%H:%M:%S.%f")[:-3]


# ---- the pair ------------------------------------------------------------------


def pair_states(pair: LabPair) -> dict[str, dict[str, Any] | None]:
    """Each host's status (None: its agent does not answer)."""
    statuses: dict[str, dict[str, Any] | None] = {}
    for host in HOSTS:
        try:
            statuses[host] = pair.status(host)
        except (OSError, ValueError):
            statuses[host] = None
    return statuses


def state_of(status: Mapping[str, Any] | None) -> str:
    return "without agent" if status is None else str(status["state"])


def settle(pair: LabPair, rec: CycleRecord) -> str:
    """After a cycle: the service's primary, once both agents are duplex. A pair
    not duplex (it left duplex by itself, or the cycle did not complete) is
    recorded in REC.unplanned and made whole again: the host serving alone stays,
    its peer rejoins. LabError if that does not succeed in SETTLE_ATTEMPTS tries."""
    for _ in range(SETTLE_ATTEMPTS):
        deadline = time.monotonic() + TAKEOVER_TIMEOUT_S
        while True:  # let a failover or a join in progress finish first
            statuses = pair_states(pair)
            states = {h: state_of(s) for h, s in statuses.items()}
            if not TRANSIENT & set(states.values()) or time.monotonic() > deadline:
                break
            time.sleep(POLL_S)
        if all(state == "duplex" for state in states.values()):
            for host, status in statuses.items():
                if status and status["services"][0]["role"] == "primary":
                    return host
            raise LabError("the pair is duplex, but neither host is the service's primary")
        what = "; ".join(f"{h} {states[h]}: {last_why(statuses[h])}" for h in HOSTS)
        rec.unplanned.append(f"after the cycle ({wall_clock()}): {what}")
        serving = [h for h in HOSTS if states[h] == "simplex"]
        if len(serving) != 1:
            raise LabError(f"the pair cannot be made whole: {what}")
        out = peer_of(serving[0])
        try:
            if pair.lab.faults.get(out) == "freeze":
                pair.lab.heal(out)
                statuses[out] = pair_states(pair)[out]
            if out not in pair.lab.faults and statuses[out] is not None:
                pair.wait(out, {"fenced"}, TAKEOVER_TIMEOUT_S)  # see run_cycle
            pair.reintegrate(out, REINTEGRATE_TIMEOUT_S)
        except (LabError, OSError) as e:
            rec.problems.append(f"bringing {out} back after the cycle: {first_line(e)}")
    raise LabError(f"the pair is not duplex after {SETTLE_ATTEMPTS} tries to make it whole")


def first_line(e: BaseException) -> str:
    """An error's first line (LabPair's errors append the agent's log, printed anyway)."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def conns(status: Mapping[str, Any]) -> tuple[int, int]:
    """(duplex, simplex) entries of the service's connection table in STATUS."""
    c = status["services"][0]["connections"]
    return int(c["duplex"]), int(c["simplex"])


class Unplanned(LabError):
    """The pair left duplex without the campaign's doing."""


def last_why(status: Mapping[str, Any] | None) -> str:
    if status is None:
        return "its agent does not answer"
    transitions = status["transitions"]
    return str(transitions[-1]["why"]) if transitions else "?"


def wait_replicated(pair: LabPair, host: str, count: int, timeout: float) -> None:
    """Poll HOST's agent until its data plane holds COUNT connections in duplex;
    Unplanned if it leaves duplex meanwhile."""
    deadline = time.monotonic() + timeout
    seen = 0
    while True:
        status = pair.status(host)
        if status["state"] != "duplex":
            raise Unplanned(f"{host} went {status['state']} before the crash: {last_why(status)}")
        seen = conns(status)[0]
        if seen >= count:
            return
        if time.monotonic() > deadline:
            raise LabError(f"{host}: {seen} of {count} duplex connections after {timeout} s")
        time.sleep(POLL_S)


def records_path(lab: Lab, client: str) -> Path:
    return lab.dir / client / "load-records.jsonl"


def start_load(lab: Lab, seconds: float, seeds: Sequence[int]) -> list[ToolRun]:
    runs = []
    for client, seed in zip(CLIENTS, seeds, strict=True):
        records = records_path(lab, client)
        records.parent.mkdir(parents=True, exist_ok=True)
        args = ["--duration", str(seconds), "--connections", str(CONNECTIONS), "--seed", str(seed)]
        runs.append(lab.start_tool(client, "load", URL, *args, "--records", str(records)))
    return runs


def client_start(report: Mapping[str, Any], appeared: float) -> float:
    """When the client's run began on this process's monotonic clock: the client
    says so (newer `coral load`), or its report's appearance minus its duration
    (late by the time from the run's end to its output: milliseconds when idle)."""
    started = report.get("started_monotonic")
    return float(started) if started else appeared - report["duration_s"]


Gap = tuple[float, float]
"""(length in ms, start on this process's monotonic clock)"""


def gaps_of(path: Path, t0: float, split: float) -> tuple[Gap, Gap]:
    """The longest times without a completed request in the records file PATH of a
    run that began at T0: among those that began before SPLIT, and after it. The
    run's start counts as a completion: a crash before the first reply completed
    delays that reply (`coral load`'s longest_gap_ms counts between replies only)."""
    ends = sorted(
        t0 + r["end"]
        for line in path.read_text().splitlines()
        if (r := json.loads(line))["outcome"] == "ok"
    )
    before = after = (0.0, t0)
    for a, b in itertools.pairwise([t0, *ends]):
        gap = ((b - a) * 1000, a)
        if a < split:
            before = max(before, gap)
        else:
            after = max(after, gap)
    return before, after


def reports_with_end(
    runs: Sequence[ToolRun], timeout: float
) -> dict[str, tuple[dict[str, Any], float]]:
    """Each client's load report with the monotonic time its output appeared (the
    client writes it once its run is over: the run's end on this process's clock)."""

    def wait(run: ToolRun) -> tuple[dict[str, Any], float]:
        assert run.proc.stdout is not None
        select.select([run.proc.stdout], [], [], timeout)
        appeared = time.monotonic()
        return run.result(timeout), appeared

    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
        futures = {r.host: pool.submit(wait, r) for r in runs}
        return {host: f.result() for host, f in futures.items()}


def stop_load(runs: Sequence[ToolRun]) -> None:
    for r in runs:
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.communicate()


def log_files(lab: Lab) -> list[Path]:
    """The agents', proxies' and Apaches' logs of LAB, and the witness's."""
    files = []
    for host in HOSTS:
        files += sorted((lab.dir / host / "agent").glob("*.log"))
        files.append(lab.dir / host / "apache" / "logs" / "error.log")
    return [*files, lab.dir / "router" / "witness.log"]


def tail(path: Path, lines: int) -> list[str]:
    """The last LINES lines of PATH (of Apache's error log: without its notices)."""
    if not path.exists():
        return ["(no log)"]
    text = path.read_text(errors="replace").splitlines()
    return [line for line in text if ":notice]" not in line][-lines:]


def load_problems(client: str, report: Mapping[str, Any]) -> list[str]:
    counts = report["counts"]
    out = [f"{client}: {counts[k]} {k}" for k in ("failed", "corrupted") if counts.get(k)]
    out += [f"{client}: {report[k]} {k}" for k in ("resets", "connection_errors") if report[k]]
    if not counts.get("ok"):
        out.append(f"{client}: no request succeeded")
    out += [
        f"{client}:   {p['outcome']} {p['target']} at {p['time']:.3f} s: {p['detail']}"
        for p in report.get("problems", [])
    ]
    return out


# ---- one cycle -----------------------------------------------------------------


def run_cycle(
    pair: LabPair, rec: CycleRecord, primary: str, args: argparse.Namespace, inodes: set[int]
) -> None:
    """Crash REC's victim under load, bring it back, let the load finish; fill REC.
    A step that fails is a problem of REC (settle() then repairs the pair); REC is
    aborted only if the load clients gave no report."""
    lab, victim, survivor = pair.lab, rec.victim, peer_of(rec.victim)
    before = pair.status(primary)
    duplex0, simplex0 = conns(before)
    rec.conns_entries = duplex0 + simplex0
    survivor0 = before if survivor == primary else pair.status(survivor)
    noise0 = bench.noise_sample(inodes)
    began = time.monotonic()
    rec.events["load"] = wall_clock()
    runs = start_load(lab, args.load_seconds, rec.load_seeds)
    crash_at = simplex_at = reintegrated_at = None
    try:
        try:
            wait_replicated(pair, primary, duplex0 + REPLICATED, REPLICATE_TIMEOUT_S)
            crash_at = time.monotonic()
            rec.events["crash"] = wall_clock()
            rec.replicated_after_s = crash_at - began
            lab.crash(victim, rec.kind)
            rec.crashed = True
            status = pair.wait(survivor, {"simplex"}, TAKEOVER_TIMEOUT_S)
            simplex_at = time.monotonic()
            rec.events["simplex"] = wall_clock()
            rec.crash_to_simplex_s = simplex_at - crash_at
            if status["failovers"] <= survivor0["failovers"]:
                rec.problems.append(f"survivor {survivor} recorded no new failover")
            rec.failover = status["last_failover"]
            if rec.kind == "freeze":  # it thaws, finds its lease run out and fences itself
                lab.heal(victim)
            if rec.kind != "kill":
                # LabPair.reintegrate asks the agent to restart, which only a fenced one
                # does (it ignores the refusal): wait until the victim knows it is out.
                pair.wait(victim, {"fenced"}, TAKEOVER_TIMEOUT_S)
                rec.events["fenced"] = wall_clock()
            after = pair.reintegrate(victim, REINTEGRATE_TIMEOUT_S)
            reintegrated_at = time.monotonic()
            rec.events["reintegrated"] = wall_clock()
            rec.reintegrate_wall_ms = (reintegrated_at - simplex_at) * 1000
            late = after["last_failover"]  # with confirmed_ms, if the VIP move got confirmed
            if rec.failover and late and late.get("at") == rec.failover.get("at"):
                rec.failover = late
            rec.reintegration = after["last_reintegration"]
            if rec.reintegration == survivor0["last_reintegration"]:
                rec.problems.append(f"survivor {survivor} recorded no new re-integration")
            role = after["services"][0]["role"]
            if role != "primary":
                rec.problems.append(f"survivor {survivor} is {role} after the re-integration")
        except Unplanned as e:
            rec.unplanned.append(f"{e} ({wall_clock()})")
        except (LabError, OSError) as e:  # settle() finds the pair's state and repairs it
            rec.problems.append(f"the cycle did not complete ({wall_clock()}): {first_line(e)}")
        ended = reports_with_end(runs, args.load_seconds + RESULT_SLACK_S)
        rec.events["load_end"] = wall_clock()
    except LabError as e:
        rec.aborted = rec.aborted or str(e)
        return
    finally:
        stop_load(runs)
        rec.noise_pct = bench.noise_pct(
            noise0, bench.noise_sample(inodes), time.monotonic() - began
        )
    reports = {c: report for c, (report, _) in ended.items()}
    rec.loads = reports
    rec.ok = sum(r["counts"]["ok"] for r in reports.values())
    rec.failed = sum(r["counts"]["failed"] for r in reports.values())
    rec.corrupted = sum(r["counts"]["corrupted"] for r in reports.values())
    rec.resets = sum(r["resets"] for r in reports.values())
    rec.connection_errors = sum(r["connection_errors"] for r in reports.values())
    for client, report in reports.items():
        rec.problems += load_problems(client, report)
    # the gaps from the records (as `coral load` finds them, and the time to the
    # first reply), split at the moment the survivor served alone
    split = simplex_at if simplex_at is not None else math.inf
    phases = [
        gaps_of(records_path(lab, c), client_start(r, t), split) for c, (r, t) in ended.items()
    ]
    failover = max(p[0] for p in phases)
    rest = max(p[1] for p in phases)
    worst = max(failover, rest)
    rec.gap_ms = worst[0]
    if crash_at is not None:
        rec.gap_from_crash_s = worst[1] - crash_at
    if simplex_at is not None:
        rec.failover_gap_ms, rec.reintegration_gap_ms = failover[0], rest[0]
    if reintegrated_at is not None:
        rec.load_after_reintegration_s = min(t for _, t in ended.values()) - reintegrated_at
        if rec.load_after_reintegration_s < MIN_LOAD_AFTER_S:
            rec.warnings.append(
                f"the load ended {rec.load_after_reintegration_s:+.1f} s after the pair was "
                "duplex again: the returned pair was hardly exercised (raise --load-seconds)"
            )


def cycle_line(rec: CycleRecord, total: int) -> str:
    width = len(str(total))
    head = f"[{rec.n:>{width}}/{total}] {rec.victim:<7} ({rec.victim_role:<7}) {rec.kind:<6}"
    if rec.gap_ms is None:
        return f"{head} not measured"
    at = "" if rec.gap_from_crash_s is None else f" at {rec.gap_from_crash_s:+.2f} s"
    failover = rec.failover["total_ms"] if rec.failover else None
    reint = rec.reintegration["total_ms"] if rec.reintegration else None
    wall = None if rec.reintegrate_wall_ms is None else rec.reintegrate_wall_ms / 1000
    phases = f"failover/reint {fmt(rec.failover_gap_ms)}/{fmt(rec.reintegration_gap_ms)}"
    return (
        f"{head} gap {rec.gap_ms:4.0f} ms{at:<11} ({phases})  failover {fmt(failover):>4} ms  "
        f"reint {fmt(reint):>6} ms (wall {fmt(wall)} s)  "
        f"ok {rec.ok} failed {rec.failed} corrupted {rec.corrupted}"
        + (f" resets {rec.resets}" if rec.resets else "")
        + (f" conn-errors {rec.connection_errors}" if rec.connection_errors else "")
        + f"  noise {fmt(rec.noise_pct)}%"
        + ("" if rec.crashed else "  NO CRASH")
        + ("  UNPLANNED FAILOVER" if rec.unplanned else "")
    )


def print_details(rec: CycleRecord) -> None:
    if rec.troubled:
        print("   times: " + ", ".join(f"{k} {v}" for k, v in rec.events.items()))
    reint = rec.reintegration or {}
    if reint.get("total_ms", 0) > SLOW_REINTEGRATION_MS:
        phases = reint.get("phases_ms", {})
        print("   slow re-integration: " + ", ".join(f"{k} {fmt(v)} ms" for k, v in phases.items()))
    for line in rec.unplanned:
        print(f"   !!! UNPLANNED {line}")
    for line in rec.problems:
        print(f"   !!! PROBLEM {line}")
    if rec.aborted:
        print(f"   !!! ABORTED {rec.aborted}")
    for line in rec.warnings:
        print(f"   (warning: {line})")
    for name, lines in rec.logs.items():
        print(f"   --- {name} (last {len(lines)} lines)")
        for line in lines:
            print(f"   | {line}")


def campaign(args: argparse.Namespace, records: list[CycleRecord]) -> None:
    """Run the cycles into RECORDS (filled as they complete, so an interrupted
    campaign still has its summary); the lab is removed at the end in any case."""
    rng = random.Random(args.seed)
    lab = Lab.up(fresh_name("cp"), clients=len(CLIENTS))
    try:
        print(f"lab {lab.name}: starting the pair", flush=True)
        pair = agents.start(lab)
        inodes = set(bench.lab_netns(lab))
        primary = "primary"
        for n in range(1, args.cycles + 1):
            victim = rng.choice(HOSTS)
            kind = rng.choice(args.kinds)
            seeds = [rng.randrange(2**31) for _ in CLIENTS]
            role = "primary" if victim == primary else "backup"
            rec = CycleRecord(n, victim, role, kind, seeds)
            try:
                run_cycle(pair, rec, primary, args, inodes)
            except OSError as e:  # an agent did not answer before the load began
                rec.aborted = f"before the load: {e}"
            if not rec.aborted:
                try:
                    primary = settle(pair, rec)
                except (LabError, OSError) as e:
                    rec.aborted = f"after the cycle: {e}"
                else:
                    if rec.crashed and not rec.unplanned and primary != peer_of(victim):
                        rec.problems.append(f"{primary} is the primary now, not the survivor")
            if rec.troubled:
                rec.logs = {
                    str(p.relative_to(lab.dir)): tail(p, LOG_LINES_SHOWN) for p in log_files(lab)
                }
            records.append(rec)
            print(cycle_line(rec, args.cycles), flush=True)
            print_details(rec)
            if rec.aborted:
                break
    finally:
        lab.down()


# ---- the summary ---------------------------------------------------------------

FAILOVER_ROWS = (
    ("detection", "failover: detection (last ack -> loss noticed)"),
    ("grant", "  witness grant"),
    ("fencing_wait", "  fencing wait (noticed -> victim's lease over)"),
    ("data_plane", "  data plane (mode switch)"),
    ("identity", "  identity (VIP onto the LAN interface)"),
    ("total", "  total (last ack -> serving alone)"),
    ("confirmed", "  VIP move confirmed (noticed -> ping back)"),
    ("crash_to_simplex", "  crash -> simplex, seen from outside"),
)
REINTEGRATION_ROWS = (
    ("reconfigure", "re-integration: reconfigure (survivor)"),
    ("peer_backup", "  returning host becomes backup"),
    ("duplex", "  duplex (settings check, mode switch)"),
    ("total", "  total (join accepted -> duplex)"),
    ("wall", "  wall: heal/restart -> both duplex"),
)


def failover_figures(rec: CycleRecord) -> dict[str, float | None]:
    f = rec.failover or {}
    ph = f.get("phases_ms", {})
    return {
        **{k: ph.get(k) for k in ("detection", "fencing_wait", "data_plane", "identity")},
        "grant": f.get("grant_ms"),
        "total": f.get("total_ms"),
        "confirmed": f.get("confirmed_ms"),
        "crash_to_simplex": None
        if rec.crash_to_simplex_s is None
        else rec.crash_to_simplex_s * 1000,
    }


def reintegration_figures(rec: CycleRecord) -> dict[str, float | None]:
    r = rec.reintegration or {}
    ph = r.get("phases_ms", {})
    return {
        **{k: ph.get(k) for k in ("reconfigure", "peer_backup", "duplex")},
        "total": r.get("total_ms"),
        "wall": rec.reintegrate_wall_ms,
    }


def gap_row(label: str, recs: Sequence[CycleRecord], key: str = "gap_ms") -> list[str]:
    gaps = [g for r in recs if (g := getattr(r, key)) is not None]
    if not gaps:
        return [label, "0", *["-"] * (2 + len(PERCENTILES))]
    cells = [fmt(percentile(gaps, p)) for p in PERCENTILES]
    return [label, str(len(gaps)), fmt(min(gaps)), *cells, fmt(max(gaps))]


def print_summary(records: Sequence[CycleRecord], args: argparse.Namespace) -> None:
    done = [r for r in records if r.gap_ms is not None]
    totals = {
        k: sum(getattr(r, k) for r in records)
        for k in ("ok", "failed", "corrupted", "resets", "connection_errors")
    }
    print(f"\nOutcome: {len(done)} of {args.cycles} cycles measured (seed {args.seed})")
    print("  " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in totals.items()))
    crashes = sum(r.crashed for r in records)
    unplanned = sum(len(r.unplanned) for r in records)
    print(
        f"  crashes {crashes}, unplanned failovers {unplanned} (the pair leaving duplex by itself)"
    )

    print("\nClient-visible gap per cycle, ms (longest time without a completed request,")
    print("the worse of the two clients, over the failover and the re-integration;")
    print("nearest-rank percentiles)")
    rows = [gap_row("all", done)]
    clean = [r for r in done if not r.troubled]
    if len(clean) < len(done):
        rows.append(gap_row("all untroubled", clean))
    rows += [gap_row(f"kind {k}", [r for r in done if r.kind == k]) for k in args.kinds]
    rows += [gap_row(f"victim {h}", [r for r in done if r.victim == h]) for h in HOSTS]
    rows += [
        gap_row(f"victim role {role}", [r for r in done if r.victim_role == role]) for role in HOSTS
    ]
    header = ["cycles", "n", "min", "p50", "p90", "p99", "max"]
    bench.print_table(header, rows)

    print("\nThe same by phase: the longest gap that began before the survivor served alone")
    print("(the failover), and after (the victim's return and the rest of the load run)")
    rows = []
    for key, phase in (("failover_gap_ms", "failover"), ("reintegration_gap_ms", "return")):
        rows.append(gap_row(f"{phase}: all", done, key))
        rows += [gap_row(f"{phase}: kind {k}", [r for r in done if r.kind == k], key)
                 for k in args.kinds]  # fmt: skip
        rows += [
            gap_row(f"{phase}: {role} dies", [r for r in done if r.victim_role == role], key)
            for role in HOSTS
        ]
    bench.print_table(header, rows)

    groups: list[tuple[str, list[CycleRecord]]] = [("all", done)]
    groups += [(k, [r for r in done if r.kind == k]) for k in args.kinds]
    groups += [(f"{role} dies", [r for r in done if r.victim_role == role]) for role in HOSTS]
    print("\nMedian failover (the survivor's agent) and re-integration breakdown, ms")
    table = []
    for figures, spec in (
        (failover_figures, FAILOVER_ROWS),
        (reintegration_figures, REINTEGRATION_ROWS),
    ):
        for key, label in spec:
            table.append([label, *(fmt(median_of(figures(r)[key] for r in g)) for _, g in groups)])
    bench.print_table(["phase", *(name for name, _ in groups)], table)

    replicated = [r.replicated_after_s for r in done if r.replicated_after_s is not None]
    left = [r.load_after_reintegration_s for r in done if r.load_after_reintegration_s is not None]
    if replicated and left:
        print(
            f"\nLoad start -> its {REPLICATED} connections replicated: median "
            f"{statistics.median(replicated):.2f} s, max {max(replicated):.2f} s; load left once "
            f"duplex again: median {statistics.median(left):.1f} s, min {min(left):.1f} s"
        )
    noise = [r.noise_pct for r in done if r.noise_pct is not None]
    if noise:
        print(
            f"Noise (steal + CPU of processes outside the lab, % of the machine) per cycle: "
            f"median {statistics.median(noise):.0f}, max {max(noise):.0f}"
        )
    entries = [r.conns_entries for r in done if r.conns_entries is not None]
    if entries:
        print(f"Primary's connection table at cycle start: {entries[0]} -> {entries[-1]} entries")


def plot(plt: Any, result: dict[str, Any]) -> None:
    """Histogram of the per-cycle gap, crash kinds stacked; the gap per cycle."""
    cycles = [c for c in result["cycles"] if c["gap_ms"] is not None]
    kinds = result["args"]["kinds"]
    _, (hist, seq) = plt.subplots(1, 2, figsize=(11, 3.8))
    hist.hist(
        [[c["gap_ms"] for c in cycles if c["kind"] == k] for k in kinds],
        bins=25,
        stacked=True,
        label=kinds,
    )
    hist.set_title(f"client-visible gap per cycle ({len(cycles)} cycles)", fontsize=9)
    hist.set_xlabel("ms")
    hist.set_ylabel("cycles")
    hist.legend(fontsize=8)
    for k in kinds:
        mine = [c for c in cycles if c["kind"] == k]
        seq.scatter([c["n"] for c in mine], [c["gap_ms"] for c in mine], s=10, label=k)
    seq.set_title("gap by cycle", fontsize=9)
    seq.set_xlabel("cycle")
    seq.set_ylabel("ms")
    seq.legend(fontsize=8)


# ---- the script ----------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=100, help="crash + re-integration cycles (100)")
    p.add_argument("--seed", type=int, help="random seed for victims, kinds and loads (random)")
    p.add_argument(
        "--kinds",
        type=csv_of(CRASH_MODES),
        default=list(CRASH_MODES),
        help=f"crash kinds to pick from, comma-separated ({','.join(CRASH_MODES)})",
    )
    p.add_argument(
        "--load-seconds",
        type=float,
        default=10.0,
        help="length of each cycle's `coral load` run (10); it must outlast the "
        "replication wait, the failover and the re-integration",
    )
    p.add_argument("--save", action="store_true", help="write JSON (and PNG) to bench/results/")
    args = p.parse_args()
    if args.cycles < 1:
        p.error("--cycles must be at least 1")
    if args.load_seconds <= 0:
        p.error("--load-seconds must be positive")
    if args.seed is None:
        args.seed = random.randrange(2**32)
    if bench.needs_root("campaign", "namespaces, tc, bpffs"):
        return 2
    started = bench.now()
    t0 = time.monotonic()
    print(
        f"campaign: {args.cycles} cycles, kinds {','.join(args.kinds)}, "
        f"load {args.load_seconds:g} s per cycle, seed {args.seed}",
        flush=True,
    )
    records: list[CycleRecord] = []
    error = None
    try:
        campaign(args, records)
    except LabError as e:  # the lab or the pair did not come up
        error = str(e)
        print(f"!!! {error}")
    print_summary(records, args)
    bad = [r for r in records if r.bad]
    problems = [f"cycle {r.n} ({r.victim} {r.kind}): {p}" for r in records for p in r.problems]
    unplanned = [f"cycle {r.n}: {u}" for r in records for u in r.unplanned]
    aborted = [f"cycle {r.n} ({r.victim} {r.kind}): {r.aborted}" for r in records if r.aborted]
    if error:
        aborted.append(error)
    for line in problems:
        print(f"PROBLEM {line}")
    for line in unplanned:
        print(f"UNPLANNED {line}")
    for line in aborted:
        print(f"ABORTED {line}")
    failed = bool(bad or problems or unplanned or aborted or len(records) < args.cycles)
    elapsed = time.monotonic() - t0
    verdict = "FAILED" if failed else "passed"
    print(
        f"\ncampaign {verdict}: {len(bad)} of {len(records)} cycles with failed, corrupted or "
        f"reset requests; {sum(bool(r.unplanned) for r in records)} with an unplanned failover; "
        f"{len(records)} of {args.cycles} cycles run"
    )
    print(bench.footer(elapsed))
    if args.save:
        result = {
            "started": started,
            "seconds": elapsed,
            "machine": bench.machine(),
            "args": vars(args),
            "cycles": [asdict(r) for r in records],
            "passed": not failed,
        }
        print(f"saved {bench.save(result, RESULTS, 'campaign', plot)}")
    return 1 if failed else 0


if __name__ == "__main__":
    bench.run_script("campaign", main)
