"""`coral proxy`: run the HTTP front proxy until interrupted, then print its counters."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import Any

from coral.agent.keys import read_key
from proxy.config import ProxyConfig, parse_hostport
from proxy.replication import Phase, ReplicationError
from proxy.server import Proxy


def _hostport(text: str) -> tuple[str, int]:
    try:
        return parse_hostport(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_parser(sub: Any) -> None:
    """Add `proxy` to the subparsers SUB."""
    d = ProxyConfig(listen=("", 0))
    p = sub.add_parser(
        "proxy",
        help="HTTP/1.1 front proxy",
        description="Forward HTTP/1.1 from LISTEN to the unmodified server at BACKEND, adding "
        "X-Forwarded-For, Forwarded and X-Request-Id. Prints its counters as JSON on exit.",
    )
    p.add_argument("--listen", type=_hostport, required=True, help="HOST:PORT to listen on")
    p.add_argument(
        "--backend", type=_hostport, default=d.backend, help="server HOST:PORT (127.0.0.1:8080)"
    )
    p.add_argument("--pin-dir", help="data plane pin directory: mark closes there")
    r = p.add_argument_group(
        "replication",
        "With --log-key-file (and --pin-dir), run as one of a replicated pair: this host's "
        "role for the service LISTEN comes from the data plane.",
    )
    r.add_argument("--log-key-file", help="the logging channel's shared key (16+ bytes)")
    r.add_argument("--log-listen", type=_hostport, help="HOST:PORT the backup listens on")
    r.add_argument("--log-peer", type=_hostport, help="the peer's HOST:PORT (--log-listen there)")
    r.add_argument("--log-local", help="source address toward the peer (the private link's)")
    r.add_argument(
        "--max-buffered-reply",
        type=int,
        default=d.max_buffered_reply,
        help="replies up to this size are logged whole before sending (bytes)",
    )
    r.add_argument(
        "--deterministic",
        action="append",
        default=[],
        metavar="PREFIX",
        help="URL path prefix of deterministic content (repeat): the backup generates "
        "the body, only the head and a digest are logged",
    )
    r.add_argument(
        "--sync-static",
        action="store_true",
        help="deterministic content: also wait until the backup generated the body",
    )
    r.add_argument(
        "--mode-poll-interval",
        type=float,
        default=d.mode_poll_interval,
        help="s between reads of the service's mode (also read at each replicated accept)",
    )
    r.add_argument("--pause-at", choices=[str(p) for p in Phase], help="test hook")
    p.add_argument("--max-header-bytes", type=int, default=d.max_header_bytes, help="431 above")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="413 above")
    p.add_argument("--idle-timeout", type=float, default=d.idle_timeout, help="s between requests")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout, help="s, 408 above")
    p.add_argument("--backend-timeout", type=float, default=d.backend_timeout, help="s, 504 above")
    p.set_defaults(func=_main)


def _read_key(path: str | None) -> bytes | None:
    return None if path is None else read_key(path, "log key")


async def _serve(cfg: ProxyConfig) -> int:
    proxy = Proxy(cfg)
    try:
        await proxy.start()
    except ReplicationError as e:
        print(f"coral proxy: {e}", file=sys.stderr)
        await proxy.close()
        return 2
    host, port = proxy.address
    role = f" ({proxy.replication.role.name.lower()})" if proxy.replication else ""
    print(f"coral proxy: {host}:{port} -> {cfg.backend[0]}:{cfg.backend[1]}{role}", file=sys.stderr)
    asyncio.get_running_loop().add_signal_handler(
        signal.SIGUSR1, lambda: print(json.dumps(proxy.stats()), file=sys.stderr, flush=True)
    )
    try:
        await proxy.serve_forever()
    finally:
        stats = proxy.stats()
        await proxy.close()
        print(json.dumps(stats), flush=True)
    return 0


def _main(args: argparse.Namespace) -> int:
    try:
        cfg = ProxyConfig(
            listen=args.listen,
            backend=args.backend,
            max_header_bytes=args.max_header_bytes,
            max_body_bytes=args.max_body_bytes,
            idle_timeout=args.idle_timeout,
            request_timeout=args.request_timeout,
            backend_timeout=args.backend_timeout,
            pin_dir=args.pin_dir,
            log_key=_read_key(args.log_key_file),
            log_listen=args.log_listen,
            log_peer=args.log_peer,
            log_local=args.log_local,
            max_buffered_reply=args.max_buffered_reply,
            mode_poll_interval=args.mode_poll_interval,
            pause_at=args.pause_at,
            deterministic_prefixes=tuple(args.deterministic),
            sync_static=args.sync_static,
        )
    except ValueError as e:
        print(f"coral proxy: {e}", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_serve(cfg))
    return uvloop.run(_serve(cfg))
