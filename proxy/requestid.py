"""Request ids that both hosts compute alike for the same request.

The id names a request by where it sits in the client's byte stream, not by
anything local to a process: the client's address and port (the connection)
and the request's number on that connection, counted from 1. Both proxies see
the same connection, so they derive the same id, and a request re-executed
after failover keeps it (a backend can deduplicate by it). A later issue adds
the connection's initial sequence number to the key, so a reused 4-tuple
does not repeat ids.
"""

from __future__ import annotations

import hashlib

HEADER = b"X-Request-Id"


def request_id(client_ip: str, client_port: int, number: int) -> str:
    """The id of request NUMBER (1, 2, ...) on the connection from CLIENT_IP:CLIENT_PORT."""
    key = f"{client_ip}:{client_port}:{number}".encode()
    return hashlib.sha256(key).hexdigest()[:32]
