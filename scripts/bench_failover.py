#!/usr/bin/env python3
"""Failover as clients see it: the gap each crash leaves, and what the survivor spent it on.

Each failover gets a fresh lab and a fresh pair (`coral.lab.agents`: a node
agent and its proxy on primary and backup, the witness on the router), since
a failed host is not re-integrated yet. Per failover:

1. `coral load` on both clients (4 connections each, every reply verified)
   against the VIP, for --load-seconds;
2. once the primary's data plane holds all 8 connections replicated (its
   agent's status is polled), the victim is crashed: kill (SIGKILL to every
   process of the host), link (its links unplugged) or freeze (SIGSTOP);
3. the survivor is left alone while it fails over (a status request runs on
   the agent's event loop, so it is not polled then); when the load ends its
   status is read once: `last_failover` holds the agent's own breakdown.

Before each failover the script waits (--quiet, --quiet-timeout) until other
work leaves the machine mostly idle: on 2 shared vCPUs someone else's
saturating load starves the heartbeats themselves, and that is a different
experiment.

Recorded per failover:

- the client-visible gap: the longest time in which a client completed no
  request, among the gaps that contain the crash, the worse of the two
  clients. Computed from each client's records (`coral load --records`) up to
  the end of its sending window: the report's own longest_gap_ms also counts
  the drain after the window, where one slow last request reads as a gap, and
  the longest gap of a run can be a stall long after the failover (both are
  printed too). The crash is placed on the client's clock by the moment its
  report appears (its run's end), to ~10 ms on an idle machine;
- when service was back: the end of that gap, or of a pause over 50 ms that
  follows it after at most one completion per connection (replies the
  survivor held come out when it goes simplex, and the requests that follow
  them can still be lost and wait for TCP's loss probe);
- the load's failed, corrupted, reset and connection-error counts (all must be
  0; anything else is a PROBLEM, printed with the agents' and proxies' log
  tails, and makes the exit status 1);
- the survivor's phases (below), and the crash-to-simplex time seen from
  outside (from the start of the crash call for kill and freeze, which signal
  first and then wait for the processes to end, from its end for link, which
  cuts the second heartbeat path last; to the survivor's entry into simplex,
  from its state's age);
- the kernel TCP counters of the clients and the survivor over the run
  (retransmission timeouts, tail-loss probes, retransmitted segments), and
  the machine's noise (steal plus CPU of processes outside the lab) before
  (the quiet check) and during the run.

A pair that fails over by itself before the crash (a stall of the whole
machine longer than the lease) or a crash that fails is done again on a new
lab, up to 3 times, and listed. Load that never shows up as replicated is a
PROBLEM, with what `ss` and the agents saw.

Phases (coral/agent/agent.py, Agent._take_over):
detection = the last heartbeat acknowledging the survivor's epoch -> the
loss noticed (one lease, up to one interval more); fencing wait = noticed ->
the victim's lease certainly over, which includes the witness's grant (asked
first, then the rest of the lease waited out); data plane = the mode switch
(one map write per service); identity = the VIP moved onto the LAN
interface (a surviving primary only: the backup owns the VIP already);
confirmation = noticed -> an outside host answers through the router from the
VIP (gratuitous ARP done; a surviving primary only). "detection to simplex" =
fencing wait + data plane: from noticing the loss to serving alone, ARP
excluded; "without the grant" subtracts the witness's reply time.

Failovers run in rotation (repeat, setting, victim, kind) so that a slow
stretch of the shared machine spreads over all cells. Run as root with the
project's venv: .venv/bin/python scripts/bench_failover.py (docs/performance.md,
"Failover", has figures). Prints tables; --save also writes JSON (and a PNG
histogram when matplotlib is installed) under bench/results/.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import select
import shutil
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coral import netns
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
"""Connections the primary must hold replicated before the crash: all of them."""
DEFAULT_SETTINGS = "20x3,100x2"
"""Heartbeat interval (ms) x misses; the lease is their product."""
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
REPLICATE_TIMEOUT_S = 15.0
SETTLE_TIMEOUT_S = 10.0
"""After the load: how long the survivor may still take to report its failover."""
RESULT_SLACK_S = 30.0
"""A load run's report is due this long after its --duration."""
MIN_LOAD_AFTER_S = 1.5
"""Load time at least left after the crash, so the gap ends inside the run."""
QUIET_WINDOW_S = 1.0
OUTAGE_GAP_S = 0.05
"""A pause this long right after the failover's gap extends the outage (gap_around);
completions come every few ms otherwise."""
GAP_SLACK_MS = 250.0
"""How long after the crash a client's gap may seem to start and still be the
failover's: the crash is placed on the client's clock only roughly (gap_around)."""
POLL_S = 0.02
MAX_ATTEMPTS = 3
"""Labs built for one failover at most while its pair fails over before the crash
(both agents missed a lease of heartbeats: the machine stalled), or the crash fails."""
LOG_LINES_SHOWN = 25
TARGET_SERVING_MS = 5.0
"""Detection to simplex (ARP excluded), median over all failovers of a setting."""
TARGET_GAP = ("20x3", "primary", 99, 150.0)
"""(setting, victim, percentile, bound ms): the client-visible gap."""
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Cell:
    setting: str
    victim: str
    kind: str

    @property
    def label(self) -> str:
        return f"{self.setting} {self.victim} {self.kind}"


def parse_setting(text: str) -> tuple[int, int]:
    """Parse a heartbeat setting: "20x3" is (interval_ms=20, misses=3)."""
    interval, sep, misses = text.partition("x")
    if not sep or not interval.isdigit() or not misses.isdigit():
        raise argparse.ArgumentTypeError(f"bad setting {text!r}: use INTERVAL_MSxMISSES, e.g. 20x3")
    return int(interval), int(misses)


def csv_of(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)}")
        return items

    return parse


def settings_list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    for item in items:
        parse_setting(item)
    if not items:
        raise argparse.ArgumentTypeError("no setting given")
    return items


# ---- one failover ------------------------------------------------------------


def records_path(lab: Lab, client: str) -> Path:
    return lab.dir / client / "load-records.jsonl"


def start_load(lab: Lab, seconds: float) -> list[ToolRun]:
    runs = []
    for c in CLIENTS:
        records = records_path(lab, c)
        records.parent.mkdir(parents=True, exist_ok=True)
        args = ["--duration", str(seconds), "--connections", str(CONNECTIONS)]
        runs.append(lab.start_tool(c, "load", URL, *args, "--records", str(records)))
    return runs


def completions(path: Path, until: float) -> list[float]:
    """When the client's requests completed (s, on its clock), from its records file
    PATH, up to UNTIL: the end of its sending window. `coral load`'s own
    longest_gap_ms also counts the drain after the window, when the last requests
    complete while no new ones are sent: one slow request there reads as a gap."""
    return sorted(
        r["end"]
        for line in path.read_text().splitlines()
        if (r := json.loads(line))["outcome"] == "ok" and r["end"] <= until
    )


def longest_gap(
    ends: Sequence[float], keep: Callable[[float, float], bool] = lambda a, b: True
) -> tuple[float, float] | None:
    """(length, start) in s of the longest time between consecutive ENDS among those
    KEEP(start, end) accepts; None if it accepts none."""
    gaps = [(b - a, a) for a, b in itertools.pairwise(ends) if keep(a, b)]
    return max(gaps) if gaps else None


class Dissolved(Exception):
    """The pair failed over before the crash: a stall longer than the lease."""


def wait_replicated(pair: LabPair, count: int, timeout: float) -> None:
    """Poll the primary until its data plane holds COUNT connections in duplex;
    Dissolved if the pair stopped being one meanwhile."""
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        status = pair.status("primary")
        if status["state"] != "duplex":
            last = status["transitions"][-1] if status["transitions"] else {}
            raise Dissolved(f"primary went {status['state']} before the crash: {last.get('why')}")
        seen = status["services"][0]["connections"]["duplex"]
        if seen >= count:
            return
        time.sleep(POLL_S)
    raise LabError(f"{seen} of {count} connections replicated after {timeout} s")


def settled(pair: LabPair, survivor: str, timeout: float) -> tuple[dict[str, Any], float]:
    """The survivor's status once its failover is recorded in full (a surviving
    primary: also confirmed), or once it left simplex for good, or at TIMEOUT; with
    the monotonic time the request was sent."""
    deadline = time.monotonic() + timeout
    while True:
        asked = time.monotonic()
        status = pair.status(survivor)
        failover = status["last_failover"]
        done = failover is not None and (survivor != "primary" or "confirmed_ms" in failover)
        if done or status["state"] in ("fenced", "failed", "stopped"):
            return status, asked
        if asked > deadline:
            return status, asked
        time.sleep(POLL_S)


def load_problems(client: str, report: Mapping[str, Any]) -> list[str]:
    counts = report["counts"]
    out = [f"{client}: {counts[k]} {k}" for k in ("failed", "corrupted") if counts.get(k)]
    out += [f"{client}: {report[k]} {k}" for k in ("resets", "connection_errors") if report[k]]
    if not counts.get("ok"):
        out.append(f"{client}: no request succeeded")
    out += [
        f"{client}:   {p['outcome']} {p['target']} at {p['time']:.3f} s: {p['detail']}"
        for p in report.get("problems", [])[:5]
    ]
    return out


def diagnose(pair: LabPair) -> dict[str, list[str]]:
    """What the hosts see when the load's connections do not show up as replicated:
    the TCP connections to the service on every host, the pair's service state."""
    out: dict[str, list[str]] = {}
    for host in (*CLIENTS, *HOSTS):
        argv = ["ss", "-Htn", "state", "all", "( sport = :80 or dport = :80 )"]
        ss = pair.lab.run(host, argv, check=False)
        out[f"{host} ss"] = (ss.stdout + ss.stderr).splitlines()[:12]
    for host in HOSTS:
        try:
            st = pair.status(host)
        except OSError as e:
            out[f"{host} status"] = [f"no answer: {e}"]
            continue
        out[f"{host} status"] = [
            json.dumps({k: st[k] for k in ("state", "epoch", "services", "heartbeats")})
        ]
    return out


def log_files(lab: Lab) -> list[Path]:
    """The agents', proxies' and witness's logs of LAB."""
    files = [p for h in HOSTS for p in sorted((lab.dir / h / "agent").glob("*.log"))]
    return [*files, lab.dir / "router" / "witness.log"]


def tail(path: Path, lines: int) -> list[str]:
    if not path.exists():
        return ["(no log)"]
    return path.read_text(errors="replace").splitlines()[-lines:]


def wait_quiet(max_pct: float, timeout: float) -> tuple[float, float]:
    """Sample the machine in QUIET_WINDOW_S windows until one is quieter than MAX_PCT
    (steal plus the CPU of every other process, in % of the machine), or TIMEOUT s
    passed: (the last window's figure, seconds waited). Heartbeats starved by someone
    else's saturating load are a different measurement from a failover."""
    began = time.monotonic()
    while True:
        before, t0 = bench.noise_sample(set()), time.monotonic()
        time.sleep(QUIET_WINDOW_S)  # the sampling window
        pct = bench.noise_pct(before, bench.noise_sample(set()), time.monotonic() - t0)
        waited = time.monotonic() - began
        if pct <= max_pct or waited >= timeout:
            return pct, waited


def one_failover(cell: Cell, args: argparse.Namespace) -> dict[str, Any]:
    """Build a lab and pair, crash CELL's victim under load, remove the lab; the record."""
    rec: dict[str, Any] = {
        "setting": cell.setting,
        "victim": cell.victim,
        "kind": cell.kind,
        "problems": [],
        "warnings": [],
    }
    quiet, waited = wait_quiet(args.quiet, args.quiet_timeout)
    rec["quiet_pct"], rec["quiet_wait_s"] = quiet, waited
    if quiet > args.quiet:
        rec["warnings"].append(
            f"the machine stayed busy ({quiet:.0f}% of it used by others) for "
            f"{args.quiet_timeout:g} s: measured anyway"
        )
    lab = Lab.up(fresh_name("bf"), clients=len(CLIENTS))
    rec["lab"] = lab.name
    try:
        try:
            interval_ms, misses = parse_setting(cell.setting)
            pair = agents.start(lab, interval_ms=interval_ms, misses=misses)
            measure(pair, cell, args, rec)
        except LabError as e:
            rec["problems"].append(f"not measured: {e}")
        except Dissolved as e:
            rec["redo"] = f"the pair dissolved before the crash: {e}"
        except netns.CommandError as e:  # the lab's crash itself failed
            rec["redo"] = f"the crash failed: {e}"
        if rec["problems"] or "redo" in rec:
            rec["logs"] = {
                str(p.relative_to(lab.dir)): tail(p, LOG_LINES_SHOWN) for p in log_files(lab)
            }
            if args.keep_logs is not None:
                keep = args.keep_logs / lab.name
                for p in log_files(lab):
                    if p.exists():
                        dest = keep / p.relative_to(lab.dir)
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(p, dest)
                rec["kept_logs"] = str(keep)
    finally:
        lab.down()
    return rec


def reports_with_end(
    runs: Sequence[ToolRun], timeout: float
) -> dict[str, tuple[dict[str, Any], float]]:
    """Each client's load report with the monotonic time its output appeared: the
    client writes it when its run is over, so that is the run's end on its own clock
    (plus the report's formatting and the interpreter's start of exit). A thread per
    client waits for the pipe to become readable, then for the report."""

    def wait(run: ToolRun) -> tuple[dict[str, Any], float]:
        assert run.proc.stdout is not None
        select.select([run.proc.stdout], [], [], timeout)
        appeared = time.monotonic()
        return run.result(timeout), appeared

    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
        futures = {r.host: pool.submit(wait, r) for r in runs}
        return {host: f.result() for host, f in futures.items()}


def measure(pair: LabPair, cell: Cell, args: argparse.Namespace, rec: dict[str, Any]) -> None:
    lab, survivor = pair.lab, peer_of(cell.victim)
    inodes = bench.lab_netns(lab)
    noise0 = bench.noise_sample(inodes)
    spawned = time.monotonic()
    runs = start_load(lab, args.load_seconds)
    try:
        try:
            wait_replicated(pair, REPLICATED, REPLICATE_TIMEOUT_S)
        except LabError:
            rec["diagnostics"] = diagnose(pair)
            raise
        watched = (*CLIENTS, survivor)
        tcp0 = {h: bench.kernel_tcp(lab, h) for h in watched}
        before = time.monotonic()
        lab.crash(cell.victim, cell.kind)
        crashed = time.monotonic()
        ended = reports_with_end(runs, args.load_seconds + RESULT_SLACK_S)
    finally:
        for r in runs:
            if r.proc.poll() is None:  # the measurement failed: what did the client say?
                r.proc.kill()
                _, err = r.proc.communicate()
                rec["warnings"] += [f"{r.host} load: {line}" for line in err.splitlines()[-5:]]
    rec["tcp"] = {h: bench.delta(bench.kernel_tcp(lab, h), tcp0[h]) for h in watched}
    rec["noise_pct"] = bench.noise_pct(
        noise0, bench.noise_sample(inodes), time.monotonic() - spawned
    )
    # kill and freeze signal the host's processes first, then wait for them to end;
    # link cuts the second heartbeat path only at the end of the call
    hit = crashed if cell.kind == "link" else before
    rec["crash_call_ms"] = (crashed - before) * 1000
    rec["replicated_after_s"] = before - spawned
    reports = {c: report for c, (report, _) in ended.items()}
    rec["load"] = reports
    slack = GAP_SLACK_MS / 1000 + (0 if cell.kind == "link" else crashed - before)
    rec["gaps"] = {
        c: gap_around(
            report, completions(records_path(lab, c), args.load_seconds), end_at, hit, slack
        )
        for c, (report, end_at) in ended.items()
    }
    gaps = rec["gaps"].values()
    rec["gap_ms"] = max((g["ms"] for g in gaps if g["ms"] is not None), default=None)
    rec["back_ms"] = max((g["back_ms"] for g in gaps if g["back_ms"] is not None), default=None)
    rec["window_gap_ms"] = max(g["window_ms"] for g in gaps)
    rec["report_gap_ms"] = max(r["longest_gap_ms"] for r in reports.values())
    for k in ("failed", "corrupted"):
        rec[k] = sum(r["counts"].get(k, 0) for r in reports.values())
    for k in ("resets", "connection_errors"):
        rec[k] = sum(r[k] for r in reports.values())
    rec["ok"] = sum(r["counts"].get("ok", 0) for r in reports.values())
    for client, report in reports.items():
        rec["problems"] += load_problems(client, report)
    for client, g in rec["gaps"].items():
        if g["after_crash_s"] < MIN_LOAD_AFTER_S:
            rec["warnings"].append(
                f"{client}: its load ended {g['after_crash_s']:.1f} s after the crash: "
                "the gap may be cut short (raise --load-seconds)"
            )
        if g["ms"] is None:
            rec["warnings"].append(f"{client}: no completions on both sides of the crash")

    try:
        status, asked = settled(pair, survivor, SETTLE_TIMEOUT_S)
    except OSError as e:  # its agent exited (a component of the survivor died)
        rec["problems"].append(f"survivor {survivor}'s agent does not answer: {e}")
        return
    rec["survivor_state"] = status["state"]
    rec["transitions"] = status["transitions"]
    failover = status["last_failover"]
    rec["failover"] = failover
    if status["state"] != "simplex":
        why = status["transitions"][-1]["why"] if status["transitions"] else "?"
        rec["problems"].append(f"survivor {survivor} is {status['state']}: {why}")
    else:
        rec["crash_to_simplex_ms"] = (asked - status["since_s"] - hit) * 1000
    if failover is None:
        rec["problems"].append(f"survivor {survivor} recorded no failover")
    elif survivor == "primary" and "confirmed_ms" not in failover:
        rec["problems"].append(f"the VIP move was not confirmed within {SETTLE_TIMEOUT_S} s")
    if cell.kind == "link":  # alive but cut off: it must have fenced itself
        try:
            rec["victim_state"] = pair.status(cell.victim)["state"]
        except OSError as e:
            rec["victim_state"] = f"no answer: {e}"
        if rec["victim_state"] != "fenced":
            rec["problems"].append(f"cut-off victim {cell.victim} is {rec['victim_state']}")


def gap_around(
    report: Mapping[str, Any], ends: Sequence[float], end_at: float, hit: float, slack: float
) -> dict[str, Any]:
    """The client's gaps in ms, and where they lie relative to the crash (HIT): the
    failover's (the longest that contains the crash: it starts at most SLACK s after
    it, ends after it), when service was back, and the longest gap of the whole
    sending window, wherever it is.

    Service is back at the end of the failover's gap, or of a later gap over
    OUTAGE_GAP_S that follows it with at most one completion per connection in
    between: replies the survivor held complete when it goes simplex, and the
    requests that follow them can still be lost (to the dead backup's MAC, before
    the router heard the gratuitous ARP) and wait for TCP's loss probe.

    The client's clock starts at END_AT - its run's duration: later than its true
    start by the time from its run's end to its report on the pipe (milliseconds on
    an idle machine, more on a busy one), so the crash reads early on it by that, and
    the offsets high; SLACK allows for it."""
    t0 = end_at - report["duration_s"]
    crash = hit - t0
    own = longest_gap(ends, lambda a, b: a <= crash + slack and b >= crash)
    anywhere = longest_gap(ends) or (0.0, 0.0)
    back = None
    if own is not None:
        j = ends.index(own[1]) + 1  # ends[j]: the first completion after the gap
        k = j + 1
        while k < len(ends) and k <= j + CONNECTIONS:
            if ends[k] - ends[k - 1] > OUTAGE_GAP_S:
                j = k
            k += 1
        back = ends[j]
    return {
        "ms": None if own is None else own[0] * 1000,
        "start_ms": None if own is None else (own[1] - crash) * 1000,
        "end_ms": None if own is None else (own[1] + own[0] - crash) * 1000,
        "back_ms": None if back is None else (back - crash) * 1000,
        "window_ms": anywhere[0] * 1000,
        "window_start_ms": (anywhere[1] - crash) * 1000,
        "report_ms": report["longest_gap_ms"],
        "after_crash_s": report["duration_s"] - crash,
    }


# ---- figures -----------------------------------------------------------------


def phases(rec: Mapping[str, Any]) -> dict[str, float | None]:
    """The failover's figures in ms, derived ones included (None: not applicable)."""
    f = rec.get("failover")
    if not f:
        return {}
    ph = f["phases_ms"]
    serving = ph["fencing_wait"] + ph["data_plane"]
    return {
        "detection": ph["detection"],
        "grant": f["grant_ms"],
        "fencing_wait": ph["fencing_wait"],
        "data_plane": ph["data_plane"],
        "serving": serving,
        "serving_no_grant": serving - f["grant_ms"],
        "identity": ph["identity"],
        "confirmed": f.get("confirmed_ms"),
        "total": f["total_ms"],
        "crash_to_simplex": rec.get("crash_to_simplex_ms"),
        "gap": rec.get("gap_ms"),
        "back": rec.get("back_ms"),
        "client_rtos": rtos(rec, CLIENTS) if "tcp" in rec else None,
        "survivor_rtos": rtos(rec, [peer_of(rec["victim"])]) if "tcp" in rec else None,
    }


BREAKDOWN = (
    ("detection", "detection: last ack -> loss noticed"),
    ("grant", "  witness grant (inside the fencing wait)"),
    ("fencing_wait", "fencing wait: noticed -> victim's lease over"),
    ("data_plane", "data plane: mode switch"),
    ("serving", "detection -> simplex (fencing wait + data plane)"),
    ("serving_no_grant", "  the same without the witness grant"),
    ("identity", "identity: VIP onto the LAN interface"),
    ("confirmed", "detection -> VIP move confirmed (ARP + ping)"),
    ("total", "agent total: last ack -> identity done"),
    ("crash_to_simplex", "crash -> simplex, seen from outside"),
    ("gap", "client-visible gap"),
    ("back", "crash -> service back"),
    ("client_rtos", "retransmission timeouts, both clients (count)"),
    ("survivor_rtos", "retransmission timeouts, survivor (count)"),
)


def gap_row(label: str, recs: Sequence[Mapping[str, Any]], key: str = "gap_ms") -> list[str]:
    gaps = [r[key] for r in recs if r.get(key) is not None]
    if not gaps:
        return [label, "0", *["-"] * (2 + len(PERCENTILES))]
    cells = [fmt(percentile(gaps, p)) for p in PERCENTILES]
    return [label, str(len(gaps)), fmt(min(gaps)), *cells, fmt(max(gaps))]


def print_results(records: Sequence[Mapping[str, Any]], args: argparse.Namespace) -> list[str]:
    """Print the tables; return the target verdicts' lines."""
    done = [r for r in records if r.get("gap_ms") is not None]

    def pick(setting: str, victim: str | None = None, kind: str | None = None) -> list[Any]:
        return [
            r
            for r in done
            if r["setting"] == setting
            and (victim is None or r["victim"] == victim)
            and (kind is None or r["kind"] == kind)
        ]

    print("\nClient-visible gap per failover, ms: the longest time without a completed")
    print("request that contains the crash, the worse of the two clients (nearest-rank)")
    rows = []
    for s in args.settings:
        for v in args.victims:
            for k in args.kinds:
                rows.append(gap_row(f"{s} victim {v} {k}", pick(s, v, k)))
            rows.append(gap_row(f"{s} victim {v} all kinds", pick(s, v)))
        rows.append(gap_row(f"{s} all", pick(s)))
    gap_header = ["setting, victim, crash", "n", "min", "p50", "p90", "p99", "max"]
    bench.print_table(gap_header, rows)

    print("\nCrash -> service back, ms: the end of the failover's gap, or of a pause over 50 ms")
    print("that follows it after at most one completion per connection (replies the survivor")
    print("held, released when it goes simplex); the later of the two clients, placed on")
    print("their clocks to ~10 ms on an idle machine")
    rows = []
    for s in args.settings:
        for v in args.victims:
            for k in args.kinds:
                rows.append(gap_row(f"{s} victim {v} {k}", pick(s, v, k), "back_ms"))
            rows.append(gap_row(f"{s} victim {v} all kinds", pick(s, v), "back_ms"))
    bench.print_table(gap_header, rows)

    print("\nThe longest gap anywhere in the run's sending window, ms (an upper bound: it")
    print("includes stalls after the failover, such as one slow request in simplex)")
    rows = [
        gap_row(f"{s} victim {v}", pick(s, v), "window_gap_ms")
        for s in args.settings
        for v in args.victims
    ]
    bench.print_table(gap_header, rows)
    elsewhere = [r for r in done if r["window_gap_ms"] > r["gap_ms"]]
    if elsewhere:
        print(
            f"{len(elsewhere)} of {len(done)} runs had a longer stall elsewhere than at the "
            f"crash (up to {max(r['window_gap_ms'] for r in elsewhere):.0f} ms)"
        )

    print("\nMedian failover breakdown, ms (the survivor's agent; cf. CoRAL Table 4.4),")
    print("and the kernels' retransmission timeouts during the failover")
    cols = [(s, v) for s in args.settings for v in args.victims]
    header = ["phase", *(f"{s} {v} dies" for s, v in cols)]
    table = []
    for key, label in BREAKDOWN:
        row = [label]
        for s, v in cols:
            m = median_of(phases(r).get(key) for r in pick(s, v))
            row.append(f"{m:g}" if key.endswith("_rtos") and m is not None else fmt(m))
        table.append(row)
    bench.print_table(header, table)

    print("\nBy crash kind (median ms: detection / detection->simplex / gap)")
    kind_rows = []
    for s, v in cols:
        row = [f"{s} {v} dies"]
        for k in args.kinds:
            ph = [phases(r) for r in pick(s, v, k)]
            row.append(
                " / ".join(
                    fmt(median_of(p.get(x) for p in ph)) for x in ("detection", "serving", "gap")
                )
            )
        kind_rows.append(row)
    bench.print_table(["", *args.kinds], kind_rows)

    verdicts = []
    for s in args.settings:
        ph = [phases(r) for r in pick(s)]
        for key, what in (("serving", ""), ("serving_no_grant", " without the grant")):
            vals = [v for p in ph if (v := p.get(key)) is not None]
            if not vals:
                continue
            med = statistics.median(vals)
            within = sum(v <= TARGET_SERVING_MS for v in vals)
            verdict = "met" if med <= TARGET_SERVING_MS else "MISSED"
            verdicts.append(
                f"{s}: detection -> simplex{what} <= {TARGET_SERVING_MS:g} ms (ARP excluded): "
                f"median {med:.2f}, p90 {fmt(percentile(vals, 90))}, max {max(vals):.2f}; "
                f"{within}/{len(vals)} within: {verdict}"
            )
    setting, victim, pct, bound = TARGET_GAP
    if setting in args.settings and victim in args.victims:
        gaps = [r["gap_ms"] for r in pick(setting, victim)]
        value = percentile(gaps, pct)
        if value is not None:
            verdict = "met" if value <= bound else "MISSED"
            verdicts.append(
                f"{setting}: client gap p{pct} <= {bound:g} ms when the {victim} dies: "
                f"p{pct} {value:.0f} ms of {len(gaps)} failovers"
                f"{' (= the max)' if len(gaps) < 100 else ''}: {verdict}"
            )
    print("\nTargets")
    for line in verdicts:
        print(f"  {line}")
    return verdicts


def counted(rec: Mapping[str, Any], hosts: Iterable[str], name: str) -> int:
    """What the HOSTS' kernels counted in TCP counter NAME during the failover."""
    return sum(rec["tcp"].get(h, {}).get(name, 0) for h in hosts)


def rtos(rec: Mapping[str, Any], hosts: Iterable[str]) -> int:
    """Retransmission timeouts the HOSTS' kernels counted during the failover."""
    return counted(rec, hosts, "TcpExtTCPTimeouts")


def tcp_brief(rec: Mapping[str, Any], hosts: Sequence[str]) -> str:
    """Timeouts, tail-loss probes and retransmitted segments of HOSTS' kernels."""
    names = ("TcpExtTCPTimeouts", "TcpExtTCPLossProbes", "TcpRetransSegs")
    return "/".join(str(counted(rec, hosts, n)) for n in names)


def progress(i: int, n: int, cell: Cell, rec: Mapping[str, Any]) -> str:
    ph = phases(rec)
    head = f"[{i}/{n}] {cell.label:<22}"
    if "gaps" not in rec:
        return f"{head} not measured"
    own = [g for g in rec["gaps"].values() if g["ms"] is not None]
    worst = max(own, key=lambda g: g["ms"]) if own else None
    where = "" if worst is None else f" ({worst['start_ms']:+.0f}..{worst['end_ms']:+.0f})"
    elsewhere = max(rec["gaps"].values(), key=lambda g: g["window_ms"])
    parts = [
        f"gap {fmt(rec['gap_ms'])} ms{where}, back {fmt(rec['back_ms'])}",
        f"longest in run {rec['window_gap_ms']:.0f} at {elsewhere['window_start_ms'] / 1000:+.1f} s"
        f" (with drain {rec['report_gap_ms']:.0f})",
        f"crash->simplex {fmt(ph.get('crash_to_simplex'))}",
        f"detect {fmt(ph.get('detection'))}",
        f"grant {fmt(ph.get('grant'))}",
        f"wait {fmt(ph.get('fencing_wait'))}",
        f"dp {fmt(ph.get('data_plane'))}",
        f"id {fmt(ph.get('identity'))}",
        f"conf {fmt(ph.get('confirmed'))}",
        f"RTO/TLP/retrans clients {tcp_brief(rec, CLIENTS)}"
        f" survivor {tcp_brief(rec, [peer_of(cell.victim)])}",
        f"ok {rec['ok']}",
        f"noise {rec['quiet_pct']:.0f}%/{rec['noise_pct']:.0f}%",
    ]
    return f"{head} " + ", ".join(parts)


def plot(plt: Any, result: dict[str, Any]) -> None:
    """Histograms of the client-visible gap, one per setting, victims stacked."""
    settings = result["args"]["settings"]
    _, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 3.5), squeeze=False)
    for ax, s in zip(axes[0], settings, strict=True):
        data, labels = [], []
        for v in result["args"]["victims"]:
            gaps = [
                r["gap_ms"]
                for r in result["failovers"]
                if r["setting"] == s and r["victim"] == v and r.get("gap_ms") is not None
            ]
            data.append(gaps)
            labels.append(f"{v} dies")
        ax.hist(data, bins=20, stacked=True, label=labels)
        ax.set_title(f"heartbeat {s}: client-visible gap", fontsize=9)
        ax.set_xlabel("ms")
        ax.set_ylabel("failovers")
        ax.legend(fontsize=8)


# ---- the script --------------------------------------------------------------


def run(args: argparse.Namespace, redone: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every cell's failover, in rotation. One whose pair failed over by itself before
    the crash, or whose crash failed (appended to REDONE), is done again on a new
    lab, up to MAX_ATTEMPTS times."""
    cells = [
        Cell(s, v, k)
        for _ in range(args.per_cell)
        for s in args.settings
        for v in args.victims
        for k in args.kinds
    ]
    records = []
    for i, cell in enumerate(cells, 1):
        for _ in range(MAX_ATTEMPTS):
            rec = one_failover(cell, args)
            if "redo" not in rec:
                break
            redone.append(rec)
            print(f"[{i}/{len(cells)}] {cell.label:<22} DONE AGAIN: {rec['redo']}")
            for lines in rec["logs"].values():
                print("".join(f"   | {line}\n" for line in lines if "->" in line), end="")
        else:
            rec["problems"].append(f"not measured in {MAX_ATTEMPTS} attempts: {rec['redo']}")
        records.append(rec)
        print(progress(i, len(cells), cell, rec), flush=True)
        for line in rec["problems"]:
            print(f"   !!! PROBLEM {line}", flush=True)
        for line in rec["warnings"]:
            print(f"   (warning: {line})", flush=True)
        if rec["problems"] and "logs" in rec:
            for name, lines in (*rec.get("diagnostics", {}).items(), *rec["logs"].items()):
                print(f"   --- {name} (last {len(lines)} lines)")
                for line in lines:
                    print(f"   | {line}")
            if "kept_logs" in rec:
                print(f"   logs kept in {rec['kept_logs']}")
    return records


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--per-cell", type=int, default=5, help="failovers per setting x victim x kind (5)"
    )
    p.add_argument(
        "--settings",
        type=settings_list,
        default=settings_list(DEFAULT_SETTINGS),
        help=f"heartbeat INTERVAL_MSxMISSES, comma-separated ({DEFAULT_SETTINGS})",
    )
    p.add_argument(
        "--kinds",
        type=csv_of(CRASH_MODES),
        default=list(CRASH_MODES),
        help=f"crash kinds ({','.join(CRASH_MODES)})",
    )
    p.add_argument(
        "--victims",
        type=csv_of(HOSTS),
        default=list(HOSTS),
        help=f"hosts crashed ({','.join(HOSTS)})",
    )
    p.add_argument(
        "--load-seconds", type=float, default=6.0, help="length of each `coral load` run (6)"
    )
    p.add_argument(
        "--max-noise",
        type=float,
        default=5.0,
        help="list failovers during which steal plus other processes took more than this "
        "%% of the machine (5; they are kept: each crash is done once)",
    )
    p.add_argument(
        "--quiet",
        type=float,
        default=25.0,
        help="before each failover, wait until others use at most this %% of the machine "
        "over a second (25)",
    )
    p.add_argument(
        "--quiet-timeout",
        type=float,
        default=180.0,
        help="seconds to wait for that at most; then measure anyway, with a warning (180)",
    )
    p.add_argument(
        "--keep-logs", type=Path, help="copy the logs of a failover with problems under this dir"
    )
    p.add_argument("--save", action="store_true", help="write JSON (and PNG) to bench/results/")
    args = p.parse_args()
    if args.per_cell < 1:
        p.error("--per-cell must be at least 1")
    if bench.needs_root("bench_failover", "namespaces, tc, bpffs"):
        return 2
    started = bench.now()
    t0 = time.monotonic()
    redone: list[dict[str, Any]] = []
    records = run(args, redone)
    verdicts = print_results(records, args)
    if redone:
        print(f"\n{len(redone)} failovers done again on a new lab:")
        for r in redone:
            print(f"  {r['setting']} {r['victim']} {r['kind']} ({r['lab']}): {r['redo']}")
    problems = [f"{r['setting']} {r['victim']} {r['kind']} ({r['lab']}): {line}"
                for r in records for line in r["problems"]]  # fmt: skip
    if problems:
        print(f"\n!!! {len(problems)} PROBLEMS")
    for line in problems:
        print(f"PROBLEM {line}")
    warnings = [f"{r['setting']} {r['victim']} {r['kind']} ({r['lab']}): {line}"
                for r in records for line in r["warnings"]]  # fmt: skip
    for line in warnings:
        print(f"WARNING {line}")
    noisy = [r for r in records if r.get("noise_pct", 0) > args.max_noise]
    if noisy:
        print(
            f"\n{len(noisy)} of {len(records)} failovers ran while steal or other processes took "
            f"more than {args.max_noise:g}% of the machine (max "
            f"{max(r['noise_pct'] for r in noisy):.0f}%)"
        )
    elapsed = time.monotonic() - t0
    print(f"\n{bench.footer(elapsed)}")
    if args.save:
        result = {
            "started": started,
            "seconds": elapsed,
            "machine": bench.machine(),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "failovers": records,
            "redone": redone,
            "targets": verdicts,
        }
        print(f"saved {bench.save(result, RESULTS, 'failover', plot)}")
    return 1 if problems else 0


if __name__ == "__main__":
    bench.run_script("bench_failover", main)
