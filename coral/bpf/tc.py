"""Attach BPF programs to an interface's clsact hooks, and detach them, over
netlink (pyroute2): no tc(8) processes in steady state.

Each hook gets one coral filter at a fixed priority and handle (PRIO), ahead
of anything an operator adds at a higher number. Priorities below PRIO are
kept for lab tooling that must see packets before coral does (loss
injection on the receiving side: coral.lab.loss).
Attaching again replaces that filter atomically (no window without a
program: used for upgrades). The filter holds its own reference to the
program; the loader may close its object afterwards.

    attach("lan0", obj.prog_fd("coral_ingress"), "coral_ingress", Hook.INGRESS, netns="ns")
    detach("lan0", Hook.INGRESS, netns="ns")
"""

from __future__ import annotations

import errno
from enum import StrEnum

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

PRIO = 10
HANDLE = 1
_ETH_P_ALL = 0x0003


class Hook(StrEnum):
    """clsact's two attach points, as tc parent handles."""

    INGRESS = "ffff:fff2"
    EGRESS = "ffff:fff3"


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LookupError(f"no interface {ifname!r}")
    return int(found[0])


def attach(
    ifname: str, prog_fd: int, name: str, hook: Hook, *, netns: str | None = None, prio: int = PRIO
) -> None:
    """Run program PROG_FD (shown as NAME) in direct-action mode on HOOK of
    IFNAME, in network namespace NETNS (None: the current one). Adds the
    clsact qdisc if missing; replaces a previous coral filter on that hook."""
    with IPRoute(netns=netns, flags=0) as ipr:
        idx = _index(ipr, ifname)
        try:
            ipr.tc("add", "clsact", idx)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise
        ipr.tc(
            "replace-filter",
            "bpf",
            idx,
            HANDLE,
            fd=prog_fd,
            name=name,
            parent=hook.value,
            prio=prio,
            protocol=_ETH_P_ALL,
            classid=1,
            direct_action=True,
        )


def detach(
    ifname: str, hook: Hook | None = None, *, netns: str | None = None, prio: int = PRIO
) -> None:
    """Remove coral's filter (or the one at PRIO) from HOOK of IFNAME (both hooks if None).
    Missing filters, clsact or interface are not errors: detaching is how
    cleanup starts, after any failure."""
    with IPRoute(netns=netns, flags=0) as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return
        for h in (hook,) if hook else tuple(Hook):
            try:
                ipr.tc(
                    "del-filter",
                    "bpf",
                    found[0],
                    HANDLE,
                    parent=h.value,
                    prio=prio,
                    protocol=_ETH_P_ALL,
                )
            except NetlinkError as e:
                if e.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                    raise


def attached(ifname: str, hook: Hook, *, netns: str | None = None) -> list[str]:
    """Names of the BPF programs filtering HOOK of IFNAME (for status and tests)."""
    with IPRoute(netns=netns, flags=0) as ipr:
        idx = _index(ipr, ifname)
        try:
            filters = ipr.get_filters(index=idx, parent=hook.value)
        except NetlinkError as e:
            if e.code == errno.EINVAL:  # no clsact
                return []
            raise
        names = []
        for f in filters:
            opts = f.get_attr("TCA_OPTIONS")
            name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
            if name:
                names.append(name)
        return names
