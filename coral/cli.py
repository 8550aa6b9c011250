"""The `coral` command: one sub-command per concern, each defined by its own module."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType

from coral import demo, loadclient, reqrep, stream
from coral.agent import cli as agent_cli
from coral.agent import witness_cli
from coral.dataplane import cli as datapath_cli
from coral.lab import LabError
from coral.lab import cli as lab_cli
from coral.netns import CommandError
from proxy import cli as proxy_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coral", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    lab_cli.add_parser(sub)
    loadclient.add_parser(sub)
    demo.add_parser(sub)
    stream.add_parser(sub)
    reqrep.add_parser(sub)
    datapath_cli.add_parser(sub)
    proxy_cli.add_parser(sub)
    witness_cli.add_parser(sub)
    agent_cli.add_parsers(sub)
    return parser


def _stop_handler(main_pid: int) -> Callable[[int, FrameType | None], None]:
    """SIGTERM and SIGINT become KeyboardInterrupt in this process, so every
    command cleans up (a lab is removed, a data plane fenced) through its
    finally blocks. A forked copy (pyroute2 forks to open netlink sockets in
    other namespaces, and its child catches only Exception) must not run
    the parent's cleanup from inside a namespace: it exits at once."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != main_pid:
            os._exit(128 + signum)
        raise KeyboardInterrupt

    return handler


def main(argv: list[str] | None = None) -> int:
    handler = _stop_handler(os.getpid())
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (LabError, CommandError) as e:
        print(f"coral: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("coral: interrupted; cleaned up", file=sys.stderr)
        return 130
