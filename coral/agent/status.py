"""`coral status`: the agent's status snapshot as an operator reads it.

What needs action comes first, in words that say so (ALERT lines: a service
without redundancy, a lost peer, a fenced or failed host, a dead proxy;
WARNING lines: an unreachable witness, refused heartbeats), then the pair,
the services, the last failover and the recent transitions. Plain text, no
colours, at most 100 columns, and tolerant of missing fields so a partial
snapshot (an agent still starting) still renders.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["WIDTH", "render"]

WIDTH = 100
PHASES = ("detection", "fencing_wait", "identity", "data_plane")


def _table(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _num(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _ago(seconds: object) -> str:
    """A duration for people: ms below a second, then s, min, h."""
    s = _num(seconds)
    if s is None:
        return "?"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    if s < 86400:
        return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"
    return f"{int(s // 86400)} d {int(s % 86400 // 3600)} h"


def _ms(value: object, digits: int = 1) -> str:
    ms = _num(value)
    return "?" if ms is None else f"{ms:.{digits}f} ms"


def _fit(line: str) -> str:
    return line if len(line) <= WIDTH else line[: WIDTH - 3] + "..."


def _endpoint(svc: Mapping[str, Any]) -> str:
    return f"{svc.get('vip', '?')}:{svc.get('port', '?')}"


def _rejoin_hint(auto: Mapping[str, Any], peer: str) -> str:
    """How a fenced host comes back: by itself ([host] rejoin_after_s) or by order."""
    if not auto:
        return "bring it back with `coral reintegrate` once the cause is fixed"
    left = _num(auto.get("in_s"))
    if left is None:
        return f"it rejoins by itself {auto.get('after_s')} s after it hears {peer} serving alone"
    return f"it rejoins {peer} by itself in {left:.1f} s"


def _alerts(status: Mapping[str, Any]) -> list[str]:
    """The lines that ask for action, worst first."""
    lines: list[str] = []
    state = str(status.get("state") or "?")
    peer = str(status.get("peer") or "the peer")
    peer_status = _table(status.get("peer_status"))
    services = [_table(s) for s in status.get("services") or []]
    if state == "failed":
        lines.append("ALERT: this host FAILED (a local component died): it serves nothing")
    elif state == "fenced":
        lines.append("ALERT: this host is FENCED: it serves nothing (it has no right to)")
        lines.append("  " + _rejoin_hint(_table(status.get("auto_rejoin")), peer))
    for svc in services:
        if svc.get("mode") == "simplex":
            lines.append(f"ALERT: service {_endpoint(svc)} runs SIMPLEX (no redundancy)")
    if peer_status and not peer_status.get("alive"):
        seen = peer_status.get("last_seen_s")
        since = f" (last heard {_ago(seen)} ago)" if _num(seen) is not None else ""
        lines.append(f"ALERT: peer {peer} LOST{since}")
    for svc in services:
        proxy = _table(svc.get("proxy"))
        if proxy and not proxy.get("running"):
            lines.append(f"ALERT: the proxy of service {_endpoint(svc)} is NOT RUNNING")
        if svc.get("mode") == "fenced" and state in ("duplex", "simplex"):
            lines.append(f"ALERT: service {_endpoint(svc)} is FENCED on this host")
    witness = status.get("witness")
    if isinstance(witness, Mapping) and witness.get("reachable") is False:
        where = witness.get("address", "?")
        if state == "simplex":
            lease = _ago(status.get("lease_remaining_s"))
            lines.append(
                f"ALERT: witness {where} UNREACHABLE while SIMPLEX: the lease cannot be "
                f"renewed and this host fences when it runs out (in {lease})"
            )
        else:
            lines.append(
                f"WARNING: witness {where} UNREACHABLE: if the peer is lost now, neither "
                "host may take over"
            )
    beats = _table(status.get("heartbeats"))
    refused = {k: beats.get(k) for k in ("forged", "replayed", "garbled", "foreign")}
    bad = ", ".join(f"{n} {k}" for k, n in refused.items() if _num(n))
    if bad:
        lines.append(f"WARNING: heartbeats refused: {bad} (another sender on the heartbeat port?)")
    return lines


def _pair(status: Mapping[str, Any]) -> list[str]:
    state = str(status.get("state") or "?")
    want = str(status.get("wantstate") or state)
    going = "" if want == state else f", going to {want.upper()}"
    lease = status.get("lease_remaining_s")
    lines = [
        f"host {status.get('host', '?')}: {state.upper()} for {_ago(status.get('since_s'))}"
        f"{going}, epoch {status.get('epoch', '?')}, lease {_ago(lease)} left"
    ]
    peer = _table(status.get("peer_status"))
    name = status.get("peer", "?")
    if not peer:
        lines.append(f"peer {name}: never heard")
    else:
        peer_state = str(peer.get("state") or "?").upper()
        heard = _ago(peer.get("last_seen_s"))
        if peer.get("alive"):
            lines.append(
                f"peer {name}: alive, {peer_state}, epoch {peer.get('epoch', '?')}, "
                f"last heard {heard} ago, rtt {_ms(peer.get('rtt_ms'), 2)}, "
                f"misses {peer.get('misses', '?')}"
            )
        else:
            lines.append(
                f"peer {name}: LOST, last heard {heard} ago (then {peer_state}, epoch "
                f"{peer.get('epoch', '?')}), misses {peer.get('misses', '?')}"
            )
        paths = _table(peer.get("paths"))
        if paths:
            lines.append(f"  {'path':<10} {'received':>10}  {'last heard':>12}  {'rtt':>10}")
            for path, info in sorted(paths.items()):
                info = _table(info)
                lines.append(
                    f"  {path:<10} {info.get('received', '?')!s:>10}  "
                    f"{_ago(info.get('last_seen_s')):>12}  {_ms(info.get('rtt_ms'), 2):>10}"
                )
    beats = _table(status.get("heartbeats"))
    if beats:
        lines.append(
            f"heartbeats: sent {beats.get('sent', 0)}, received {beats.get('received', 0)}; "
            f"refused: forged {beats.get('forged', 0)}, replayed {beats.get('replayed', 0)}, "
            f"garbled {beats.get('garbled', 0)}, foreign {beats.get('foreign', 0)}"
        )
    witness = status.get("witness")
    if isinstance(witness, Mapping):
        known = witness.get("reachable")
        reach = "not asked yet" if known is None else "reachable" if known else "UNREACHABLE"
        holder = witness.get("holder") or "nobody"
        lines.append(
            f"witness {witness.get('address', '?')}: {reach}, grant held by {holder}, "
            f"epoch {witness.get('epoch', '?')}"
        )
    else:
        lines.append("witness: none configured (a lost peer is told from a cut link by the router)")
    return lines


def _services(status: Mapping[str, Any]) -> list[str]:
    services = [_table(s) for s in status.get("services") or []]
    if not services:
        return ["services: none"]
    head = f"  {'service':<24} {'role':<8} {'mode':<9} {'duplex':>8} {'simplex':>8}  proxy"
    lines = ["services", head]
    for svc in services:
        conns = _table(svc.get("connections"))
        proxy = _table(svc.get("proxy"))
        if not proxy:
            running = "-"
        else:
            pid = proxy.get("pid")
            running = ("running" if proxy.get("running") else "NOT RUNNING") + (
                f" (pid {pid})" if pid else ""
            )
        mode = str(svc.get("mode") or "?")
        lines.append(
            f"  {_endpoint(svc):<24} {svc.get('role', '?')!s:<8} "
            f"{mode.upper() if mode != 'duplex' else mode:<9} "
            f"{conns.get('duplex', 0)!s:>8} {conns.get('simplex', 0)!s:>8}  {running}"
        )
    return lines


def _failover(status: Mapping[str, Any]) -> list[str]:
    last = status.get("last_failover")
    if not isinstance(last, Mapping):
        return ["last failover: none"]
    lines = [
        f"last failover: {last.get('at', '?')}, {_ms(last.get('total_ms'))} in all: "
        f"{last.get('why', '?')}"
    ]
    phases = _table(last.get("phases_ms"))
    names = [*PHASES, *sorted(set(phases) - set(PHASES))]
    parts = [f"{p} {_ms(phases[p])}" for p in names if p in phases]
    if parts:
        lines.append("  " + ", ".join(parts))
    if "grant_ms" in last:
        held = _ms(last.get("grant_ms"))
        ahead = ", asked ahead" if last.get("granted_ahead") else ""
        lines.append(f"  the witness's grant held {held} after detection{ahead}")
    return lines


def _transitions(status: Mapping[str, Any]) -> list[str]:
    moves = [_table(t) for t in status.get("transitions") or []]
    if not moves:
        return []
    lines = ["recent transitions (oldest first)"]
    for t in moves:
        lines.append(
            f"  {t.get('at', '?')}  {t.get('from', '?')} -> {t.get('to', '?')} "
            f"after {_ago((_num(t.get('ms')) or 0) / 1000)}: {t.get('why', '')}"
        )
    return lines


def render(status: Mapping[str, Any]) -> str:
    """STATUS (the agent's snapshot) as text for a terminal, alerts first."""
    sections = [
        _alerts(status),
        _pair(status),
        _services(status),
        _failover(status),
        _transitions(status),
    ]
    lines: list[str] = []
    for part in sections:
        if part:
            if lines:
                lines.append("")
            lines.extend(_fit(line) for line in part)
    return "\n".join(lines) + "\n"
