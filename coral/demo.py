"""`coral demo`: the README's main command.

Builds a lab and tells the story so far, stage by stage, printing each
outcome; it always removes its lab, also when interrupted.

1. Real clients under verifying load against the real Apache on the server
   hosts (the lab and the verifying client end to end).
2. Connection replication: the data plane on primary and backup, the same
   stream server behind the service address on both, clients streaming both
   ways, the primary killed mid-stream: every byte must arrive, in order.

3. The product: node agents and front proxies on primary and backup (a fresh
   lab, `coral lab up --pair`'s code), clients under verifying load through
   the service address the whole time: the primary crashes, is re-integrated
   (it comes back as the backup), the backup crashes, is re-integrated. It
   prints a timeline and the outcome, and writes a PNG of throughput and
   latency around each fault.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from coral import netns, timeline
from coral.lab import Lab, LabError, agents
from coral.lab.lab import ToolRun
from coral.lab.pair import HOSTS, Pair
from coral.lab.topology import (
    APACHE_PORT,
    SERVER_LAN_IPS,
    SERVICE_PORT,
    SERVICE_VIP,
    fresh_name,
)

DEMO_MIX = (
    "/static/1k.bin=4,/static/15k.bin=3,/static/50k.bin=2,/static/1m.bin=1,"
    "/cgi-bin/random?n=20000=3,/cgi-bin/echo=1"
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="the demo: a lab, real Apache, verified load, the outcome")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load (default: 10)")
    p.add_argument("--connections", type=int, default=8, help="connections per client")
    p.add_argument("--stream-mb", type=int, default=20, help="MB each stream moves each way")
    p.add_argument("--json", action="store_true", help="print the reports as JSON")
    p.add_argument(
        "--plot",
        type=Path,
        default=Path("coral-demo.png"),
        help="where stage 3 writes its PNG (default: coral-demo.png)",
    )
    p.add_argument("--product-seconds", type=float, default=14.0, help="stage 3 load (14 s)")
    p.add_argument("--interval-ms", type=int, default=50, help="stage 3 heartbeats (50 ms)")
    p.add_argument("--misses", type=int, default=4, help="stage 3: heartbeats missed = lost (4)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    print("demo: building the lab (clients, router, primary, backup, spare, Apache on each)")
    lab = Lab.up(fresh_name("demo"), clients=2)
    try:
        print(f"demo: lab {lab.name} up in {time.monotonic() - t0:.1f} s")
        ok = apache_stage(lab, args) and replication_stage(lab, args)
    finally:
        lab.down()
        print(f"demo: lab {lab.name} removed")
    ok = ok and product_stage(args)
    print("demo: outcome: " + ("all stages correct" if ok else "FAILED (see above)"))
    return 0 if ok else 1


def apache_stage(lab: Lab, args: argparse.Namespace) -> bool:
    """Stage 1: verified load against Apache on two server hosts."""
    plan = {"client1": "primary", "client2": "backup"}
    runs = []
    for client, server in plan.items():
        url = f"http://{SERVER_LAN_IPS[server]}:{APACHE_PORT}"
        pipeline = "4" if client == "client2" else "1"
        print(
            f"demo: {client} -> Apache on {server} ({url}), {args.connections} keep-alive "
            f"connections, pipeline {pipeline}, {args.duration:.0f} s, every reply verified"
        )
        runs.append(
            lab.start_tool(
                client,
                "load",
                url,
                "--connections",
                str(args.connections),
                "--pipeline",
                pipeline,
                "--duration",
                str(args.duration),
                "--mix",
                DEMO_MIX,
            )
        )
    reports = {r.host: r.result(timeout=args.duration + 60) for r in runs}
    if args.json:
        print(json.dumps(reports, indent=2))
    print(
        f"{'client':<8} {'ok':>8} {'failed':>7} {'corrupt':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'gap ms':>8} {'req/s':>8}"
    )
    bad = 0
    for host, r in reports.items():
        c = r["counts"]
        lat = r["latency_ms"] or {"p50": float("nan"), "p99": float("nan")}
        bad += c["failed"] + c["corrupted"]
        print(
            f"{host:<8} {c['ok']:>8} {c['failed']:>7} {c['corrupted']:>8} {lat['p50']:>8.2f} "
            f"{lat['p99']:>8.2f} {r['longest_gap_ms']:>8.1f} {r['throughput_rps']:>8.0f}"
        )
    print(
        "demo: stage 1: " + ("every reply verified correct" if bad == 0 else f"{bad} bad replies")
    )
    return bad == 0


def replication_stage(lab: Lab, args: argparse.Namespace) -> bool:
    """Stage 2: streams through the service address survive the primary's crash."""
    size = args.stream_mb * 2**20
    address = f"{SERVICE_VIP}:{SERVICE_PORT}"
    print(
        f"demo: stage 2: data plane on primary and backup, {address} duplex; the same stream "
        "server on both"
    )
    pair = Pair.up(lab)
    try:
        pair.start(
            lambda host: [
                *(sys.executable, "-m", "coral", "stream", "serve", address),
                *("--pin-dir", str(pair.pin_dir(host))),
            ]
        )
        for host in HOSTS:
            if not netns.wait_tcp(lab.namespace(host), SERVICE_VIP, SERVICE_PORT, 10):
                raise LabError(f"the stream server on {host} did not start")
        clients = ("client1", "client2")
        print(f"demo: {', '.join(clients)}: 2 streams each, {args.stream_mb} MB up and down")
        runs = [
            lab.start_tool(
                c,
                "stream",
                "run",
                address,
                *("--streams", "2", "--up", str(size)),
                *("--down", str(size)),
            )
            for c in clients
        ]
        pair.wait_progress(4, size // 4, timeout=120)
        print("demo: a quarter of the way: kill -9 of every process on the primary")
        pair.crash("primary", "kill")
        print("demo: the backup serves alone (simplex); streams continue")
        reports = {r.host: r.result(timeout=300) for r in runs}
        counters = pair.planes["backup"].counters()
    finally:
        pair.close()
    if args.json:
        print(json.dumps(reports, indent=2))
    print(f"{'client':<8} {'stream':>6} {'up MB':>7} {'down MB':>8} {'ok':>4} {'stall ms':>9}")
    good = True
    for host, report in reports.items():
        for st in report["streams"]:
            good &= st["ok"]
            up, down = st["up"] / 2**20, st["received"] / 2**20
            print(
                f"{host:<8} {st['index']:>6} {up:>7.1f} {down:>8.1f} "
                f"{'yes' if st['ok'] else 'NO':>4} {st['longest_stall_ms']:>9.0f}"
            )
    shown = ("PASS_ADOPTED", "PASS_CLONED", "PASS_BACKUP_REPORT", "PASS_FAKE_ACK")
    counts = ", ".join(f"{k} {counters[k].packets}" for k in shown if k in counters)
    print(f"demo: backup counters: {counts}")
    print("demo: stage 2: " + ("every byte of every stream arrived" if good else "streams broken"))
    return good


def product_stage(args: argparse.Namespace) -> bool:
    """Stage 3: the product fails over and re-integrates by itself, both ways."""
    print("demo: stage 3: the product: agents and proxies on primary and backup, duplex")
    lab = Lab.up(fresh_name("demo"), clients=2)
    events: list[timeline.Event] = []

    def note(label: str) -> None:
        events.append(timeline.Event(time.monotonic(), label))
        print(f"demo: {events[-1].at - events[0].at:7.2f} s  {label}")

    try:
        with tempfile.TemporaryDirectory() as tmp:
            pair = agents.start(lab, interval_ms=args.interval_ms, misses=args.misses)
            records = {c: Path(tmp) / f"{c}.jsonl" for c in ("client1", "client2")}
            runs = [
                lab.start_tool(c, "load", f"http://{SERVICE_VIP}", "--connections", "4",
                               "--duration", str(args.product_seconds), "--mix", DEMO_MIX,
                               "--records", str(path))
                for c, path in records.items()
            ]  # fmt: skip
            note("load starts: 2 clients x 4 connections, every reply verified")
            for role, mode in (("primary", "kill"), ("backup", "freeze")):
                victim = _host_with(pair, role)
                survivor = "backup" if victim == "primary" else "primary"
                if not _until_replicated(pair, survivor if role == "backup" else victim, runs):
                    break  # the load is over
                note(f"crash: {mode} the {role} ({victim} host)")
                lab.crash(victim, mode)
                status = pair.wait(survivor, {"simplex"}, 10)
                fo = status["last_failover"]
                note(f"{survivor} serves alone ({fo['total_ms']:.0f} ms after the last heartbeat)")
                status = pair.reintegrate(victim)
                ri = status["last_reintegration"]
                note(f"{victim} re-integrated as backup ({ri['total_ms']:.0f} ms)")
            reports = {r.host: r.result(timeout=args.product_seconds + 60) for r in runs}
            note("load ends")
            data = [
                s for r in runs
                for s in timeline.samples(records[r.host], reports[r.host]["started_monotonic"])
            ]  # fmt: skip
        timeline.plot(data, events, args.plot, "Coral: verified load through two crashes")
    finally:
        lab.down()
    bad = sum(
        r["counts"]["failed"] + r["counts"]["corrupted"] + r["resets"] for r in reports.values()
    )
    ok = sum(r["counts"]["ok"] for r in reports.values())
    gap = max(r["longest_gap_ms"] for r in reports.values())
    print(f"demo: stage 3: {ok} replies verified, {bad} failed or corrupted or reset; "
          f"longest client-visible gap {gap:.0f} ms; plot in {args.plot}")  # fmt: skip
    return bad == 0


def _host_with(pair: agents.LabPair, role: str) -> str:
    """The lab host that has ROLE for the service now (a re-integration swaps them)."""
    return next(h for h in HOSTS if pair.status(h)["services"][0]["role"] == role)


def _until_replicated(pair: agents.LabPair, primary: str, runs: list[ToolRun]) -> bool:
    """Until the clients' connections are replicated on PRIMARY (bounded); False if
    the load ended first."""
    deadline = time.monotonic() + 15
    while pair.status(primary)["services"][0]["connections"]["duplex"] < 4:
        if all(r.proc.poll() is not None for r in runs):
            return False
        if time.monotonic() > deadline:
            raise LabError("the clients' connections were not replicated within 15 s")
        time.sleep(0.05)
    return True
