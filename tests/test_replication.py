"""Connection replication end to end, in the lab: real kernels, real clients.

A pair (coral.lab.pair) runs the data plane on primary and backup; the same
program serves on both. The tests prove the issue's claims: the backup's
kernel carries the primary's sequence numbers, streams survive either host's
crash byte-exact (with and without loss on every path of CoRAL's Table
4.2), an acknowledged client byte is always held by the backup, and no
exchange waits for a retransmission timer.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from coral import netns, stream, tcpstate
from coral.bpf.structs import ConnFlag, ConnKey, Mode
from coral.dataplane.plane import SOCKOPS_LINK
from coral.lab import Lab
from coral.lab.lab import ToolRun
from coral.lab.loss import inject
from coral.lab.pair import HOSTS, Pair
from coral.lab.topology import CLIENT_IF, LAN_IF, SERVICE_PORT, SERVICE_VIP, fresh_name

pytestmark = pytest.mark.root

VIP, PORT = SERVICE_VIP, SERVICE_PORT
MB = 2**20


@pytest.fixture
def pair() -> Iterator[Pair]:
    lab = Lab.up(fresh_name(), clients=2)
    try:
        p = Pair.up(lab)
        try:
            yield p
        finally:
            p.close()
    finally:
        lab.down()


def wait_for(
    cond: Callable[[], bool], timeout: float, what: str, seen: Callable[[], object] = lambda: ""
) -> None:
    """Poll COND until true; fail with WHAT (and what SEEN returns) after TIMEOUT seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; saw {seen()}")
        time.sleep(0.01)


def listen(pair: Pair, host: str, rcvbuf: int | None = None) -> socket.socket:
    """A listening socket on VIP:PORT inside HOST, owned by this test."""

    def make() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.bind((VIP, PORT))
        s.listen()
        s.settimeout(10)
        return s

    return netns.call_in_netns(pair.lab.namespace(host), make)


def connect(pair: Pair, client: str) -> socket.socket:
    def make() -> socket.socket:
        return socket.create_connection((VIP, PORT), timeout=10)

    return netns.call_in_netns(pair.lab.namespace(client), make)


def accept_both(pair: Pair, client: str, **listen_args: int) -> tuple[socket.socket, ...]:
    """A client connection and its server side on the primary and on the backup."""
    listeners = [listen(pair, h, **listen_args) for h in HOSTS]
    try:
        conn = connect(pair, client)
        primary, _ = listeners[0].accept()
        backup, _ = listeners[1].accept()  # exists only if the backup adopted
    finally:
        for s in listeners:
            s.close()
    for s in (conn, primary, backup):
        s.settimeout(10)
    return conn, primary, backup


def recv_exactly(s: socket.socket, n: int) -> bytes:
    return stream._recv_exact(s, n)


def test_backup_kernel_carries_the_primarys_numbers(pair: Pair) -> None:
    """Adoption: one sequence and timestamp space, with the hosts' own settings apart."""
    conn, primary, backup = accept_both(pair, "client1")
    with conn, primary, backup:
        counters = pair.planes["backup"].counters()
        assert counters["PASS_ADOPTED"].packets == 1
        assert counters["DROP_SYN_HELD"].packets >= 1
        request = bytes(range(256)) * 64
        conn.sendall(request)
        assert recv_exactly(primary, len(request)) == request
        assert recv_exactly(backup, len(request)) == request
        reply = bytes(reversed(range(256))) * 64
        backup.sendall(reply)  # the backup's copy goes first: suppressed
        primary.sendall(reply)
        assert recv_exactly(conn, len(reply)) == reply
        wait_for(
            lambda: tcpstate.unacked(primary) == 0 and tcpstate.unacked(backup) == 0,
            5,
            "both send queues acknowledged by the client",
        )
        assert tcpstate.seqs(primary) == tcpstate.seqs(backup), "one sequence space"
        drift = abs(tcpstate.timestamp(primary) - tcpstate.timestamp(backup))
        assert drift <= 5, f"timestamp clocks {drift} ms apart"
        # The lab forces the clocks apart: without adoption they would differ.
        assert pair.lab.run("primary", ["sysctl", "-n", "net.ipv4.tcp_timestamps"]).stdout != (
            pair.lab.run("backup", ["sysctl", "-n", "net.ipv4.tcp_timestamps"]).stdout
        )


def defeat_clamp(pair: Pair, conn: socket.socket) -> None:
    """Make the primary's clamp for CONN's connection a no-op, as if it had been
    removed: the backup's acknowledgement recorded far ahead (reports only ever
    raise it) and its window wide open."""
    client_ip, client_port = conn.getsockname()
    maps = pair.planes["primary"].maps
    key = ConnKey.of(client_ip, client_port, VIP, PORT)
    state = maps.conns.get(key)
    assert state is not None
    state.flags |= ConnFlag.BACKUP_SEEN
    state.backup_ack = (state.client_isn + 2**30) % 2**32
    state.backup_win = 2**30
    maps.conns.put(key, state)


def test_acknowledged_client_bytes_are_held_by_the_backup(pair: Pair) -> None:
    """The clamp: the client never sees acknowledged a byte the backup's kernel
    lacks, also when the backup's receive buffer is full (its application does
    not read). The same run with the clamp defeated must break the rule, so the
    check can fail."""

    def push(conn: socket.socket, backup: socket.socket) -> tuple[int, int]:
        """Send until the client is blocked; return (acked to client, held by backup)."""
        conn.setblocking(False)
        sent, chunk = 0, b"x" * 65536
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and sent < 16 * MB:
            try:
                sent += conn.send(chunk)
            except BlockingIOError:
                time.sleep(0.01)
        acked = sent - tcpstate.unacked(conn)  # acked first: held can only grow after
        held = len(backup.recv(64 * MB, socket.MSG_PEEK))
        return acked, held

    def drain(primary: socket.socket, stop: threading.Event) -> None:
        primary.settimeout(0.1)
        while not stop.is_set():
            try:
                if not primary.recv(1 << 20):
                    return
            except TimeoutError:
                pass

    for clamp in (True, False):
        conn, primary, backup = accept_both(pair, "client1", rcvbuf=64 * 1024)
        if not clamp:
            defeat_clamp(pair, conn)
        stop = threading.Event()
        reader = threading.Thread(target=drain, args=(primary, stop))
        reader.start()
        try:
            acked, held = push(conn, backup)
        finally:
            stop.set()
            reader.join()
            for s in (conn, primary, backup):
                s.close()
        assert acked > 0, "the client made progress"
        if clamp:
            assert acked <= held, f"client saw {acked} bytes acknowledged, backup holds {held}"
        else:
            assert acked > held, "without the clamp the check must catch the violation"


def test_a_window_the_backup_reopens_reaches_the_client_at_once(pair: Pair) -> None:
    """The backup's application stops reading, its window closes, the client is held
    (the clamp) and probes the zero window with backed-off timers. When the backup
    reads again, its window update (suppressed, a report to the primary) must reach
    the client at once: before the fix it waited for the client's next probe, 3.2 s
    and more after this stall (a stream stalled for seconds)."""
    size = 2 * MB
    conn, primary, backup = accept_both(pair, "client1", rcvbuf=64 * 1024)
    with conn, primary, backup:
        sender = threading.Thread(target=conn.sendall, args=(b"w" * size,), daemon=True)
        reader = threading.Thread(target=recv_exactly, args=(primary, size), daemon=True)
        sender.start()
        reader.start()

        def backoff() -> int:  # tcpi_backoff: the client's zero-window probes so far
            return conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[4]

        wait_for(lambda: backoff() >= 4, 20, "the client probing a closed window 4 times")
        reopened = time.monotonic()
        assert recv_exactly(backup, size) == b"w" * size
        sender.join(10)
        reader.join(10)
        took = time.monotonic() - reopened
        assert not sender.is_alive() and not reader.is_alive(), "the stream never finished"
        assert took < 1.5, f"the client resumed {took:.2f} s after the window opened"
        assert pair.planes["primary"].counters()["PASS_WINDOW_OPENED"].packets > 0


def test_no_exchange_waits_for_a_retransmission_timer(pair: Pair) -> None:
    """Request-reply in duplex: the client's request bytes are acknowledged as soon as
    the backup holds them (a raised ACK), never after the client retransmits."""
    conn, primary, backup = accept_both(pair, "client1")
    with conn, primary, backup:
        for i in range(100):
            request = i.to_bytes(4, "big") * 25
            conn.sendall(request)
            for server in (primary, backup):
                assert recv_exactly(server, len(request)) == request
                server.sendall(request[::-1])
            assert recv_exactly(conn, len(request)) == request[::-1]
        wait_for(lambda: tcpstate.unacked(conn) == 0, 1.0, "the last request acknowledged")
        info = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        total_retrans = int.from_bytes(info[100:104], "little")
        assert total_retrans == 0, f"the client retransmitted {total_retrans} segments"
        assert pair.planes["primary"].counters()["PASS_RAISED_ACK"].packets > 0


def rto_ms(s: socket.socket) -> float:
    """The socket's current retransmission timeout (tcp_info.tcpi_rto)."""
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 16)
    return int.from_bytes(info[8:12], "little") / 1000


@pytest.mark.parametrize("rto_min_ms", [0.0, 40.0])
def test_service_sockets_take_the_configured_minimum_rto(rto_min_ms: float) -> None:
    """The socket program lowers the minimum RTO of both hosts' service sockets (so the
    survivor of a failover resends sooner), and of nothing else."""
    lab = Lab.up(fresh_name(), clients=1)
    try:
        pair = Pair.up(lab, rto_min_ms=rto_min_ms)
        try:
            conn, primary, backup = accept_both(pair, "client1")
            with conn, primary, backup:
                for i in range(40):  # the RTO decays toward the minimum, a quarter per RTT
                    conn.sendall(i.to_bytes(4, "big"))
                    for server in (primary, backup):
                        assert recv_exactly(server, 4) == i.to_bytes(4, "big")
                        server.sendall(b"reply %d" % i)
                    assert recv_exactly(conn, len(b"reply %d" % i)) == b"reply %d" % i
                rtos = {"primary": rto_ms(primary), "backup": rto_ms(backup)}
                assert rto_ms(conn) >= 200, "a client socket keeps the kernel's minimum"
                if rto_min_ms:
                    assert all(rto_min_ms <= r < 100 for r in rtos.values()), rtos
                else:
                    assert all(r >= 200 for r in rtos.values()), rtos
        finally:
            pair.close()
        links = [lab.bpffs / h / SOCKOPS_LINK for h in HOSTS]
        assert all(link.exists() == bool(rto_min_ms) for link in links)
        ids = [link_id(link) for link in links if link.exists()]
    finally:
        lab.down()
    for i in ids:  # the lab's teardown (its bpffs unmounted) detached the program
        shown = subprocess.run(["bpftool", "link", "show", "id", str(i)], capture_output=True)
        assert shown.returncode != 0, f"link {i} outlived the lab: {shown.stdout!r}"


def link_id(pin: Path) -> int:
    shown = subprocess.run(
        ["bpftool", "--json", "link", "show", "pinned", str(pin)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(json.loads(shown.stdout)["id"])


# ---- streams across a crash ------------------------------------------------

STREAMS_PER_CLIENT = 2
STREAM_BYTES = 50 * MB


def start_streams(pair: Pair, size: int) -> list[ToolRun]:
    args = ("--streams", str(STREAMS_PER_CLIENT), "--up", str(size), "--down", str(size))
    return [
        pair.lab.start_tool(client, "stream", "run", f"{VIP}:{PORT}", *args, "--timeout", "60")
        for client in ("client1", "client2")
    ]


def start_servers(pair: Pair) -> None:
    pair.start(
        lambda host: [
            *(sys.executable, "-m", "coral", "stream", "serve", f"{VIP}:{PORT}"),
            *("--pin-dir", str(pair.pin_dir(host))),
        ]
    )
    for host in HOSTS:
        assert netns.wait_tcp(pair.lab.namespace(host), VIP, PORT, 10), f"server on {host}"


def check_streams(runs: list[ToolRun]) -> None:
    for run in runs:
        report = run.result(timeout=180)
        assert report["ok"], json.dumps(report)[:2000]


def short_connections(pair: Pair, stop: threading.Event, results: list[dict[str, object]]) -> None:
    """Open short streams from client2 until STOP: each completes or fails cleanly."""
    argv = [sys.executable, "-m", "coral", "stream", "run", f"{VIP}:{PORT}", "--streams", "3",
            "--up", "20000", "--down", "20000", "--timeout", "15"]  # fmt: skip
    while not stop.is_set():
        out = pair.lab.run("client2", argv, check=False, timeout=60).stdout
        results.extend(json.loads(out)["streams"])


@pytest.mark.parametrize(
    ("victim", "mode", "loss"),
    [
        (victim, mode, loss)
        for loss in (0.0, 1.0)
        for victim in ("primary", "backup")
        for mode in ("kill", "link")
    ],
)
def test_streams_survive_a_crash(pair: Pair, victim: str, mode: str, loss: float) -> None:
    """Several clients stream 50 MB up and down at once; one host fails mid-stream;
    every stream completes byte-exact. With LOSS %, every path of CoRAL Table 4.2
    loses packets on its receiving side: client to backup, backup to primary
    (copies and reports), primary to client (data and acknowledgements)."""
    start_servers(pair)
    losses = [
        inject(pair.lab.namespace(host), ifname, loss, VIP)
        for host, ifname in (("backup", LAN_IF), ("primary", LAN_IF), ("client1", CLIENT_IF),
                             ("client2", CLIENT_IF))
    ] if loss else []  # fmt: skip
    runs = start_streams(pair, STREAM_BYTES)
    stop, short = threading.Event(), list[dict[str, object]]()
    opener = threading.Thread(target=short_connections, args=(pair, stop, short))
    try:
        pair.wait_progress(2 * STREAMS_PER_CLIENT, 10 * MB, timeout=60)
        opener.start()
        pair.crash(victim, mode)
        check_streams(runs)
    finally:
        stop.set()
        if opener.is_alive():
            opener.join()
        for run in runs:
            run.proc.kill()
            run.proc.wait()
    for loss_ in losses:
        dropped, seen = loss_.stats()
        assert dropped > 0 and seen > dropped, "loss was really injected"
        loss_.remove()
    assert short, "connections were opened around the crash"
    # Each completed, or was refused at connect; none hung, none broke midway.
    errors = [str(s["error"]) for s in short if s["error"]]
    bad = [e for e in errors if not e.startswith("connect:") or "timed out" in e]
    assert not bad, json.dumps(bad)[:2000]
    survivor = "backup" if victim == "primary" else "primary"
    assert pair.planes[survivor].mode(VIP, PORT) == Mode.SIMPLEX


def test_a_loss_only_the_backups_kernel_suffers_is_repaired(pair: Pair) -> None:
    """The backup's kernel loses a burst of client segments the primary holds
    (dropped in its INPUT chain for a moment, after the data plane copied them):
    the client repairs it by a retransmission timeout and must then be told
    nothing that makes it undo its recovery. With the primary's timestamp echo
    (or its D-SACK) passed to the client, it did, and streams stalled
    (docs/design.md, "A stall that was")."""
    start_servers(pair)
    args = ("--streams", "2", "--up", str(STREAM_BYTES), "--down", str(MB), "--timeout", "60")
    run = pair.lab.start_tool("client1", "stream", "run", f"{VIP}:{PORT}", *args)
    rule = ["INPUT", "-p", "tcp", "--dport", str(PORT), "-j", "DROP"]
    try:
        pair.wait_progress(2, MB // 2, timeout=30)
        pair.lab.run("backup", ["iptables", "-I", *rule])
        time.sleep(0.05)
        pair.lab.run("backup", ["iptables", "-D", *rule])
        report = run.result(timeout=90)
    finally:
        run.proc.kill()
        run.proc.wait()
    assert report["ok"], json.dumps(report)[:2000]
    # A retransmission timeout or two, never a backed-off series of them.
    seconds = max(s["seconds"] for s in report["streams"])
    assert seconds < 20, f"streams took {seconds:.1f} s: {json.dumps(report)[:2000]}"


def send_syns(lab: Lab, client: str, count: int) -> None:
    """COUNT SYNs to the service from CLIENT, from ports no socket owns (a flood)."""
    from scapy.layers.inet import IP, TCP

    src = lab.topo.address(client)

    def flood() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP) as s:
            for port in range(20000, 20000 + count):
                packet = bytes(IP(src=src, dst=VIP) / TCP(sport=port, dport=PORT, flags="S"))
                s.sendto(packet[20:], (VIP, 0))  # the kernel writes the IP header

    netns.call_in_netns(lab.namespace(client), flood)


def test_syn_flood_never_evicts_established_connections() -> None:
    """With the connection table full, new connections are served by the backup alone
    and counted; established replicated connections keep working."""
    lab = Lab.up(fresh_name(), clients=2)
    try:
        pair = Pair.up(lab, capacity=8)
        try:
            conn, primary, backup = accept_both(pair, "client1")
            with conn, primary, backup:
                send_syns(lab, "client2", 50)
                wait_for(
                    lambda: pair.planes["backup"].counters()["PASS_SIMPLEX_FULL"].packets >= 40,
                    5,
                    "flood SYNs beyond the table served simplex",
                    lambda: pair.planes["backup"].counters(),
                )
                established = (conn.getsockname()[1], VIP)
                assert any(
                    (c.client_port, c.vip) == established
                    for c in pair.planes["backup"].connections()
                ), "the established connection is still replicated"
                conn.sendall(b"still here")
                for server in (primary, backup):
                    assert recv_exactly(server, 10) == b"still here"
            # A new connection while the table is full: the backup alone serves it.
            listener = listen(pair, "backup")
            with listener:
                late = connect(pair, "client1")
                served, _ = listener.accept()
                with late, served:
                    late.sendall(b"ping")
                    assert recv_exactly(served, 4) == b"ping"
                    served.sendall(b"pong")
                    assert recv_exactly(late, 4) == b"pong"
        finally:
            pair.close()
    finally:
        lab.down()
