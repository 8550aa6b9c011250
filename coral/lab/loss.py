"""Random packet loss on the receiving side of a lab link.

CoRAL's Table 4.2 lists the paths a replicated connection's packets take;
each must survive loss. Loss is injected where a packet arrives (a tc
program ahead of coral's filter), because a drop in the sender's own egress
is not a loss: TCP notices it and resends at once. Only TCP to or from the
service address is dropped, so the lab's other traffic is untouched.

    loss = inject(lab.namespace("backup"), "lan0", percent=1.0, vip=VIP)
    ...
    dropped, seen = loss.stats()
    loss.remove()
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from coral import bpf
from coral.bpf import tc
from coral.bpf.libbpf import BpfObject

PRIO = 1
"""Ahead of coral's filter (coral.bpf.tc.PRIO)."""


@dataclass
class Loss:
    """An attached loss program; remove() takes it away."""

    ns: str
    ifname: str
    obj: BpfObject

    def stats(self) -> tuple[int, int]:
        """(packets dropped, service packets seen)."""
        stats = self.obj.map("lossy_stats")
        dropped, seen = (
            struct.unpack("Q", stats.lookup(struct.pack("I", i)) or bytes(8))[0] for i in (0, 1)
        )
        return dropped, seen

    def remove(self) -> None:
        tc.detach(self.ifname, tc.Hook.INGRESS, netns=self.ns, prio=PRIO)
        self.obj.close()


def inject(ns: str, ifname: str, percent: float, vip: str) -> Loss:
    """Drop PERCENT % of the TCP packets to or from VIP arriving on IFNAME in NS."""
    if not 0 <= percent <= 100:
        raise ValueError(f"loss of {percent} %: must be between 0 and 100")
    bpf.build()
    obj = BpfObject.open(bpf.object_path("coral_lossy"))
    try:
        obj.set_rodata("lossy_vip", socket.inet_aton(vip))
        obj.set_rodata("lossy_ppm", struct.pack("I", round(percent * 10_000)))
        obj.load()
        tc.attach(ifname, obj.prog_fd("coral_lossy"), "coral_lossy", tc.Hook.INGRESS, netns=ns,
                  prio=PRIO)  # fmt: skip
    except BaseException:
        obj.close()
        raise
    return Loss(ns, ifname, obj)
