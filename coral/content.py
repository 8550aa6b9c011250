"""What the lab's servers serve, and how a client proves a reply is right.

One module holds both sides of the contract: the lab writes the static files
and CGI scripts from it, and the verifying client checks every reply against
it. Static bodies are generated deterministically (SHA-256 in counter mode),
so any host can produce them and any client can know them without asking.
Dynamic bodies are unpredictable; their CGI sends a digest header the client
recomputes, and echoes the request id so a reply given to the wrong request
(or twice) is caught.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

DIGEST_HEADER = "x-coral-digest"
"""SHA-256 (hex) of the reply body, sent by the dynamic CGIs."""
RID_HEADER = "x-coral-rid"
"""The request id from the query string (``rid=``), echoed by the dynamic CGIs."""

STATIC_SIZES: Mapping[str, int] = {
    "1k": 1024,
    "15k": 15 * 1024,
    "50k": 50 * 1024,
    "1m": 1024 * 1024,
}


@functools.cache
def static_body(name: str) -> bytes:
    """The exact bytes of /static/NAME.bin (deterministic, same on every host)."""
    size = STATIC_SIZES[name]
    seed = f"coral-static-{name}".encode()
    blocks = (hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(size // 32 + 1))
    return b"".join(blocks)[:size]


@functools.cache
def static_digest(name: str) -> str:
    return hashlib.sha256(static_body(name)).hexdigest()


@dataclass(frozen=True)
class Endpoint:
    """One URL path the lab serves: how to ask for it and what comes back."""

    path: str
    method: str
    returns: str


ENDPOINTS: tuple[Endpoint, ...] = (
    *(
        Endpoint(f"/static/{name}.bin", "GET", f"{size} deterministic bytes (content.static_body)")
        for name, size in STATIC_SIZES.items()
    ),
    Endpoint(
        "/cgi-bin/random?n=N&rid=ID",
        "GET",
        "N random bytes; X-Coral-Digest: sha256 of the body; X-Coral-Rid: ID",
    ),
    Endpoint(
        "/cgi-bin/slow?ms=MS&n=N&rid=ID",
        "GET",
        "waits MS milliseconds, then replies like /cgi-bin/random",
    ),
    Endpoint(
        "/cgi-bin/echo?rid=ID",
        "POST",
        "body 'sha256=HEX length=N' of the request body; X-Coral-Digest: sha256 of the reply",
    ),
)


def echo_body(request_body: bytes) -> bytes:
    """The reply body /cgi-bin/echo gives for REQUEST_BODY."""
    return (
        f"sha256={hashlib.sha256(request_body).hexdigest()} length={len(request_body)}\n".encode()
    )


def verify_reply(
    target: str,
    request_body: bytes,
    status: int,
    headers: Mapping[str, str],
    body: bytes,
) -> str | None:
    """Check one reply against what TARGET must return; None if right, else why not.

    HEADERS keys must be lower-case. TARGET is the request's path and query as
    sent. Unknown paths are checked for status 200 only.
    """
    if status != 200:
        return f"status {status}"
    url = urlsplit(target)
    query = {k: v[-1] for k, v in parse_qs(url.query).items()}
    if url.path.startswith("/static/"):
        name = url.path.removeprefix("/static/").removesuffix(".bin")
        if name not in STATIC_SIZES:
            return None
        expected = static_body(name)
        if len(body) != len(expected):
            return f"length {len(body)}, expected {len(expected)}"
        if body != expected:
            first = next(i for i, (a, b) in enumerate(zip(body, expected, strict=True)) if a != b)
            return f"wrong byte at offset {first}"
        return None
    if not url.path.startswith("/cgi-bin/"):
        return None
    if "rid" in query and headers.get(RID_HEADER) != query["rid"]:
        return f"reply for request id {headers.get(RID_HEADER)!r}, expected {query['rid']!r}"
    digest = headers.get(DIGEST_HEADER)
    if digest is None:
        return "no digest header"
    if hashlib.sha256(body).hexdigest() != digest:
        return "body does not match its digest"
    if url.path == "/cgi-bin/echo" and body != echo_body(request_body):
        return "echo does not match the request body"
    if "n" in query and query["n"].isdigit() and len(body) != int(query["n"]):
        return f"length {len(body)}, expected {query['n']}"
    return None
