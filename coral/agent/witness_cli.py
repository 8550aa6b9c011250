"""`coral witness`: run the split-brain witness until SIGTERM or SIGINT, then print
its counters as JSON; SIGUSR1 prints its state and counters to stderr."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from typing import Any

from coral.agent.keys import read_key
from coral.agent.supervisor import raise_priority
from coral.agent.witness import WitnessServer
from proxy.config import parse_hostport


def _hostport(text: str) -> tuple[str, int]:
    """HOST:PORT; port 0 (any free port, printed at start) is allowed."""
    host, sep, port = text.rpartition(":")
    try:
        if sep and port == "0":
            return parse_hostport(f"{host}:1")[0], 0
        return parse_hostport(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_parser(sub: Any) -> None:
    """Add `witness` to the subparsers SUB."""
    p = sub.add_parser(
        "witness",
        help="the outside witness that settles split brain",
        description="Give at most one host of a pair the sole grant to serve alone when "
        "the two lose each other (docs/design.md). Runs until SIGTERM or SIGINT, then "
        "prints its counters as JSON; SIGUSR1 prints state and counters to stderr.",
    )
    p.add_argument("--listen", type=_hostport, required=True, help="HOST:PORT (UDP) to listen on")
    p.add_argument("--key-file", required=True, help="the pair's shared key (16+ bytes)")
    p.add_argument(
        "--state-file",
        help="where grants and epochs survive a restart (without it a restart forgets them)",
    )
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    try:
        key = read_key(args.key_file)
    except ValueError as e:
        print(f"coral witness: {e}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(args.listen, key, args.state_file))


async def _serve(listen: tuple[str, int], key: bytes, state_file: str | None) -> int:
    raise_priority()  # a late grant fences the only host serving
    try:
        server = await WitnessServer.start(listen, key, state_file)
    except ValueError as e:
        print(f"coral witness: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"coral witness: {e.strerror or e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="coral witness: %(message)s")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def report() -> None:
        doc = {"state": server.state(), "counters": server.counters}
        print(json.dumps(doc), file=sys.stderr, flush=True)

    loop.add_signal_handler(signal.SIGUSR1, report)
    host, port = server.address
    kept = f"state in {state_file}" if state_file else "no state file: a restart forgets"
    print(f"coral witness: listening on {host}:{port} ({kept})", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        counters = dict(server.counters)
        await server.close()
        print(json.dumps(counters), flush=True)
    return 0
