"""TCP settings that must agree on both hosts before a service may run duplex.

The backup's kernel adopts connections the primary's kernel negotiated, so
the options negotiated (timestamps, SACK, window scaling) must be ones the
backup's kernel uses too; either host may become the backup, so both must
accept adoption (syncookies enabled); and both LAN links must carry the same
segment sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

from coral.dataplane.identity import get_sysctl, mtu_of

MATCHED = {
    # sysctl: how the two hosts' values must compare
    "net.ipv4.tcp_timestamps": "enabled",  # 1 and 2 differ only in the offset
    "net.ipv4.tcp_sack": "equal",
    "net.ipv4.tcp_window_scaling": "equal",
}
REQUIRED_ON = {"net.ipv4.tcp_syncookies": "the kernel refuses adopted connections when it is 0"}


@dataclass(frozen=True)
class TcpSettings:
    """The settings of one host that duplex depends on."""

    sysctls: dict[str, str]
    mtu: int


def read(ns: str | None, lan_if: str) -> TcpSettings:
    names = [*MATCHED, *REQUIRED_ON]
    return TcpSettings({n: get_sysctl(ns, n) for n in names}, mtu_of(ns, lan_if))


def mismatches(primary: TcpSettings, backup: TcpSettings) -> list[str]:
    """Why PRIMARY and BACKUP cannot run duplex, one sentence each; empty if they can."""
    problems = []
    for name, how in MATCHED.items():
        p, b = primary.sysctls.get(name), backup.sysctls.get(name)
        same = (p != "0") == (b != "0") if how == "enabled" else p == b
        if not same:
            problems.append(f"{name} is {p} on the primary but {b} on the backup")
    for name, why in REQUIRED_ON.items():
        for host, s in (("primary", primary), ("backup", backup)):
            if s.sysctls.get(name) == "0":
                problems.append(f"{name} is 0 on the {host}: {why}")
    if primary.mtu != backup.mtu:
        problems.append(f"LAN MTU is {primary.mtu} on the primary but {backup.mtu} on the backup")
    return problems
