"""The `coral` command: one sub-command per concern, each defined by its own module."""

from __future__ import annotations

import argparse
import sys

from coral import demo, loadclient, reqrep, stream
from coral.dataplane import cli as datapath_cli
from coral.lab import LabError
from coral.lab import cli as lab_cli
from coral.netns import CommandError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coral", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    lab_cli.add_parser(sub)
    loadclient.add_parser(sub)
    demo.add_parser(sub)
    stream.add_parser(sub)
    reqrep.add_parser(sub)
    datapath_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (LabError, CommandError) as e:
        print(f"coral: {e}", file=sys.stderr)
        return 1
