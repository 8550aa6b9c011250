"""HTTP/1.1 as a test client sees it on a raw socket: requests written by hand
(so tests control pipelining and partial requests), replies parsed by httptools."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

import httptools


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes = b""


@dataclass
class Replies:
    """Replies parsed off a client socket, and its raw bytes."""

    items: list[Reply] = field(default_factory=list)
    raw: bytes = b""
    eof: bool = False
    complete: int = 0

    def __post_init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.items.append(Reply(0, {}))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.items[-1].headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self.items[-1].body += body

    def on_message_complete(self) -> None:
        self.items[-1].status = self.parser.get_status_code()
        self.complete += 1


def read_replies(sock: socket.socket, count: int, until_eof: bool = False) -> Replies:
    """Read COUNT complete replies (and then EOF if UNTIL_EOF); a RST raises."""
    got = Replies()
    sock.settimeout(5)
    while got.complete < count or (until_eof and not got.eof):
        data = sock.recv(65536)
        if not data:
            got.eof = True
            break
        got.raw += data
        got.parser.feed_data(data)
    assert got.complete >= count, f"only {got.complete} replies of {count}"
    return got


def get(target: str, extra: str = "") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: test\r\n{extra}\r\n".encode()
