"""The agent's Prometheus metrics and `coral status`'s text, both drawn from a
status snapshot: what an operator and an alert rule see in each state."""

from __future__ import annotations

import copy
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coral.agent.cli import request
from coral.agent.metrics import Metrics
from coral.agent.status import WIDTH, render

DUPLEX: dict[str, Any] = {
    "host": "primary",
    "peer": "backup",
    "state": "duplex",
    "wantstate": "duplex",
    "since_s": 12.5,
    "epoch": 3,
    "lease_remaining_s": 0.058,
    "peer_status": {
        "alive": True,
        "state": "duplex",
        "epoch": 3,
        "last_seen_s": 0.012,
        "rtt_ms": 0.21,
        "misses": 0,
        "paths": {
            "lan": {"received": 120, "last_seen_s": 0.012, "rtt_ms": 0.2},
            "private": {"received": 118, "last_seen_s": 0.014, "rtt_ms": 0.19},
        },
    },
    "heartbeats": {
        "sent": 500,
        "received": 480,
        "forged": 0,
        "replayed": 0,
        "garbled": 0,
        "foreign": 0,
    },
    "witness": {"address": "198.18.0.1:7002", "reachable": True, "holder": None, "epoch": 0},
    "services": [
        {
            "vip": "198.18.0.100",
            "port": 80,
            "role": "primary",
            "mode": "duplex",
            "connections": {"duplex": 12, "simplex": 0},
            "proxy": {"pid": 1234, "running": True},
        }
    ],
    "last_failover": None,
    "transitions": [
        {
            "at": "2026-11-23T13:59:48.000+00:00",
            "from": "starting",
            "to": "duplex",
            "why": "peer acknowledged epoch 3",
            "ms": 412.0,
        }
    ],
}


def simplex() -> dict[str, Any]:
    """The backup after taking over from a crashed primary."""
    s = copy.deepcopy(DUPLEX)
    s.update(host="backup", peer="primary", state="simplex", wantstate="simplex", epoch=4)
    s["peer_status"].update(alive=False, last_seen_s=2.5, misses=125, rtt_ms=None)
    s["services"][0].update(role="backup", mode="simplex", connections={"duplex": 0, "simplex": 12})
    s["witness"].update(holder="backup", epoch=4)
    s["last_failover"] = {
        "at": "2026-11-23T14:00:00Z",
        "why": "peer lost",
        "total_ms": 80.1,
        "grant_ms": 0.6,
        "granted_ahead": True,
        "phases_ms": {
            "detection": 60.0,
            "fencing_wait": 19.0,
            "identity": 0.5,
            "data_plane": 0.6,
        },
    }
    s["transitions"] += [
        {"at": "t1", "from": "duplex", "to": "lost", "why": "no heartbeat for 60 ms", "ms": 9e5},
        {"at": "t2", "from": "lost", "to": "takeover", "why": "sole grant", "ms": 1.2},
        {"at": "t3", "from": "takeover", "to": "simplex", "why": "lease ran out", "ms": 19.0},
    ]
    return s


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one series in an exposition text (KeyError if absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, _, value = line.rpartition(" ")
        base, _, rest = series.partition("{")
        if base != name:
            continue
        got = dict(
            item.split("=", 1) for item in rest.rstrip("}").split(",") if item
        )  # values keep their quotes
        if {k: v.strip('"') for k, v in got.items()} == labels:
            return float(value)
    raise KeyError(f"{name}{labels}")


# --- metrics --------------------------------------------------------------------------------


def test_metrics_in_duplex() -> None:
    m = Metrics()
    assert m.render() == b""  # nothing before the first snapshot, rather than false zeros
    m.update(DUPLEX)
    text = m.render().decode()
    assert sample(text, "coral_agent_state", state="duplex") == 1
    assert sample(text, "coral_agent_state", state="simplex") == 0
    assert sample(text, "coral_simplex", vip="198.18.0.100", port="80") == 0
    svc = {"vip": "198.18.0.100", "port": "80", "role": "primary"}
    assert sample(text, "coral_service_mode", mode="duplex", **svc) == 1
    assert sample(text, "coral_service_mode", mode="fenced", **svc) == 0
    assert sample(text, "coral_epoch") == 3
    assert sample(text, "coral_lease_remaining_seconds") == pytest.approx(0.058)
    assert sample(text, "coral_peer_alive") == 1
    assert sample(text, "coral_heartbeat_rtt_seconds") == pytest.approx(0.00021)
    assert sample(text, "coral_heartbeat_misses") == 0
    assert sample(text, "coral_heartbeats_total", result="sent") == 500
    assert sample(text, "coral_heartbeats_total", result="forged") == 0
    assert sample(text, "coral_heartbeat_path_last_seen_seconds", path="private") == 0.014
    conns = {"vip": "198.18.0.100", "port": "80"}
    assert sample(text, "coral_connections", mode="duplex", **conns) == 12
    assert sample(text, "coral_failovers_total") == 0
    assert sample(text, "coral_witness_reachable") == 1
    assert "coral_last_failover_seconds{" not in text
    for line in text.splitlines():
        if line.startswith("# HELP "):
            assert len(line.split(" ", 3)[3]) > 20, line  # every metric says what it means


def test_metrics_in_simplex() -> None:
    m = Metrics()
    m.update(DUPLEX)
    m.update(simplex())
    text = m.render().decode()
    assert sample(text, "coral_simplex", vip="198.18.0.100", port="80") == 1  # the alert
    assert sample(text, "coral_agent_state", state="simplex") == 1
    assert sample(text, "coral_agent_state", state="duplex") == 0
    assert sample(text, "coral_peer_alive") == 0
    assert sample(text, "coral_heartbeat_misses") == 125
    with pytest.raises(KeyError):
        sample(text, "coral_heartbeat_rtt_seconds")  # unknown, not zero
    assert sample(text, "coral_connections", vip="198.18.0.100", port="80", mode="simplex") == 12
    assert sample(text, "coral_epoch") == 4
    assert sample(text, "coral_failovers_total") == 1
    assert sample(text, "coral_last_failover_seconds", phase="detection") == pytest.approx(0.06)
    assert sample(text, "coral_last_failover_seconds", phase="total") == pytest.approx(0.0801)
    m.update(simplex())  # the same failover again: not counted twice
    assert sample(m.render().decode(), "coral_failovers_total") == 1


def test_metrics_without_witness_and_counter_from_agent() -> None:
    s = copy.deepcopy(DUPLEX)
    s["witness"] = None
    s["failovers"] = 7
    m = Metrics()
    m.update(s)
    text = m.render().decode()
    assert "coral_witness_reachable" not in text
    assert sample(text, "coral_failovers_total") == 7


def test_metrics_registries_are_separate() -> None:
    a, b = Metrics(), Metrics()
    a.update(DUPLEX)
    b.update(simplex())
    assert sample(a.render().decode(), "coral_epoch") == 3
    assert sample(b.render().decode(), "coral_epoch") == 4


@pytest.fixture
def served() -> Iterator[Metrics]:
    m = Metrics()
    m.update(simplex())
    m.serve(("127.0.0.1", 0))
    try:
        yield m
    finally:
        m.close()


def test_serve_over_http(served: Metrics) -> None:
    assert served.address is not None
    host, port = served.address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    assert sample(text, "coral_simplex", vip="198.18.0.100", port="80") == 1


def test_serve_on_a_taken_port(served: Metrics) -> None:
    assert served.address is not None
    other = Metrics()
    with pytest.raises(OSError, match=r"metrics: cannot listen on 127\.0\.0\.1:\d+"):
        other.serve(served.address)
    with socket.socket() as s:  # the failed attempt left nothing listening
        s.bind(("127.0.0.1", 0))


# --- status text ----------------------------------------------------------------------------


def check_width(text: str) -> None:
    assert all(len(line) <= WIDTH for line in text.splitlines()), text
    assert "\x1b" not in text  # no colours


def test_status_duplex() -> None:
    text = render(DUPLEX)
    check_width(text)
    assert "ALERT" not in text and "WARNING" not in text
    assert text.startswith("host primary: DUPLEX for 12.5 s, epoch 3, lease 58 ms left")
    assert "peer backup: alive, DUPLEX, epoch 3, last heard 12 ms ago, rtt 0.21 ms" in text
    assert "private" in text and "lan" in text
    assert "witness 198.18.0.1:7002: reachable" in text
    assert "198.18.0.100:80" in text and "running (pid 1234)" in text
    assert "last failover: none" in text
    assert "starting -> duplex after 412 ms: peer acknowledged epoch 3" in text


def test_status_simplex() -> None:
    text = render(simplex())
    check_width(text)
    lines = text.splitlines()
    assert lines[0] == "ALERT: service 198.18.0.100:80 runs SIMPLEX (no redundancy)"
    assert "ALERT: peer primary LOST (last heard 2.5 s ago)" in lines
    assert "host backup: SIMPLEX" in text
    assert "last failover: 2026-11-23T14:00:00Z, 80.1 ms in all: peer lost" in text
    assert "detection 60.0 ms, fencing_wait 19.0 ms, identity 0.5 ms, data_plane 0.6 ms" in text
    assert "the witness's grant held 0.6 ms after detection, asked ahead" in text
    assert "grant held by backup" in text
    assert "duplex -> lost after 15 min 0 s" in text


def test_status_peer_lost_before_takeover() -> None:
    s = copy.deepcopy(DUPLEX)
    s.update(state="lost", wantstate="simplex")
    s["peer_status"].update(alive=False, last_seen_s=0.07, misses=3)
    text = render(s)
    check_width(text)
    assert "ALERT: peer backup LOST (last heard 70 ms ago)" in text
    assert "peer backup: LOST, last heard 70 ms ago" in text
    assert "host primary: LOST for 12.5 s, going to SIMPLEX" in text
    assert "runs SIMPLEX" not in text


def test_status_fenced() -> None:
    s = copy.deepcopy(DUPLEX)
    s.update(state="fenced", wantstate="fenced")
    s["services"][0]["mode"] = "fenced"
    text = render(s)
    check_width(text)
    assert text.splitlines()[0].startswith("ALERT: this host is FENCED")
    hint = text.splitlines()[1]
    assert hint == "  bring it back with `coral reintegrate` once the cause is fixed"
    s["auto_rejoin"] = {"after_s": 5, "in_s": None}
    assert "  it rejoins by itself 5 s after it hears backup serving alone" in render(s)
    s["auto_rejoin"]["in_s"] = 2.5
    assert render(s).splitlines()[1] == "  it rejoins backup by itself in 2.5 s"
    (row,) = [line for line in text.splitlines() if line.startswith("  198.18.0.100:80")]
    assert row.split()[:3] == ["198.18.0.100:80", "primary", "FENCED"]


def test_status_witness_unreachable() -> None:
    s = copy.deepcopy(DUPLEX)
    s["witness"]["reachable"] = False
    assert "WARNING: witness 198.18.0.1:7002 UNREACHABLE" in render(s)
    alone = simplex()
    alone["witness"]["reachable"] = False
    assert "ALERT: witness 198.18.0.1:7002 UNREACHABLE while SIMPLEX" in render(alone)


def test_status_no_witness_and_refused_heartbeats() -> None:
    s = copy.deepcopy(DUPLEX)
    s["witness"] = None
    s["heartbeats"]["forged"] = 4
    text = render(s)
    check_width(text)
    assert "witness: none configured" in text
    assert "WARNING: heartbeats refused: 4 forged" in text


def test_status_dead_proxy_and_partial_snapshot() -> None:
    s = copy.deepcopy(DUPLEX)
    s["services"][0]["proxy"] = {"pid": None, "running": False}
    assert "ALERT: the proxy of service 198.18.0.100:80 is NOT RUNNING" in render(s)
    text = render({"host": "primary", "state": "starting"})  # an agent just started
    assert "host primary: STARTING" in text and "services: none" in text


def test_status_long_reason_fits() -> None:
    s = copy.deepcopy(DUPLEX)
    s["transitions"][0]["why"] = "x" * 300
    check_width(render(s))


def test_control_request_to_a_stopping_agent_is_an_oserror(tmp_path: Path) -> None:
    """An agent that stops closes requests unanswered: callers waiting for its
    restart treat that like no agent (OSError), not like a garbled reply."""
    path = str(tmp_path / "a.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)
        server.settimeout(5)

        def close_unanswered() -> None:
            conn, _ = server.accept()
            conn.recv(1024)
            conn.close()

        stopping = threading.Thread(target=close_unanswered)
        stopping.start()
        with pytest.raises(ConnectionError, match="closed the connection without answering"):
            request(path, {"cmd": "status"})
        stopping.join(5)
