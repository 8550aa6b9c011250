"""`coral proxy`: run the HTTP front proxy until interrupted, then print its counters."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from proxy.config import ProxyConfig, parse_hostport
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
    p.add_argument("--max-header-bytes", type=int, default=d.max_header_bytes, help="431 above")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="413 above")
    p.add_argument("--idle-timeout", type=float, default=d.idle_timeout, help="s between requests")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout, help="s, 408 above")
    p.add_argument("--backend-timeout", type=float, default=d.backend_timeout, help="s, 504 above")
    p.set_defaults(func=_main)


async def _serve(cfg: ProxyConfig) -> None:
    proxy = Proxy(cfg)
    await proxy.start()
    host, port = proxy.address
    print(f"coral proxy: {host}:{port} -> {cfg.backend[0]}:{cfg.backend[1]}", file=sys.stderr)
    try:
        await proxy.serve_forever()
    finally:
        await proxy.close()
        print(json.dumps(proxy.stats()), flush=True)


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
        )
    except ValueError as e:
        print(f"coral proxy: {e}", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(cfg))
    else:
        uvloop.run(_serve(cfg))
    return 0
