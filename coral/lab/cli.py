"""`coral lab ...`: build, inspect, drive and remove labs from a shell."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from coral.lab.lab import CRASH_MODES, Lab, remove_all, remove_lab


def add_parser(sub: Any) -> None:
    p = sub.add_parser("lab", help="network-namespace lab with real Apache")
    lab_sub = p.add_subparsers(dest="lab_command", required=True)

    up = lab_sub.add_parser("up", help="build a lab")
    up.add_argument("--name", default="lab", help="lab name: 1-12 of [a-z0-9] (default: lab)")
    up.add_argument("--clients", type=int, default=2, help="client hosts (default: 2)")
    up.add_argument("--no-private-link", action="store_true", help="no primary-backup link")
    up.add_argument("--json", action="store_true", help="print the lab's info as JSON")
    up.add_argument(
        "--pair",
        action="store_true",
        help="run the product: agents and proxies on primary and backup (duplex, VIP live), "
        "the witness on the router",
    )
    up.add_argument("--interval-ms", type=int, default=20, help="heartbeat interval (--pair)")
    up.add_argument("--misses", type=int, default=3, help="heartbeats missed = lost (--pair)")
    up.add_argument(
        "--rejoin-after-s",
        type=int,
        default=0,
        metavar="S",
        help="a fenced host rejoins by itself after hearing its peer serve alone this long "
        "([host] rejoin_after_s; --pair; default 0: only by coral reintegrate)",
    )
    up.set_defaults(func=_up)

    info = lab_sub.add_parser("info", help="hosts, addresses, service and URL paths")
    info.add_argument("--name", default="lab")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_info)

    ex = lab_sub.add_parser("exec", help="run a command on a lab host")
    ex.add_argument("--name", default="lab")
    ex.add_argument("host")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")
    ex.set_defaults(func=_exec)

    crash = lab_sub.add_parser("crash", help="fail a host")
    crash.add_argument("--name", default="lab")
    crash.add_argument("host")
    crash.add_argument("--mode", choices=CRASH_MODES, default="kill")
    crash.set_defaults(func=_crash)

    heal = lab_sub.add_parser("heal", help="undo a link or freeze crash")
    heal.add_argument("--name", default="lab")
    heal.add_argument("host")
    heal.set_defaults(func=_heal)

    down = lab_sub.add_parser("down", help="remove a lab (or --all labs and leftovers)")
    down.add_argument("name", nargs="?", default="lab")
    down.add_argument("--all", action="store_true")
    down.set_defaults(func=_down)


def _print_info(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, indent=2))
        return
    svc = info["service"]
    print(f"lab {info['name']}: service {svc['vip']}:{svc['port']}, bpffs {info['bpffs']}")
    print(f"{'host':<10} {'namespace':<24} {'interfaces'}")
    for name, h in info["hosts"].items():
        ifs = ", ".join(
            f"{i}={'+'.join(v['addresses']) or 'bridge-port'} ({v['state']})"
            for i, v in h["interfaces"].items()
        )
        fault = f"  [crashed: {h['fault']}]" if h["fault"] else ""
        print(f"{name:<10} {h['namespace']:<24} {ifs}{fault}")
        if "apache" in h:
            print(f"{'':<10} apache pid {h['apache']['pid']} at {', '.join(h['apache']['urls'])}")
    print("paths:")
    for p in info["paths"]:
        print(f"  {p['method']:<5} {p['path']:<34} {p['returns']}")


def _up(args: argparse.Namespace) -> int:
    lab = Lab.up(args.name, args.clients, not args.no_private_link)
    try:
        if args.pair:
            from coral.lab import agents

            pair = agents.start(
                lab,
                interval_ms=args.interval_ms,
                misses=args.misses,
                rejoin_after_s=args.rejoin_after_s,
            )
    except BaseException:
        lab.down()
        raise
    _print_info(lab.info(), args.json)
    if args.pair and not args.json:
        for host in ("primary", "backup"):
            print(f"{host}: agent duplex; coral status --socket {pair.socket(host)}")
    return 0


def _info(args: argparse.Namespace) -> int:
    _print_info(Lab.load(args.name).info(), args.json)
    return 0


def _exec(args: argparse.Namespace) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        print("coral lab exec: give a command after --", file=sys.stderr)
        return 2
    argv = Lab.load(args.name).argv(args.host, cmd)
    os.execvp(argv[0], argv)


def _crash(args: argparse.Namespace) -> int:
    Lab.load(args.name).crash(args.host, args.mode)
    return 0


def _heal(args: argparse.Namespace) -> int:
    Lab.load(args.name).heal(args.host)
    return 0


def _down(args: argparse.Namespace) -> int:
    if args.all:
        names = remove_all()
        print("removed: " + (", ".join(names) if names else "nothing"))
    else:
        remove_lab(args.name)
    return 0
