"""Re-integration (CoRAL 4.4.5), in the lab with the agents: a failed host comes
back while its peer keeps serving, under the verifying load, and nobody notices.

The host that served alone stays the primary of every service; the returning
host becomes the backup and takes the VIP. Connections of the simplex era stay
with the primary (the new backup forwards their packets): each answers the
requests it received, then closes at the HTTP level (Connection: close), and
the client's next connection is replicated.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest
from httpwire import get, read_replies
from test_agent import (
    INTERVAL_MS,
    MISSES,
    check_load,
    coral,
    start_load,
    wait_for,
    wait_replicating,
)
from test_agent import pair as pair
from test_proxy_pair import check

from coral import netns
from coral.agent.heartbeat import Beat, encode
from coral.dataplane import open_view
from coral.lab import Lab, agents
from coral.lab.agents import HEARTBEAT_PORT, LabPair
from coral.lab.lab import CRASH_MODES
from coral.lab.pair import HOSTS, peer_of
from coral.lab.topology import SERVER_LAN_IPS, SERVICE_PORT, SERVICE_VIP, fresh_name

pytestmark = pytest.mark.root


@pytest.mark.parametrize("mode", CRASH_MODES)
@pytest.mark.parametrize("victim", HOSTS)
def test_crash_and_reintegrate_under_load(pair: LabPair, victim: str, mode: str) -> None:
    survivor = peer_of(victim)
    runs = start_load(pair, seconds=10)
    wait_replicating(pair, 8)
    pair.lab.crash(victim, mode)
    pair.wait(survivor, {"simplex"}, 10)
    status = pair.reintegrate(victim)
    assert status["services"][0]["role"] == "primary", status["services"]
    assert pair.status(victim)["services"][0]["role"] == "backup"
    breakdown = status["last_reintegration"]
    assert breakdown is not None and breakdown["total_ms"] < 5000, breakdown
    # It asked to join only once started (its proxies listening), not during start-up.
    log = pair.log(victim).read_text()
    started, asked = log.rfind(f"{victim}: started;"), log.rfind("starting -> joining")
    assert 0 <= started < asked, log[-3000:]
    # The simplex era's connections finish; the clients' new ones are replicated.
    wait_for(
        lambda: pair.status(survivor)["services"][0]["connections"]["duplex"] >= 4,
        10,
        "new connections replicated by the re-integrated pair",
    )
    check_load(runs, pair.lab)


def connect(pair: LabPair) -> socket.socket:
    def make() -> socket.socket:
        return socket.create_connection((SERVICE_VIP, SERVICE_PORT), timeout=10)

    return netns.call_in_netns(pair.lab.namespace("client1"), make)


def test_simplex_connection_with_pipelined_requests_finishes_cleanly(pair: LabPair) -> None:
    pair.lab.crash("backup", "kill")
    pair.wait("primary", {"simplex"}, 10)
    with connect(pair) as old:  # opened while the primary serves alone
        old.sendall(get("/static/1k.bin"))
        check(read_replies(old, 1), ["/static/1k.bin"])
        pair.reintegrate("backup")
        targets = ["/static/15k.bin", "/cgi-bin/random?n=3000&rid=p1", "/static/50k.bin"]
        old.sendall(b"".join(get(t) for t in targets))
        replies = read_replies(old, 3, until_eof=True)  # a reset raises here
        check(replies, targets)
        assert replies.eof and replies.items[-1].headers.get("connection") == "close"
    forwarded = open_view(pair.lab.bpffs / "backup").counters()["PASS_FORWARDED"]
    assert forwarded.packets > 0, "the old connection's packets went via the new backup"
    with connect(pair) as new:  # the client's next connection is replicated
        new.sendall(get("/static/1k.bin"))
        check(read_replies(new, 1), ["/static/1k.bin"])
        svc = pair.status("primary")["services"][0]
        assert svc["connections"]["duplex"] >= 1, svc


def test_a_joining_host_with_another_protocol_is_refused_clearly(pair: LabPair) -> None:
    pair.lab.crash("backup", "kill")
    pair.wait("primary", {"simplex"}, 10)
    key = pair.lab.dir.joinpath("pair.key").read_bytes().strip()
    info = json.dumps({"v": 0, "services": [[SERVICE_VIP, SERVICE_PORT]]}).encode()
    boot = time.time_ns()
    beats = [
        encode(Beat("backup", boot, seq, 1, 0, "joining", time.monotonic_ns(), 0, 0, info), key)
        for seq in range(1, 30)
    ]

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for beat in beats:
                s.sendto(beat, (SERVER_LAN_IPS["primary"], HEARTBEAT_PORT))
                time.sleep(0.01)  # paced like heartbeats

    netns.call_in_netns(pair.lab.namespace("spare"), send)
    expected = "refusing backup's join: pair protocol 0 there, 1 here"
    wait_for(lambda: expected in pair.log("primary").read_text(), 5, "the refusal")
    assert pair.status("primary")["state"] == "simplex"


def test_promote_round_trip_under_load(pair: LabPair) -> None:
    """Planned switch-over: move the service to the backup's host alone (the primary
    steps down for maintenance), bring the primary back, then move the service
    back to it: no failed request, no reset."""
    runs = start_load(pair, seconds=14)
    wait_replicating(pair, 8)
    for target, other in (("backup", "primary"), ("primary", "backup")):
        promote = coral("promote", "--socket", str(pair.socket(target)))
        assert promote.returncode == 0, promote.stderr
        pair.wait(target, {"simplex"}, 10)
        assert "promoted: stepping down" in pair.status(other)["transitions"][-1]["why"]
        status = pair.reintegrate(other)
        assert status["host"] == target and status["services"][0]["role"] == "primary"
    check_load(runs, pair.lab)


REJOIN_AFTER_S = 1


@pytest.fixture
def rejoining_pair() -> Iterator[LabPair]:
    """A pair configured to rejoin by itself ([host] rejoin_after_s)."""
    lab = Lab.up(fresh_name("rj"), clients=2)
    try:
        yield agents.start(
            lab, interval_ms=INTERVAL_MS, misses=MISSES, rejoin_after_s=REJOIN_AFTER_S
        )
    finally:
        lab.down()


def test_a_thawed_host_rejoins_by_itself_when_configured(rejoining_pair: LabPair) -> None:
    """With rejoin_after_s, nobody runs `coral reintegrate`: the frozen primary thaws,
    finds its peer serving alone, fences itself, and rejoins as its backup once it
    has heard it for rejoin_after_s; the load sees nothing. A host stepped down by
    `coral promote` stays out (its operator is at work) and says how it comes back."""
    pair = rejoining_pair
    runs = start_load(pair, seconds=10)
    wait_replicating(pair, 8)
    frozen_pid = pair.status("primary")["pid"]
    pair.lab.crash("primary", "freeze")
    pair.wait("backup", {"simplex"}, 10)
    pair.lab.heal("primary")
    pair.wait_restarted("primary", frozen_pid, 20)
    pair.wait("primary", {"duplex"}, 20)
    status = pair.wait("backup", {"duplex"}, 20)
    assert status["services"][0]["role"] == "primary", status["services"]
    log = pair.log("primary").read_text()
    assert f"served alone for {REJOIN_AFTER_S} s: rejoining" in log, log[-3000:]
    check_load(runs, pair.lab)

    promote = coral("promote", "--socket", str(pair.socket("primary")))
    assert promote.returncode == 0, promote.stderr
    stepped_down = pair.wait("backup", {"fenced"}, 10)
    assert stepped_down["auto_rejoin"] is None, stepped_down
    shown = coral("status", "--socket", str(pair.socket("backup"))).stdout
    assert "bring it back with `coral reintegrate`" in shown, shown
    status = pair.reintegrate("backup")
    assert status["host"] == "primary" and status["services"][0]["role"] == "primary"
