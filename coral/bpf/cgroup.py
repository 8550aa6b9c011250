"""Attach a sock_ops program to the cgroup v2 hierarchy as a pinned BPF link.

The link is pinned in the data plane's pin directory, so it outlives the
loader like the tc filters do, and goes away with the pin: removing it
(detach), or unmounting the bpffs it lives on (a lab's teardown), detaches
the program. Attaching again replaces it (an upgraded program).

    attach(obj.prog_fd("coral_sockops"), pin_dir / "coral_sockops_link")
    detach(pin_dir / "coral_sockops_link")
"""

from __future__ import annotations

import os
from pathlib import Path

from coral.bpf.syscall import AttachType, BpfError, link_create, obj_pin


def cgroup2_root(mounts: str = "/proc/mounts") -> str:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup on a systemd
    host, /sys/fs/cgroup/unified on a hybrid one)."""
    with open(mounts) as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2":
                return fields[1]
    raise FileNotFoundError("no cgroup2 file system mounted: sock_ops programs need one")


def attach(prog_fd: int, pin: Path, cgroup: str | None = None) -> None:
    """Attach PROG_FD to CGROUP (default: the root of the cgroup v2
    hierarchy, so every socket of the host runs it) and pin the link at PIN,
    replacing a link pinned there before."""
    target = os.open(cgroup or cgroup2_root(), os.O_RDONLY | os.O_DIRECTORY)
    try:
        link = link_create(prog_fd, target, AttachType.CGROUP_SOCK_OPS)
    finally:
        os.close(target)
    try:
        detach(pin)
        obj_pin(link, str(pin))
    except BpfError:
        os.close(link)
        raise
    os.close(link)  # the pin holds it now


def detach(pin: Path) -> None:
    """Remove the link pinned at PIN (nothing if none is)."""
    pin.unlink(missing_ok=True)
