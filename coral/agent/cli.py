"""`coral agent run|check|example`, `coral status` and `coral fence`.

status and fence talk to a running agent over its control socket
(host.state_dir/<host.name>.sock): give --config (the socket is derived from
it) or --socket.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import sys
from pathlib import Path
from typing import Any

from coral.agent import config as config_mod
from coral.agent import status as status_view
from coral.agent.metrics import Metrics

CONTROL_TIMEOUT_S = 5.0


def add_parsers(sub: Any) -> None:
    """Add `agent`, `status` and `fence` to the subparsers SUB."""
    p = sub.add_parser("agent", help="the node agent (one per host of a pair)")
    agent_sub = p.add_subparsers(dest="agent_command", required=True)
    run = agent_sub.add_parser("run", help="run the agent until SIGTERM")
    run.add_argument("config", help="the host's TOML configuration")
    run.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    run.set_defaults(func=_run)
    check = agent_sub.add_parser("check", help="validate a configuration file")
    check.add_argument("config")
    check.set_defaults(func=_check)
    example = agent_sub.add_parser("example", help="print a commented example configuration")
    example.add_argument("--host", default="primary", choices=("primary", "backup"))
    example.set_defaults(func=_example)

    for name, helptext, func in (
        ("status", "what a running agent knows: roles, modes, peer, lease, failovers", _status),
        ("fence", "make a running agent stop serving now", _fence),
        ("promote", "move every service to this host alone (the peer steps down)", _promote),
        ("reintegrate", "a fenced host: restart its agent to rejoin its peer", _reintegrate),
    ):
        q = sub.add_parser(name, help=helptext)
        where = q.add_mutually_exclusive_group(required=True)
        where.add_argument("--config", help="the agent's configuration (finds its socket)")
        where.add_argument("--socket", help="the agent's control socket")
        if name == "status":
            q.add_argument("--json", action="store_true", help="the status snapshot as JSON")
            q.add_argument("--metrics", action="store_true", help="as Prometheus text")
        elif name == "fence":
            q.add_argument("--why", default="", help="recorded in the agent's log")
        q.set_defaults(func=func)


def _load(path: str) -> config_mod.AgentConfig | None:
    try:
        return config_mod.load(path)
    except config_mod.ConfigError as e:
        print(f"coral: {e}", file=sys.stderr)
        return None


def _run(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    import uvloop

    from coral.agent.agent import Agent  # the data plane's dependencies load only here

    return uvloop.run(Agent(cfg).run())


def _check(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return 2
    services = ", ".join(f"{s.vip}:{s.port} ({s.role})" for s in cfg.services)
    print(f"{args.config}: ok: host {cfg.host.name}, peer {cfg.peer.name}, services {services}")
    return 0


def _example(args: argparse.Namespace) -> int:
    print(config_mod.example(args.host), end="")
    return 0


def _socket_path(args: argparse.Namespace) -> str | None:
    if args.socket:
        return str(args.socket)
    cfg = _load(args.config)
    return None if cfg is None else str(Path(cfg.host.state_dir) / f"{cfg.host.name}.sock")


def request(path: str, message: dict[str, Any]) -> dict[str, Any]:
    """One request to the agent at control socket PATH; OSError if it does not answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(CONTROL_TIMEOUT_S)
        s.connect(path)
        s.sendall(json.dumps(message).encode() + b"\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    if not data:  # an agent that is stopping closes what it has not answered
        raise ConnectionError(f"the agent at {path} closed the connection without answering")
    reply: dict[str, Any] = json.loads(data)
    return reply


def _ask(args: argparse.Namespace, message: dict[str, Any]) -> dict[str, Any] | None:
    path = _socket_path(args)
    if path is None:
        return None
    try:
        reply = request(path, message)
    except (OSError, ValueError) as e:
        print(f"coral: no agent answers at {path}: {e}", file=sys.stderr)
        return None
    if not reply.get("ok"):
        print(f"coral: the agent refused: {reply.get('error')}", file=sys.stderr)
        return None
    return reply


def _status(args: argparse.Namespace) -> int:
    reply = _ask(args, {"cmd": "status"})
    if reply is None:
        return 1
    snapshot = reply["status"]
    if args.json:
        print(json.dumps(snapshot, indent=2))
    elif args.metrics:
        metrics = Metrics()
        metrics.update(snapshot)
        sys.stdout.write(metrics.render().decode())
    else:
        print(status_view.render(snapshot))
    return 0


def _fence(args: argparse.Namespace) -> int:
    reply = _ask(args, {"cmd": "fence", "why": args.why})
    if reply is None:
        return 1
    print(f"fenced: the agent is now {reply['state']}")
    return 0


def _promote(args: argparse.Namespace) -> int:
    if _ask(args, {"cmd": "promote"}) is None:
        return 1
    print("promote: the peer steps down; this host takes over (see coral status)")
    return 0


def _reintegrate(args: argparse.Namespace) -> int:
    if _ask(args, {"cmd": "reintegrate"}) is None:
        return 1
    print("reintegrate: the agent exits to restart (systemd Restart=always) and rejoin")
    return 0


def wait_state(path: str, states: set[str], timeout: float) -> dict[str, Any]:
    """Poll the agent at PATH until its state is one of STATES; its status, or
    TimeoutError naming the last state seen."""
    return asyncio.run(_wait_state(path, states, timeout))


async def _wait_state(path: str, states: set[str], timeout: float) -> dict[str, Any]:
    last: Any = "no answer"
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    status: dict[str, Any] = request(path, {"cmd": "status"})["status"]
                    last = status["state"]
                    if last in states:
                        return status
                except (OSError, ValueError, KeyError) as e:
                    last = f"no answer ({e})"
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise TimeoutError(
            f"agent at {path} not in {sorted(states)} after {timeout} s: {last}"
        ) from None
