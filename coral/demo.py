"""`coral demo`: the README's main command.

Builds a lab, puts real clients under verifying load against the real Apache
on the server hosts, and prints the outcome. It always removes its lab, also
when interrupted. Failover stages are added to the story as the product
grows; today it shows the lab and the verifying client working end to end.
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from types import FrameType
from typing import Any

from coral.lab import Lab
from coral.lab.topology import APACHE_PORT, SERVER_LAN_IPS, fresh_name

DEMO_MIX = (
    "/static/1k.bin=4,/static/15k.bin=3,/static/50k.bin=2,/static/1m.bin=1,"
    "/cgi-bin/random?n=20000=3,/cgi-bin/echo=1"
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="the demo: a lab, real Apache, verified load, the outcome")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load (default: 10)")
    p.add_argument("--connections", type=int, default=8, help="connections per client")
    p.add_argument("--json", action="store_true", help="print the reports as JSON")
    p.set_defaults(func=run)


def _interrupted(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _interrupted)
    t0 = time.monotonic()
    print("demo: building the lab (clients, router, primary, backup, spare, Apache on each)")
    lab = Lab.up(fresh_name("demo"), clients=2)
    try:
        print(f"demo: lab {lab.name} up in {time.monotonic() - t0:.1f} s")
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
                lab.start_load(
                    client,
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
    finally:
        lab.down()
        print(f"demo: lab {lab.name} removed")
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
        "demo: outcome: " + ("every reply verified correct" if bad == 0 else f"{bad} bad replies")
    )
    return 0 if bad == 0 else 1
