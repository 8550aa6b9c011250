"""HTTP/1.1 over httptools: requests in, rewritten requests out, replies framed.

Nothing here parses HTTP by hand: httptools (llhttp) validates every byte.
The only search is for the end of a reply head the parser has already
accepted; llhttp requires CRLF and rejects folded headers, so that end is the
first empty line.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus

import httptools

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
"""Headers that describe one hop; a proxy never forwards them (RFC 9110 7.6.1)."""
_REQUEST_DROPPED = HOP_BY_HOP | {b"content-length", b"expect", b"x-request-id"}
"""Also replaced: the body is re-framed with Content-Length, the proxy sets the id,
and Expect is not passed on because the whole body is read before forwarding."""
_REPLY_KEPT = frozenset({b"transfer-encoding"})
"""The reply's body is relayed as the backend framed it, so its framing header stays."""
_HEAD_END = b"\r\n\r\n"


class RequestError(Exception):
    """The client's input calls for an error reply (400, 408, 413, 431, 501) and a close."""

    def __init__(self, status: int, detail: str = "") -> None:
        super().__init__(f"{status} {detail}".strip())
        self.status = status


@dataclass(slots=True)
class Request:
    """One complete client request; the body is already de-chunked."""

    number: int
    method: bytes = b""
    target: bytearray = field(default_factory=bytearray)
    version: str = "1.1"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    keep_alive: bool = True

    def header(self, name: bytes) -> bytes | None:
        """The values of header NAME (lower-case) joined by ', ', or None."""
        values = [v for k, v in self.headers if k.lower() == name]
        return b", ".join(values) if values else None


def _connection_tokens(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    """Header names the Connection header lists: hop-by-hop too."""
    return {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    }


class RequestParser:
    """Feeds a client's bytes to httptools and collects complete requests, in order.

    Limits are enforced as bytes arrive, so an oversized head or body never
    sits in memory whole.
    """

    def __init__(self, max_header_bytes: int, max_body_bytes: int) -> None:
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.parser = httptools.HttpRequestParser(self)
        self.complete: deque[Request] = deque()
        self.current: Request | None = None
        self.count = 0
        self._head_bytes = 0
        self._in_head = False
        self._began = False
        self._error: RequestError | None = None

    @property
    def in_request(self) -> bool:
        """A request has begun and is not complete yet."""
        return self.current is not None

    def feed(self, data: bytes) -> None:
        """Parse DATA; complete requests go to self.complete. RequestError if the input is bad."""
        continued, before = self._in_head, self._head_bytes
        self._began = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise RequestError(501, "protocol upgrade") from None
        except httptools.HttpParserError as e:
            if self._error is not None:
                raise self._error from None
            raise RequestError(400, str(e)) from None
        if continued and self._in_head and not self._began:
            # All of this read belongs to an unfinished head: count it whole, since
            # an endless header line never reaches on_header. (The read a head
            # begins in is counted by the callbacks alone, so pipelined requests
            # before it are not charged to it.)
            self._head_bytes = before + len(data)
            self._check_head()

    def _check_head(self) -> None:
        if self._head_bytes > self.max_header_bytes:
            self._fail(431, "request header fields too large")

    def _fail(self, status: int, detail: str) -> None:
        self._error = RequestError(status, detail)
        raise self._error

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.count += 1
        self.current = Request(self.count)
        self._head_bytes = 0
        self._in_head = True
        self._began = True

    def on_url(self, url: bytes) -> None:
        assert self.current is not None
        self.current.target += url
        self._head_bytes += len(url)
        self._check_head()

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.current is not None
        self.current.headers.append((name, value))
        self._head_bytes += len(name) + len(value) + 4
        self._check_head()

    def on_headers_complete(self) -> None:
        request = self.current
        assert request is not None
        self._in_head = False
        if self.parser.should_upgrade():
            self._fail(501, "protocol upgrade")
        request.method = self.parser.get_method()
        request.version = self.parser.get_http_version()
        request.keep_alive = self.parser.should_keep_alive()
        length = request.header(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            self._fail(413, "content too large")

    def on_body(self, body: bytes) -> None:
        assert self.current is not None
        self.current.body += body
        if len(self.current.body) > self.max_body_bytes:
            self._fail(413, "content too large")

    def on_message_complete(self) -> None:
        assert self.current is not None
        self.complete.append(self.current)
        self.current = None


def _forwarded_for(ip: str) -> bytes:
    """The RFC 7239 node for IP (IPv6 quoted and bracketed)."""
    return (f'for="[{ip}]"' if ":" in ip else f"for={ip}").encode()


def backend_request(request: Request, client_ip: str, request_id: str) -> bytes:
    """REQUEST as sent to the backend: hop-by-hop headers dropped, the client
    address and request id added, the body (de-chunked) framed by Content-Length.

    The head is kept in the client's HTTP version, so an HTTP/1.0 client gets
    a reply it can read (no chunking)."""
    dropped = _REQUEST_DROPPED | _connection_tokens(request.headers)
    xff = request.header(b"x-forwarded-for")
    forwarded = request.header(b"forwarded")
    lines = [b"%s %s HTTP/%s" % (request.method, request.target, request.version.encode())]
    lines += [
        b"%s: %s" % (k, v)
        for k, v in request.headers
        if k.lower() not in dropped and k.lower() not in (b"x-forwarded-for", b"forwarded")
    ]
    ip = client_ip.encode()
    lines.append(b"X-Forwarded-For: " + (xff + b", " + ip if xff else ip))
    node = _forwarded_for(client_ip)
    lines.append(b"Forwarded: " + (forwarded + b", " + node if forwarded else node))
    lines.append(b"X-Request-Id: " + request_id.encode())
    if request.body or request.method not in (b"GET", b"HEAD", b"DELETE", b"OPTIONS"):
        lines.append(b"Content-Length: %d" % len(request.body))
    if request.version == "1.0":
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + _HEAD_END + request.body


class BackendProtocolError(Exception):
    """The backend's reply is not valid HTTP, or more than the one reply asked for."""


class ReplyFramer:
    """Follows one backend reply through httptools and says which bytes go to the client.

    The head is rewritten (hop-by-hop headers out, the proxy's Connection
    header in); the body is passed on exactly as the backend framed it, so
    chunk sizes and trailers survive. One request is outstanding on a
    backend connection at a time, so a reply ends where a read ends.
    """

    def __init__(self, head_request: bool) -> None:
        self.head_request = head_request
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.done = False
        self.keep_alive = True
        self._messages = 0
        self._head = bytearray()
        self._head_sent = False
        self.head_length = 0
        """Bytes of the client's head (known once it is sent)."""

    @property
    def sized(self) -> bool:
        """The body is framed by Content-Length alone (no chunking, not until EOF)."""
        names = {k.lower() for k, _ in self.headers}
        return b"content-length" in names and b"transfer-encoding" not in names

    @property
    def until_eof(self) -> bool:
        """The body has neither length nor chunking: it ends when the backend closes."""
        names = {k.lower() for k, _ in self.headers}
        return (
            self.headers_done
            and not self.done
            and b"content-length" not in names
            and b"transfer-encoding" not in names
        )

    def feed(self, data: bytes, close_after: bool) -> bytes:
        """Parse DATA; return the bytes to send the client now (head rewritten once it is complete).

        CLOSE_AFTER: the proxy will close the client connection after this reply."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            raise BackendProtocolError(str(e)) from None
        if self._messages > 1:
            raise BackendProtocolError("more than one reply")
        if self._head_sent:
            return data
        self._head += data
        if not self.headers_done:
            return b""
        end = self._head.find(_HEAD_END)
        assert end >= 0, "httptools accepted a head without an empty line"
        self._head_sent = True
        rest = b"" if self.head_request else bytes(self._head[end + len(_HEAD_END) :])
        head = self._client_head(bytes(self._head[: self._head.find(b"\r\n")]), close_after)
        self.head_length = len(head)
        return head + rest

    def _client_head(self, status_line: bytes, close_after: bool) -> bytes:
        dropped = (HOP_BY_HOP - _REPLY_KEPT) | _connection_tokens(self.headers)
        lines = [
            status_line,
            *(b"%s: %s" % (k, v) for k, v in self.headers if k.lower() not in dropped),
        ]
        if close_after or self.until_eof:
            lines.append(b"Connection: close")
        return b"\r\n".join(lines) + _HEAD_END

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._messages += 1

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if 100 <= self.status < 200:
            raise BackendProtocolError(f"interim reply {self.status} (Expect is never forwarded)")
        self.headers_done = True
        self.keep_alive = self.parser.should_keep_alive()
        if self.head_request:
            self.done = True

    def on_message_complete(self) -> None:
        self.done = True


def error_reply(status: int) -> bytes:
    """The proxy's own reply for STATUS: fixed bytes (no Date), always closing the connection."""
    reason = HTTPStatus(status).phrase
    body = f"{status} {reason}\n".encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
