"""`coral datapath ...`: a host's data plane as its pinned maps show it.

Reads the maps the agent pinned (``--pin-dir``) and loads no program, so it
is safe to run at any time next to a live agent, as often as wanted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from coral.dataplane.plane import Connection, DataPlaneError, PlaneView, Service, open_view


def add_parser(sub: Any) -> None:
    p = sub.add_parser("datapath", help="data plane counters, services and connections")
    dp_sub = p.add_subparsers(dest="datapath_command", required=True)

    stats = dp_sub.add_parser(
        "stats", help="counters per verdict and drop reason, services, table sizes"
    )
    stats.add_argument("--pin-dir", required=True, help="bpffs directory of the agent's maps")
    stats.add_argument("--all", action="store_true", help="every reason, zero counters too")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(func=_guarded(_stats))

    conns = dp_sub.add_parser("conns", help="replicated connections and their sequence anchors")
    conns.add_argument("--pin-dir", required=True, help="bpffs directory of the agent's maps")
    conns.add_argument("--json", action="store_true")
    conns.set_defaults(func=_guarded(_conns))


def _guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """FN with its expected failures (bad pin dir, stale maps) as a message
    and exit status 1, not a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (DataPlaneError, OSError) as e:
            print(f"coral datapath: {e}", file=sys.stderr)
            return 1

    return run


def _name(member: Any) -> str:
    return "unknown" if member is None else str(member.name).lower()


def _service_json(s: Service) -> dict[str, Any]:
    return {**dataclasses.asdict(s), "role": _name(s.role), "mode": _name(s.mode)}


def _conn_json(c: Connection, now_ns: int) -> dict[str, Any]:
    return {**dataclasses.asdict(c), "mode": _name(c.mode), "idle_s": _idle_s(c, now_ns)}


def _idle_s(c: Connection, now_ns: int) -> float | None:
    return None if not c.last_ns else max(0, now_ns - c.last_ns) / 1e9


def _stats(args: argparse.Namespace) -> int:
    with open_view(args.pin_dir) as view:
        report = _stats_report(view, args.all)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print("services")
    if not report["services"]:
        print("  (none)")
    for s in report["services"]:
        print(
            f"  {s['vip'] + ':' + str(s['port']):<22} {s['role']:<8} {s['mode']:<8} "
            f"epoch {s['epoch']:<6} lease {s['lease_remaining_s']:7.2f} s  "
            f"peer {s['peer_ip']} ({s['peer_mac']})"
        )
    print(
        f"connections {report['connections']} of {report['conn_capacity']}, "
        f"handshakes {report['handshakes']} of {report['handshake_capacity']}"
    )
    print(f"{'reason':<26} {'packets':>14} {'bytes':>16}")
    if not report["counters"]:
        print("  (no packet counted yet)")
    for reason, c in report["counters"].items():
        print(f"{reason:<26} {c['packets']:>14} {c['bytes']:>16}")
    return 0


def _stats_report(view: PlaneView, everything: bool) -> dict[str, Any]:
    return {
        "counters": {
            reason: dataclasses.asdict(c)
            for reason, c in view.counters(include_zero=everything).items()
        },
        "services": [_service_json(s) for s in view.services()],
        "connections": len(view.connections()),
        "conn_capacity": view.conn_capacity,
        "handshakes": view.handshakes(),
        "handshake_capacity": view.handshake_capacity,
    }


_CONN_COLUMNS = (
    # header, field of Connection (sequence numbers as on the wire)
    ("primary_isn", "primary_isn"),
    ("client_isn", "client_isn"),
    ("backup_ack", "backup_ack"),
    ("client_ack", "client_ack"),
    ("delivered", "delivered_ack"),
    ("backup_nxt", "backup_snd_nxt"),
    ("primary_nxt", "primary_snd_nxt"),
    ("acked_cli", "acked_to_client"),
)


def _conns(args: argparse.Namespace) -> int:
    with open_view(args.pin_dir) as view:
        conns = view.connections()
    now = time.monotonic_ns()
    conns.sort(key=lambda c: (c.vip, c.vip_port, c.client_ip, c.client_port))
    if args.json:
        print(json.dumps([_conn_json(c, now) for c in conns], indent=2))
        return 0
    seq_head = " ".join(f"{h:>11}" for h, _ in _CONN_COLUMNS)
    print(f"{'client':<22} {'service':<22} {'mode':<8} {'idle s':>7} {seq_head}  flags")
    for c in conns:
        idle = _idle_s(c, now)
        seqs = " ".join(f"{getattr(c, f):>11}" for _, f in _CONN_COLUMNS)
        flags = ",".join(f.lower() for f in c.flags) + (" closing" if c.closing else "")
        print(
            f"{c.client_ip + ':' + str(c.client_port):<22} "
            f"{c.vip + ':' + str(c.vip_port):<22} {_name(c.mode):<8} "
            f"{'-' if idle is None else f'{idle:.1f}':>7} {seqs}  {flags or '-'}"
        )
    print(f"{len(conns)} connection(s)")
    return 0
