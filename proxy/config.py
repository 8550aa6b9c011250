"""The proxy's settings: where it listens, where the backend is, and every limit.

All limits live here so the primary and (later) the backup run with the same
numbers, and so tests can shrink them.
"""

from __future__ import annotations

from dataclasses import dataclass


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' -> (host, port); ValueError if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep:
        if default_port is None:
            raise ValueError(f"need HOST:PORT, not {text!r}")
        host, port = text, str(default_port)
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"need HOST:PORT, not {text!r}")
    return host, int(port)


@dataclass(frozen=True)
class ProxyConfig:
    """One proxy instance. Timeouts are seconds; sizes are bytes."""

    listen: tuple[str, int]
    backend: tuple[str, int] = ("127.0.0.1", 8080)
    max_header_bytes: int = 16 * 1024
    """Request line plus headers; more gets 431."""
    max_body_bytes: int = 16 * 1024 * 1024
    """A request body is buffered whole before it is forwarded; more gets 413."""
    idle_timeout: float = 60.0
    """No request begun for this long: the connection is closed without a reply."""
    request_timeout: float = 10.0
    """From a request's first byte to its last; slower gets 408."""
    backend_connect_timeout: float = 5.0
    """Connecting to the backend; a failure or timeout gets 502."""
    backend_timeout: float = 60.0
    """Between bytes of a backend reply; a timeout before any byte gets 504."""
    drain_timeout: float = 2.0
    """How long a graceful close reads the client's unread input before closing."""
    pin_dir: str | None = None
    """Data plane pin directory: closes are marked there before the FIN."""

    def __post_init__(self) -> None:
        if self.max_header_bytes < 64 or self.max_body_bytes < 0:
            raise ValueError("max_header_bytes must be at least 64, max_body_bytes not negative")
        timeouts = (
            self.idle_timeout,
            self.request_timeout,
            self.backend_connect_timeout,
            self.backend_timeout,
            self.drain_timeout,
        )
        if min(timeouts) <= 0:
            raise ValueError("timeouts must be positive")
