"""Is an outside host reachable? ICMP echo through the router.

Two uses: an agent that lost its peer and has no witness checks that it is
not itself the isolated one before it serves alone; a primary that took the
VIP checks, with the VIP as source, that the router's ARP entry moved (the
echo reply comes back to the VIP, so it arrives only if the router sends
the VIP's traffic here).
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import struct
import time
from collections.abc import Sequence

TIMEOUT_S = 0.2
_ECHO, _ECHO_REPLY = 8, 0


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping(host: str, source: str | None = None, timeout: float = TIMEOUT_S) -> bool:
    """One ICMP echo to HOST (from SOURCE); True if its reply arrives within TIMEOUT."""
    ident, seq = os.getpid() & 0xFFFF, int(time.monotonic_ns()) & 0xFFFF
    header = struct.pack("!BBHHH", _ECHO, 0, 0, ident, seq)
    payload = b"coral-reach"
    packet = struct.pack("!BBHHH", _ECHO, 0, _checksum(header + payload), ident, seq) + payload
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        if source is not None:
            s.bind((source, 0))
        try:
            s.sendto(packet, (host, 0))
        except OSError:
            return False
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([s], [], [], left)
            if not ready:
                break
            data, (sender, _) = s.recvfrom(2048)
            ihl = (data[0] & 0x0F) * 4
            if len(data) < ihl + 8 or sender != host:
                continue
            rtype, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl : ihl + 8])
            if rtype == _ECHO_REPLY and (rid, rseq) == (ident, seq):
                return True
    return False


async def any_reachable(hosts: Sequence[str], source: str | None = None) -> bool:
    """True if one of HOSTS answers (tried in parallel); True if HOSTS is empty
    (nothing configured to check against)."""
    if not hosts:
        return True
    results = await asyncio.gather(*(asyncio.to_thread(ping, h, source) for h in hosts))
    return any(results)
