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
    log_key: bytes | None = None
    """Replicate (with pin_dir): the logging channel's shared key. This host's
    role for the service comes from the data plane."""
    log_listen: tuple[str, int] | None = None
    """Where this proxy, as the backup, accepts the primary's logging channel."""
    log_peer: tuple[str, int] | None = None
    """Where this proxy, as the primary, finds the backup's logging channel."""
    log_local: str | None = None
    """The primary's source address for the channel (the private link's, if any)."""
    max_buffered_reply: int = 8 * 1024 * 1024
    """A reply up to this size is logged whole before its first byte reaches the
    client. A longer one is logged and sent in pieces of this size; if the
    primary fails within it, the backup re-executes the request and goes on
    only if its new reply starts with exactly the bytes logged, else it closes
    the connection (the client sees a short reply; counted: regenerated_mismatch)."""
    deterministic_prefixes: tuple[str, ...] = ()
    """URL paths with these prefixes give the same body on both hosts (static
    files): the primary logs the reply's head and the body's digest and
    length; the backup generates the body from its own backend and checks it."""
    sync_static: bool = False
    """For deterministic content, the primary waits until the backup has generated
    and checked the body too (CoRAL's "sync static": the backup never falls
    behind), not only until it holds the head."""
    backend_failure_grace: float = 0.5
    """A replicating primary waits this long before answering a backend failure
    (502, 504): when the whole host is going down, its backend often dies a
    moment before the proxy, and the backup must take over the request rather
    than the client get an error caused by the crash."""
    mode_poll_interval: float = 0.01
    """How often a replicating proxy reads the service's mode (to notice it is alone);
    it also reads it whenever it accepts a replicated connection."""
    pause_at: str | None = None
    """Test hook: stop at this Phase of the first request reaching it (see proxy.replication)."""

    @property
    def replicated(self) -> bool:
        return self.log_key is not None

    def __post_init__(self) -> None:
        if self.max_header_bytes < 64 or self.max_body_bytes < 0:
            raise ValueError("max_header_bytes must be at least 64, max_body_bytes not negative")
        if self.replicated and self.pin_dir is None:
            raise ValueError("replication needs the data plane's pin directory")
        if self.replicated and (self.log_listen is None or self.log_peer is None):
            raise ValueError("replication needs both log_listen and log_peer")
        if any(not p.startswith("/") for p in self.deterministic_prefixes):
            raise ValueError("deterministic prefixes are URL paths: they start with /")
        if self.max_buffered_reply < 1024:
            raise ValueError("max_buffered_reply must be at least 1024")
        timeouts = (
            self.idle_timeout,
            self.request_timeout,
            self.backend_connect_timeout,
            self.backend_timeout,
            self.drain_timeout,
            self.mode_poll_interval,
        )
        if min(timeouts) <= 0:
            raise ValueError("timeouts must be positive")
