"""Reading a live TCP socket's state: sequence numbers, timestamps, queues.

Used to prove replication (both hosts' sockets carry the same numbers) and,
through TCP_REPAIR, by failover code that must learn where a connection
stands without disturbing it.
"""

from __future__ import annotations

import fcntl
import socket
import struct

TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_TIMESTAMP = 24
TCP_REPAIR_OFF_NO_WP = -1
"""Leave repair mode without sending a window probe."""
TCP_RECV_QUEUE, TCP_SEND_QUEUE = 1, 2
SIOCOUTQ = 0x5411


def seqs(s: socket.socket) -> tuple[int, int]:
    """(next sequence number to send, next expected), read in repair mode."""
    s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    try:
        out = []
        for queue in (TCP_SEND_QUEUE, TCP_RECV_QUEUE):
            s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)
            out.append(s.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF)
    finally:
        s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
    return out[0], out[1]


def timestamp(s: socket.socket) -> int:
    """The socket's current TCP timestamp clock (TSval it would send now)."""
    return s.getsockopt(socket.IPPROTO_TCP, TCP_TIMESTAMP) & 0xFFFFFFFF


def unacked(s: socket.socket) -> int:
    """Bytes in the send queue not yet acknowledged."""
    buf = fcntl.ioctl(s.fileno(), SIOCOUTQ, struct.pack("i", 0))
    return int(struct.unpack("i", buf)[0])
