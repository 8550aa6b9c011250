"""Request/reply logging end to end: the replicating proxy on both hosts of a lab
pair, in front of the real Apache, with a real client on a real socket.

For each phase in which a host can fail, the client gets exactly one complete,
correct reply (checked against coral/content.py, digests included) and its
connection goes on serving requests. Each test proves its phase was reached:
the primary's proxy announces a deliberate pause point (cfg.pause_at) and
waits there; the client-driven phases are proven by the client's own state
(bytes acknowledged, replies read). Which host generated a non-deterministic
reply is read from the Apache access logs: once the primary logged a reply,
the client must get that one, never a second generation.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from httpwire import Replies, get, read_replies

from coral import netns, tcpstate
from coral.content import verify_reply
from coral.lab import Lab
from coral.lab.loss import inject
from coral.lab.pair import HOSTS, LOG_PORT, Pair, peer_of
from coral.lab.topology import CLIENT_IF, PRIVATE_IPS, SERVICE_PORT, SERVICE_VIP, fresh_name
from proxy.replication import Phase

pytestmark = pytest.mark.root

VIP, PORT = SERVICE_VIP, SERVICE_PORT
RANDOM = "/cgi-bin/random?n={n}&rid={rid}"
REPLY_TIMEOUT = 15.0
"""A failover plus the TCP timer that resends what the client has not acknowledged."""


@pytest.fixture
def pair() -> Iterator[Pair]:
    lab = Lab.up(fresh_name("pp"), clients=1)
    try:
        p = Pair.up(lab)
        try:
            yield p
        finally:
            p.close()
    finally:
        lab.down()


def client(pair: Pair) -> socket.socket:
    def make() -> socket.socket:
        return socket.create_connection((VIP, PORT), timeout=REPLY_TIMEOUT)

    return netns.call_in_netns(pair.lab.namespace("client1"), make)


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def wait_paused(pair: Pair, phase: Phase) -> None:
    log = pair.service_log("primary")
    wait_for(lambda: f"paused at {phase}" in log.read_text(), 10, f"the primary to reach {phase}")


def executions(pair: Pair, host: str, rid: str) -> int:
    """How many times HOST's Apache executed the request with id RID."""
    log = pair.lab.dir / host / "apache" / "logs" / "access.log"
    return log.read_text().count(f"rid={rid} ")


def check(replies: Replies, targets: list[str], bodies: list[bytes] | None = None) -> None:
    assert len(replies.items) == len(targets), f"{len(replies.items)} replies to {targets}"
    for i, (reply, target) in enumerate(zip(replies.items, targets, strict=True)):
        body = bodies[i] if bodies else b""
        why = verify_reply(target, body, reply.status, reply.headers, reply.body)
        assert why is None, f"reply to {target}: {why}"


def go_on(sock: socket.socket) -> None:
    """The connection still serves: one more request, then a clean end (FIN, no reset,
    not one byte more than the replies asked for)."""
    target = RANDOM.format(n=5000, rid="after")
    sock.sendall(get(target))
    check(read_replies(sock, 1), [target])
    sock.shutdown(socket.SHUT_WR)
    rest = read_replies(sock, 0, until_eof=True)
    assert rest.eof and not rest.raw, f"after the last reply: {rest.raw[:200]!r}"


PAUSED = [Phase.REQUEST_READ, Phase.REPLY_RECEIVED, Phase.REPLY_LOGGED, Phase.REPLY_PARTIAL]
LOGGED = {Phase.REPLY_LOGGED, Phase.REPLY_PARTIAL}
"""Phases in which the backup holds the primary's reply: a failover must not regenerate it."""


@pytest.mark.parametrize("victim", HOSTS)
@pytest.mark.parametrize("phase", PAUSED)
def test_crash_in_phase(pair: Pair, victim: str, phase: Phase) -> None:
    pair.start_proxies("--pause-at", phase)
    rid = f"{phase}-{victim}"
    target = RANDOM.format(n=300_000, rid=rid)
    with client(pair) as sock:
        sock.sendall(get(target))
        wait_paused(pair, phase)
        pair.crash(victim, "kill")
        check(read_replies(sock, 1), [target])
        go_on(sock)
    # The primary executed it unless it died before forwarding; the backup only
    # when the primary died without having logged a reply.
    expected = {
        "primary": int(victim == "backup" or phase != Phase.REQUEST_READ),
        "backup": int(victim == "primary" and phase not in LOGGED),
    }
    assert {h: executions(pair, h, rid) for h in HOSTS} == expected


@pytest.mark.parametrize("victim", HOSTS)
def test_crash_during_incomplete_request(pair: Pair, victim: str) -> None:
    pair.start_proxies()
    body = bytes(range(256)) * 200
    head = (
        f"POST /cgi-bin/echo?rid=inc-{victim} HTTP/1.1\r\nHost: t\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    first = head + body[:10_000]
    with client(pair) as sock:
        sock.sendall(first)
        # The phase: the backup's kernel holds (and the client saw acknowledged)
        # the first part of the request, the rest is not sent yet.
        wait_for(lambda: held_by_backup(pair) >= len(first), 10, "the backup to hold the part")
        pair.crash(victim, "kill")
        sock.sendall(body[10_000:])
        check(read_replies(sock, 1), [f"/cgi-bin/echo?rid=inc-{victim}"], [body])
        go_on(sock)


def held_by_backup(pair: Pair) -> int:
    """Client bytes of the (one) replicated connection the backup holds, as the primary
    knows them."""
    conns = pair.planes["primary"].connections()
    return max(((c.backup_ack - c.client_isn - 1) % 2**32 for c in conns), default=0)


@pytest.mark.parametrize("victim", HOSTS)
def test_crash_between_requests(pair: Pair, victim: str) -> None:
    pair.start_proxies()
    first = RANDOM.format(n=20_000, rid=f"between1-{victim}")
    with client(pair) as sock:
        sock.sendall(get(first))
        check(read_replies(sock, 1), [first])  # the phase: a reply read, nothing asked
        pair.crash(victim, "kill")
        go_on(sock)


@pytest.mark.parametrize("victim", HOSTS)
def test_crash_with_pipelined_requests(pair: Pair, victim: str) -> None:
    pair.start_proxies("--pause-at", Phase.REPLY_LOGGED)
    targets = [RANDOM.format(n=40_000 * (i + 1), rid=f"pipe{i}-{victim}") for i in range(3)]
    with client(pair) as sock:
        sock.sendall(b"".join(get(t) for t in targets))
        wait_paused(pair, Phase.REPLY_LOGGED)  # request 1 logged, 2 and 3 outstanding
        pair.crash(victim, "kill")
        check(read_replies(sock, 3), targets)
        go_on(sock)
    # Request 1 was logged by the primary: never regenerated, whoever survived.
    assert executions(pair, "backup", f"pipe0-{victim}") == 0


@pytest.mark.parametrize("victim", HOSTS)
def test_proxy_crash_is_picked_up_by_the_peer(pair: Pair, victim: str) -> None:
    pair.start_proxies()
    first = RANDOM.format(n=20_000, rid=f"proxy-{victim}")
    with client(pair) as sock:
        sock.sendall(get(first))
        check(read_replies(sock, 1), [first])
        proc = pair.service(victim)
        proc.send_signal(signal.SIGKILL)  # the proxy alone dies; its kernel lives on
        proc.wait(5)
        pair.fail_over(victim)  # the agent's verdict: that host failed
        go_on(sock)


def test_close_with_unread_pipelined_data_sends_no_reset(pair: Pair) -> None:
    pair.start_proxies()
    last = get("/static/1k.bin", "Connection: close\r\n")
    with client(pair) as sock:
        sock.sendall(last + get("/static/15k.bin") * 3)
        replies = read_replies(sock, 1, until_eof=True)  # a reset raises here
        assert replies.eof and len(replies.items) == 1
        check(replies, ["/static/1k.bin"])


def test_bad_request_gets_one_400_and_others_go_on(pair: Pair) -> None:
    pair.start_proxies()
    with client(pair) as good, client(pair) as bad:
        good.sendall(get("/static/1k.bin"))
        check(read_replies(good, 1), ["/static/1k.bin"])
        bad.sendall(b"GARBAGE / NOT-HTTP\r\n\r\n")
        replies = read_replies(bad, 1, until_eof=True)
        assert [r.status for r in replies.items] == [400] and replies.eof
        pair.crash("primary", "kill")  # the backup mirrored the close: no second answer
        go_on(good)


def test_replicating_proxies_report_their_roles(pair: Pair) -> None:
    pair.start_proxies()
    with client(pair) as sock:
        sock.sendall(get("/static/50k.bin"))
        check(read_replies(sock, 1), ["/static/50k.bin"])
    for host in HOSTS:
        pair.service(host).send_signal(signal.SIGUSR1)
    stats = {host: last_stats(pair, host) for host in HOSTS}
    assert stats["primary"]["replication"]["role"] == "primary"
    assert stats["backup"]["replication"]["role"] == "backup"
    assert stats["backup"]["replication"]["records"] >= 1
    assert stats["backup"]["requests"] == 0  # the backup executed nothing itself


@pytest.mark.parametrize("slow", HOSTS)
def test_a_connection_just_after_a_rejoin_takes_the_new_roles(pair: Pair, slow: str) -> None:
    """A re-integration forms a new pair: the host that served alone (the old
    backup) becomes the primary, the returning host the backup. SLOW's proxy reads
    the mode only hourly, so only its read at accept tells it of the new pair.
    Before that read, a slow joiner took the connection as its primary: the real
    primary waited for its log acknowledgements and the client never got a reply
    (seen once in CI, under load); a slow survivor served the connection
    unreplicated."""
    pair.fail_over("primary")  # the backup serves alone
    pair.start_proxies("--mode-poll-interval", "3600", hosts=(slow,))
    pair.start_proxies(hosts=(peer_of(slow),))
    pair.rejoin("primary")
    quick = peer_of(slow)  # the roles swapped: host "backup" is now the primary
    wait_for(lambda: role_now(pair, quick) == peer_of(quick), 5, f"{quick}'s proxy to follow")
    target = RANDOM.format(n=3000, rid="rejoined")
    with client(pair) as sock:
        sock.sendall(get(target))
        check(read_replies(sock, 1), [target])
    stats = {host: stats_now(pair, host) for host in HOSTS}
    assert stats["backup"]["replication"]["role"] == "primary", stats
    assert stats["primary"]["replication"]["role"] == "backup", stats
    assert stats["primary"]["replication"]["records"] >= 1, stats  # the reply was logged
    assert stats["primary"]["requests"] == 0, stats  # the new backup executed nothing


def stats_now(pair: Pair, host: str) -> dict[str, Any]:
    """HOST's proxy's counters as of now (asked for with SIGUSR1)."""
    log = pair.service_log(host)
    before = log.read_text().count('{"connections"')
    pair.service(host).send_signal(signal.SIGUSR1)
    wait_for(lambda: log.read_text().count('{"connections"') > before, 5, f"{host}'s counters")
    return last_stats(pair, host)


def role_now(pair: Pair, host: str) -> str:
    return str(stats_now(pair, host)["replication"]["role"])


def last_stats(pair: Pair, host: str) -> dict[str, Any]:
    log = pair.service_log(host)
    wait_for(lambda: '{"connections"' in log.read_text(), 5, f"{host}'s counters")
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith('{"connections"')]
    stats: dict[str, Any] = json.loads(lines[-1])
    return stats


def test_forged_logging_peer_is_refused(pair: Pair) -> None:
    pair.start_proxies()
    forged = pair.lab.run("primary", [sys.executable, "-c", FORGED_PEER], check=False)
    assert forged.stdout.startswith("refused:"), forged.stdout + forged.stderr
    with client(pair) as sock:  # and the pair serves on
        sock.sendall(get("/static/1k.bin"))
        check(read_replies(sock, 1), ["/static/1k.bin"])


FORGED_PEER = f"""
import asyncio
from proxy.logchannel import ChannelError, PrimaryChannel
async def main():
    try:
        await PrimaryChannel.connect("{PRIVATE_IPS["backup"]}", {LOG_PORT}, b"x" * 32)
    except ChannelError as e:
        print("refused:", e)
asyncio.run(main())
"""


def apache_saw(pair: Pair, host: str, path: str) -> int:
    log = pair.lab.dir / host / "apache" / "logs" / "access.log"
    return log.read_text().count(f"GET {path} ")


@pytest.mark.parametrize("sync", [False, True], ids=["deterministic", "sync-static"])
@pytest.mark.parametrize("victim", HOSTS)
def test_deterministic_content_survives_a_crash(pair: Pair, victim: str, sync: bool) -> None:
    options = ["--deterministic", "/static/", "--pause-at", Phase.REPLY_PARTIAL]
    pair.start_proxies(*options, *(["--sync-static"] if sync else []))
    path = "/static/1m.bin"
    with client(pair) as sock:
        sock.sendall(get(path))
        wait_paused(pair, Phase.REPLY_PARTIAL)
        # The phase is the deterministic path: the backup generates the body itself.
        wait_for(lambda: apache_saw(pair, "backup", path) == 1, 10, "the backup to generate")
        pair.crash(victim, "kill")
        check(read_replies(sock, 1), [path])
        go_on(sock)
    survivor = "backup" if victim == "primary" else "primary"
    pair.service(survivor).send_signal(signal.SIGUSR1)
    counts = last_stats(pair, survivor)["replication"]
    if survivor == "backup":
        assert counts["generated"] == 1 and counts["generated_mismatch"] == 0, counts
    else:
        assert counts["digest_records"] == 1, counts


@pytest.mark.parametrize("sync", [False, True], ids=["deterministic", "sync-static"])
def test_a_body_that_is_not_deterministic_is_never_mixed(pair: Pair, sync: bool) -> None:
    """Content configured as deterministic that is not (the hosts' copies of a file
    differ): the backup's own body fails the logged digest and is never written.
    With sync-static the primary then logs the real body, and a crash of the
    primary goes unnoticed; without it the primary did not wait, so the backup
    aborts the connection at failover rather than send another generation's
    bytes (the client's next segment is answered with a reset)."""
    path = "/static/1m.bin"
    copy = pair.lab.dir / "backup" / "apache" / "htdocs" / path.lstrip("/")
    copy.write_bytes(b"\0" * len(copy.read_bytes()))
    options = ["--deterministic", "/static/", *(["--sync-static"] if sync else [])]
    pair.start_proxies(*options, "--pause-at", Phase.REPLY_PARTIAL)
    with client(pair) as sock:
        sock.sendall(get(path))
        wait_paused(pair, Phase.REPLY_PARTIAL)
        pair.crash("primary", "kill")
        if sync:
            check(read_replies(sock, 1), [path])
            go_on(sock)
        else:
            wait_for(lambda: "aborted" in pair.service_log("backup").read_text(), 10, "abort")
            sock.sendall(get(path))
            with pytest.raises(ConnectionResetError):
                read_replies(sock, 1)
    pair.service("backup").send_signal(signal.SIGUSR1)
    counts = last_stats(pair, "backup")["replication"]
    assert counts["generated_mismatch"] == 1, counts
    assert counts["diverged"] == (0 if sync else 1), counts


@pytest.mark.parametrize("victim", HOSTS)
def test_crash_after_a_complete_request_not_yet_acknowledged(pair: Pair, victim: str) -> None:
    pair.start_proxies("--pause-at", Phase.REQUEST_READ)
    target = RANDOM.format(n=30_000, rid=f"unacked-{victim}")
    request = get(target)
    with client(pair) as sock:
        # Everything the service sends the client is lost for a while: the
        # request arrives whole, but the client never sees it acknowledged.
        loss = inject(pair.lab.namespace("client1"), CLIENT_IF, 100, VIP)
        try:
            sock.sendall(request)
            wait_paused(pair, Phase.REQUEST_READ)
            assert tcpstate.unacked(sock) == len(request), "the request was acknowledged"
            pair.crash(victim, "kill")
        finally:
            loss.remove()
        check(read_replies(sock, 1), [target])
        go_on(sock)


PARTS = (b"coral " * 500, b"x" * 7)
CHUNKED = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in PARTS) + b"0\r\n\r\n"


@pytest.mark.parametrize("victim", HOSTS)
def test_chunked_request_survives_a_crash(pair: Pair, victim: str) -> None:
    pair.start_proxies("--pause-at", Phase.REQUEST_READ)
    target = f"/cgi-bin/echo?rid=chunked-{victim}"
    head = f"POST {target} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    with client(pair) as sock:
        sock.sendall(head.encode() + CHUNKED)
        wait_paused(pair, Phase.REQUEST_READ)
        pair.crash(victim, "kill")
        check(read_replies(sock, 1), [target], [b"".join(PARTS)])
        go_on(sock)


BAD_INPUT = {
    "400": ([], b"GET / HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n"),
    "431": ([], b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"),
    "413": (["--max-body-bytes", "1000"], b"POST / HTTP/1.1\r\nContent-Length: 5000\r\n\r\n"),
    "408": (["--request-timeout", "0.5"], b"GET / HTTP/1.1\r\nHost: t\r\n"),
}


@pytest.mark.parametrize("status", BAD_INPUT)
def test_bad_input_is_answered_by_the_primary_and_mirrored(pair: Pair, status: str) -> None:
    """The primary alone decides the error reply and the close; the backup mirrors
    both from the log (two records) and answers nothing itself (its own timers
    are off): the client sees one error reply, then a clean end."""
    options, data = BAD_INPUT[status]
    pair.start_proxies(*options)
    with client(pair) as sock:
        sock.sendall(data)
        replies = read_replies(sock, 1, until_eof=True)
        assert [r.status for r in replies.items] == [int(status)] and replies.eof
    pair.service("backup").send_signal(signal.SIGUSR1)
    counts = last_stats(pair, "backup")
    assert counts["errors"] == {} and counts["replication"]["records"] == 2, counts


def test_backend_down_gives_502_from_the_primary_only(pair: Pair) -> None:
    pair.start_proxies()
    pair.lab.stop_apache("primary")
    with client(pair) as sock:
        sock.sendall(get("/static/1k.bin"))
        replies = read_replies(sock, 1, until_eof=True)
        assert [r.status for r in replies.items] == [502] and replies.eof
    assert apache_saw(pair, "backup", "/static/1k.bin") == 0


def test_idle_client_is_closed_by_the_primary_without_reset(pair: Pair) -> None:
    pair.start_proxies("--idle-timeout", "0.5")
    with client(pair) as sock:
        sock.sendall(get("/static/1k.bin"))
        replies = read_replies(sock, 1, until_eof=True)  # then idle: the primary closes
        assert len(replies.items) == 1 and replies.eof


@pytest.mark.parametrize("deterministic", [True, False], ids=["static", "random"])
def test_reply_above_the_buffered_size_follows_its_rule(pair: Pair, deterministic: bool) -> None:
    """A reply longer than --max-buffered-reply is logged and sent in pieces. The
    primary dies after its first piece is logged and half sent: the backup
    re-executes the request and continues only if the new reply starts with the
    logged bytes (the static file), else resets the connection (the random
    CGI): a short reply the client detects, never two generations mixed."""
    pair.start_proxies("--max-buffered-reply", "65536", "--pause-at", Phase.REPLY_PARTIAL)
    target = "/static/1m.bin" if deterministic else RANDOM.format(n=1_000_000, rid="big")
    with client(pair) as sock:
        sock.sendall(get(target))
        wait_paused(pair, Phase.REPLY_PARTIAL)
        pair.crash("primary", "kill")
        if deterministic:
            check(read_replies(sock, 1), [target])
            go_on(sock)
        else:
            assert_cut_short(sock)
    pair.service("backup").send_signal(signal.SIGUSR1)
    counts = last_stats(pair, "backup")["replication"]
    assert counts["regenerated_mismatch"] == (0 if deterministic else 1), counts


def assert_cut_short(sock: socket.socket) -> None:
    """The connection ends (reset, or end of stream) before any reply is complete."""
    got = Replies()
    sock.settimeout(REPLY_TIMEOUT)
    try:
        while data := sock.recv(65536):
            got.parser.feed_data(data)
    except ConnectionResetError:
        pass
    assert got.complete == 0, "a reply was completed"
