"""Request ids that both hosts compute alike for the same request.

The id names a request by where it sits in the client's byte stream, not by
anything local to a process: the connection (the client's address, port and
initial sequence number, so a reused 4-tuple does not repeat ids) and the
request's number on that connection, counted from 1. Both proxies see the
same connection, so they derive the same id, and a request re-executed after
failover keeps it (a backend can deduplicate by it). A connection this host
serves alone has no known ISN and uses 0.
"""

from __future__ import annotations

import hashlib

HEADER = b"X-Request-Id"


def request_id(client_ip: str, client_port: int, isn: int, number: int) -> str:
    """The id of request NUMBER (1, 2, ...) on the connection from CLIENT_IP:CLIENT_PORT
    that began with initial sequence number ISN."""
    key = f"{client_ip}:{client_port}:{isn}:{number}".encode()
    return hashlib.sha256(key).hexdigest()[:32]
