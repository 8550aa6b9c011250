"""The agent's Prometheus metrics, drawn from its status snapshot.

The snapshot (the dict `coral status --json` prints) is the one source of
truth: update() keeps the latest and every scrape renders it, so the metrics
can never disagree with `coral status`. Counters in the snapshot are totals
kept by the agent, exposed as they are. The registry is private to each
Metrics object: two agents in one process (tests, the lab) do not mix.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from coral.agent.statemachine import State
from coral.bpf.structs import Mode

__all__ = ["FAILOVER_PHASES", "HEARTBEAT_RESULTS", "SERVICE_MODES", "Metrics"]

AGENT_STATES: tuple[str, ...] = tuple(s.value for s in State)
SERVICE_MODES: tuple[str, ...] = tuple(m.name.lower() for m in Mode)
HEARTBEAT_RESULTS = ("sent", "received", "forged", "replayed", "garbled", "foreign")
FAILOVER_PHASES = ("detection", "fencing_wait", "identity", "data_plane", "total")


def _number(value: object) -> float | None:
    """VALUE as a sample value; None for absent or non-numeric (skipped, not 0:
    an unknown RTT is no RTT of zero)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


def _table(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _one_of(name: str, doc: str, label: str, current: str, known: tuple[str, ...]) -> Metric:
    """A state-set gauge: one series per known value, 1 for the current one
    (an unknown current value gets its own series rather than vanishing)."""
    family = GaugeMetricFamily(name, doc, labels=[label])
    for value in (*known, *(() if current in known or not current else (current,))):
        family.add_metric([value], 1.0 if value == current else 0.0)
    return family


class _SnapshotCollector(Collector):
    """Turns the latest status snapshot into metric families at each scrape."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.status: Mapping[str, Any] | None = None
        self.failovers = 0
        self.last_failover_at: object = None

    def update(self, status: Mapping[str, Any]) -> None:
        with self.lock:
            last = _table(status.get("last_failover"))
            at = last.get("at")
            if at is not None and at != self.last_failover_at:
                self.failovers += 1
            self.last_failover_at = at
            self.status = status

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            status, counted = self.status, self.failovers
        if status is None:
            return
        yield from self._agent(status, counted)
        yield from self._peer(status)
        yield from self._services(status)

    def _agent(self, status: Mapping[str, Any], counted: int) -> Iterator[Metric]:
        yield _one_of(
            "coral_agent_state",
            "The agent's state, 1 for the current one: duplex is healthy, simplex serves "
            "alone, fenced serves nothing.",
            "state",
            str(status.get("state") or ""),
            AGENT_STATES,
        )
        gauges = (
            ("coral_epoch", "The pair's epoch: it rises each time the set of serving hosts "
             "changes.", status.get("epoch")),
            ("coral_lease_remaining_seconds", "Time left on this host's right to serve; at 0 "
             "it stops serving (fences) unless renewed.", status.get("lease_remaining_s")),
        )  # fmt: skip
        for name, doc, value in gauges:
            number = _number(value)
            if number is not None:
                yield GaugeMetricFamily(name, doc, value=number)
        total = status.get("failovers")
        yield CounterMetricFamily(
            "coral_failovers",
            "Failovers this host has performed (took over its peer's connections) since "
            "the agent started.",
            value=float(total) if isinstance(total, int) else float(counted),
        )
        last = _table(status.get("last_failover"))
        if last:
            phases = GaugeMetricFamily(
                "coral_last_failover_seconds",
                "Duration of each phase of the last failover (detection, fencing_wait, "
                "identity, data_plane) and in total.",
                labels=["phase"],
            )
            times = {**_table(last.get("phases_ms")), "total": last.get("total_ms")}
            for phase in (*FAILOVER_PHASES, *sorted(set(times) - set(FAILOVER_PHASES))):
                ms = _number(times.get(phase))
                if ms is not None:
                    phases.add_metric([phase], round(ms / 1000, 6))
            yield phases
        witness = status.get("witness")
        if isinstance(witness, Mapping):
            yield GaugeMetricFamily(
                "coral_witness_reachable",
                "1 while the witness answers; without it a lost peer cannot be told from "
                "a cut link. Absent when no witness is configured.",
                value=1.0 if witness.get("reachable") else 0.0,
            )

    def _peer(self, status: Mapping[str, Any]) -> Iterator[Metric]:
        peer = _table(status.get("peer_status"))
        yield GaugeMetricFamily(
            "coral_peer_alive",
            "1 while the peer's heartbeats arrive; 0 when it is lost (failover follows).",
            value=1.0 if peer.get("alive") else 0.0,
        )
        rtt = _number(peer.get("rtt_ms"))
        if rtt is not None:
            yield GaugeMetricFamily(
                "coral_heartbeat_rtt_seconds",
                "Round-trip time of the latest heartbeat exchange with the peer.",
                value=round(rtt / 1000, 9),
            )
        misses = _number(peer.get("misses"))
        if misses is not None:
            yield GaugeMetricFamily(
                "coral_heartbeat_misses",
                "Heartbeat intervals the peer has missed in a row now; it is lost at the "
                "configured miss count.",
                value=misses,
            )
        counts = _table(status.get("heartbeats"))
        family = CounterMetricFamily(
            "coral_heartbeats",
            "Heartbeats sent and received, and those refused: forged (bad MAC), replayed "
            "(old sequence), garbled (malformed), foreign (another pair's).",
            labels=["result"],
        )
        for result in (*HEARTBEAT_RESULTS, *sorted(set(counts) - set(HEARTBEAT_RESULTS))):
            family.add_metric([result], _number(counts.get(result)) or 0.0)
        yield family
        paths = GaugeMetricFamily(
            "coral_heartbeat_path_last_seen_seconds",
            "Seconds since a heartbeat last arrived on each path (lan, private): a growing "
            "value on one path is a broken link while the other still carries the pair.",
            labels=["path"],
        )
        for path, info in sorted(_table(peer.get("paths")).items()):
            seen = _number(_table(info).get("last_seen_s"))
            if seen is not None:
                paths.add_metric([str(path)], seen)
        yield paths

    def _services(self, status: Mapping[str, Any]) -> Iterator[Metric]:
        mode = GaugeMetricFamily(
            "coral_service_mode",
            "Each service's mode on this host, 1 for the current one: duplex (replicated), "
            "simplex (alone), fenced (not serving).",
            labels=["vip", "port", "role", "mode"],
        )
        simplex = GaugeMetricFamily(
            "coral_simplex",
            "1 while the service runs on this host alone, with no redundancy: the next "
            "failure drops its connections. Alert on this.",
            labels=["vip", "port"],
        )
        conns = GaugeMetricFamily(
            "coral_connections",
            "Connections of the service held by this host: duplex ones are replicated on "
            "the peer, simplex ones are not.",
            labels=["vip", "port", "mode"],
        )
        services = status.get("services")
        for svc in services if isinstance(services, list) else []:
            svc = _table(svc)
            vip, port = str(svc.get("vip", "")), str(svc.get("port", ""))
            current = str(svc.get("mode") or "")
            role = str(svc.get("role") or "")
            extra = () if current in SERVICE_MODES or not current else (current,)
            for m in (*SERVICE_MODES, *extra):
                mode.add_metric([vip, port, role, m], 1.0 if m == current else 0.0)
            simplex.add_metric([vip, port], 1.0 if current == "simplex" else 0.0)
            counts = _table(svc.get("connections"))
            for kind in ("duplex", "simplex"):
                conns.add_metric([vip, port, kind], _number(counts.get(kind)) or 0.0)
        yield mode
        yield simplex
        yield conns


class Metrics:
    """The agent's metrics: update() with each status snapshot, serve() to scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._collector = _SnapshotCollector()
        self.registry.register(self._collector)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def update(self, status: Mapping[str, Any]) -> None:
        """Take STATUS (a snapshot the agent produced) as the current values."""
        self._collector.update(status)

    def render(self) -> bytes:
        """The Prometheus text exposition of the current values."""
        return generate_latest(self.registry)

    def serve(self, listen: tuple[str, int]) -> None:
        """Serve /metrics at LISTEN from a daemon thread. OSError naming the
        address when it cannot listen (taken port, foreign address); port 0
        picks a free one (see address)."""
        if self._server is not None:
            raise RuntimeError("metrics are already served")
        host, port = listen
        try:
            self._server, self._thread = start_http_server(port, host, registry=self.registry)
        except OSError as e:
            raise OSError(
                e.errno, f"metrics: cannot listen on {host}:{port}: {e.strerror or e}"
            ) from e

    @property
    def address(self) -> tuple[str, int] | None:
        """Where /metrics is served, once serve() has run."""
        if self._server is None:
            return None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def close(self) -> None:
        """Stop serving (the agent stopping, a test ending)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
