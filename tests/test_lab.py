"""The lab: built and removed cleanly, real Apache reachable, faults that act."""

from __future__ import annotations

import http.client
import json
import os
import secrets
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from coral import content, netns
from coral.lab import Lab, LabError, remove_lab
from coral.lab.lab import lab_names
from coral.lab.topology import APACHE_PORT, SERVER_HOSTS, SERVER_LAN_IPS, fresh_name

pytestmark = pytest.mark.root

CORAL = [sys.executable, "-m", "coral"]


def fetch(
    lab: Lab, host: str, ip: str, target: str, body: bytes | None = None, timeout: float = 5
) -> tuple[int, dict[str, str], bytes]:
    """One request with Python's http.client from inside HOST."""

    def request() -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(ip, APACHE_PORT, timeout=timeout)
        try:
            conn.request("POST" if body is not None else "GET", target, body=body)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    return netns.call_in_netns(lab.namespace(host), request)


def lab_resources(name: str) -> dict[str, object]:
    """What of lab NAME exists: namespaces, processes in them, its bpffs mount, its files."""
    namespaces = netns.list_namespaces(f"coral-{name}-")
    with open("/proc/mounts") as f:
        mounts = [line.split()[1] for line in f if f"/{name}/" in line]
    return {
        "namespaces": namespaces,
        "pids": [p for ns in namespaces for p in netns.pids_in(ns)],
        "mounts": mounts,
        "dir": os.path.exists(f"/run/coral/lab/{name}"),
    }


def test_up_then_down_leaves_nothing() -> None:
    name = fresh_name()
    lab = Lab.up(name, clients=3)
    try:
        present = lab_resources(name)
        assert len(present["namespaces"]) == 1 + 3 + 3  # type: ignore[arg-type]
        assert present["mounts"] == [str(lab.bpffs)]
        apache_pids = list(lab.pids.values())
        assert len(apache_pids) == len(SERVER_HOSTS)
    finally:
        lab.down()
    assert lab_resources(name) == {"namespaces": [], "pids": [], "mounts": [], "dir": False}
    for pid in apache_pids:
        assert not os.path.exists(f"/proc/{pid}/ns/net"), f"Apache {pid} survived lab down"


def test_every_url_answers_correctly_from_each_server(lab: Lab) -> None:
    post = secrets.token_bytes(70_000)
    for server in SERVER_HOSTS:
        ip = SERVER_LAN_IPS[server]
        for name in content.STATIC_SIZES:
            target = f"/static/{name}.bin"
            status, headers, body = fetch(lab, "client1", ip, target)
            assert content.verify_reply(target, b"", status, headers, body) is None, (
                server,
                target,
            )
        for target, req in (
            ("/cgi-bin/random?n=30000&rid=r1", None),
            ("/cgi-bin/slow?ms=50&n=100&rid=r2", None),
            ("/cgi-bin/echo?rid=r3", post),
        ):
            status, headers, body = fetch(lab, "client2", ip, target, req)
            problem = content.verify_reply(target, req or b"", status, headers, body)
            assert problem is None, (server, target, problem)
        # and curl, a different real client, sees the same bytes
        url = f"http://{ip}:{APACHE_PORT}/static/50k.bin"
        out = lab.run("client1", ["sh", "-c", f"curl -sf {url} | sha256sum"])
        assert out.stdout.split()[0] == content.static_digest("50k")


def test_verifier_catches_a_wrong_dynamic_reply(lab: Lab) -> None:
    """The check is not vacuous: a reply for another request id is refused."""
    status, headers, body = fetch(
        lab, "client1", SERVER_LAN_IPS["primary"], "/cgi-bin/random?n=10&rid=a"
    )
    assert content.verify_reply("/cgi-bin/random?n=10&rid=b", b"", status, headers, body)
    assert content.verify_reply("/cgi-bin/random?n=10&rid=a", b"", status, headers, body + b"x")


def test_link_crash_unplugs_and_heal_replugs(lab: Lab) -> None:
    ip = SERVER_LAN_IPS["primary"]
    lab.crash("primary", "link")
    with pytest.raises(OSError):
        fetch(lab, "client1", ip, "/static/1k.bin", timeout=0.5)
    # the host itself keeps its addresses and its Apache
    assert fetch(lab, "primary", "127.0.0.1", "/static/1k.bin")[0] == 200
    lab.heal("primary")
    assert fetch(lab, "client1", ip, "/static/1k.bin")[0] == 200
    assert lab.run("backup", ["ping", "-c1", "-W2", "198.18.2.1"]).returncode == 0


def test_freeze_stops_processes_and_heal_resumes(lab: Lab) -> None:
    ip = SERVER_LAN_IPS["backup"]
    lab.crash("backup", "freeze")
    pids = netns.pids_in(lab.namespace("backup"))
    states = {Path(f"/proc/{p}/stat").read_text().split()[2] for p in pids}
    assert states == {"T"}
    with pytest.raises(OSError):
        fetch(lab, "client1", ip, "/static/1k.bin", timeout=0.5)
    lab.heal("backup")
    assert fetch(lab, "client1", ip, "/static/1k.bin")[0] == 200


def test_kill_leaves_no_process_on_the_host(lab: Lab) -> None:
    lab.crash("spare", "kill")
    assert netns.pids_in(lab.namespace("spare")) == []
    with pytest.raises(OSError):
        fetch(lab, "client1", SERVER_LAN_IPS["spare"], "/static/1k.bin", timeout=0.5)
    with pytest.raises(LabError, match="no link or freeze"):
        lab.heal("spare")
    # the other hosts are untouched
    assert fetch(lab, "client1", SERVER_LAN_IPS["primary"], "/static/1k.bin")[0] == 200


WATCHER = """
import os, select, sys
fd = os.pidfd_open(int(sys.argv[1]))
print("ready", flush=True)
select.select([fd], [], [])
print("saw it die", flush=True)
"""


def test_kill_lets_no_process_see_another_die() -> None:
    """A crash kills the host at once: no process of it runs on after another
    died (a sequential SIGKILL sweep let Apache answer a killed CGI with a 500).
    The watcher outlives its target in PID order, 200 processes further on."""
    ns = f"coral-{fresh_name()}-kill"
    netns.create(ns)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        argv = netns.ns_argv(ns, ["sleep", "600"])
        procs = [subprocess.Popen(argv) for _ in range(201)]
        watch = [sys.executable, "-c", WATCHER, str(procs[0].pid)]
        watcher = subprocess.Popen(netns.ns_argv(ns, watch), stdout=subprocess.PIPE)
        procs.append(watcher)
        assert watcher.stdout is not None
        ready, _, _ = select.select([watcher.stdout], [], [], 10)
        assert ready and watcher.stdout.readline() == b"ready\n", "the watcher never started"
        netns.kill_now(ns)
        for proc in procs:
            assert proc.wait(timeout=5) == -signal.SIGKILL
        assert watcher.stdout.read() == b"", "a process of the host saw another die"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        netns.delete(ns)


def test_bad_requests_get_clear_errors(lab: Lab) -> None:
    with pytest.raises(LabError, match="crash mode"):
        lab.crash("primary", "explode")
    with pytest.raises(LabError, match="no host"):
        lab.crash("nosuch", "kill")
    with pytest.raises(LabError, match="exists already"):
        Lab.up(lab.name)
    with pytest.raises(LabError, match="no lab"):
        Lab.load(fresh_name())


def test_two_labs_coexist() -> None:
    a = Lab.up(fresh_name(), clients=1)
    try:
        b = Lab.up(fresh_name(), clients=1)
        try:
            for lab in (a, b):
                assert fetch(lab, "client1", SERVER_LAN_IPS["primary"], "/static/15k.bin")[0] == 200
            a.crash("primary", "link")
            assert fetch(b, "client1", SERVER_LAN_IPS["primary"], "/static/15k.bin")[0] == 200
        finally:
            b.down()
        assert fetch(a, "primary", "127.0.0.1", "/static/1k.bin")[0] == 200
    finally:
        a.down()


def test_cli_round_trip_and_leftovers_are_found_and_removed() -> None:
    name = fresh_name()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CORAL, *args], capture_output=True, text=True, timeout=60)

    try:
        up = run("lab", "up", "--name", name, "--clients", "1", "--json")
        assert up.returncode == 0, up.stderr
        info = json.loads(run("lab", "info", "--name", name, "--json").stdout)
        assert info["hosts"]["primary"]["address"] == SERVER_LAN_IPS["primary"]
        assert any(p["path"].startswith("/cgi-bin/echo") for p in info["paths"])
        url = f"http://{SERVER_LAN_IPS['backup']}:{APACHE_PORT}/static/1k.bin"
        ex = run(
            "lab", "exec", "--name", name, "client1", "--", "sh", "-c", f"curl -sf {url}|sha256sum"
        )
        assert ex.returncode == 0 and ex.stdout.split()[0] == content.static_digest("1k")
        bad = run("lab", "crash", "--name", name, "nosuch")
        assert bad.returncode == 1 and "no host 'nosuch'" in bad.stderr
        # An interrupted run: no usable state, namespaces and Apache left behind.
        # (`down --all` removes each of lab_names(); calling it here would remove
        # every lab on the machine, so the test removes this one by name.)
        os.remove(f"/run/coral/lab/{name}/state.json")
        assert name in lab_names()
        down = run("lab", "down", name)
        assert down.returncode == 0, down.stderr
    finally:
        remove_lab(name)
    assert lab_resources(name) == {"namespaces": [], "pids": [], "mounts": [], "dir": False}


def test_leftover_namespaces_without_files_are_found_and_removed() -> None:
    name = fresh_name()
    netns.create(f"coral-{name}-router")
    try:
        assert name in lab_names()
    finally:
        remove_lab(name)
    assert lab_resources(name)["namespaces"] == []


def test_verifying_client_from_a_client_host_through_the_router(lab: Lab) -> None:
    mix = ",".join(
        [f"/static/{n}.bin" for n in content.STATIC_SIZES]
        + ["/cgi-bin/random?n=5000", "/cgi-bin/slow?ms=20&n=100", "/cgi-bin/echo"]
    )
    runs = [
        lab.start_tool(
            client,
            "load",
            f"http://{SERVER_LAN_IPS[server]}:{APACHE_PORT}",
            *("--requests", "200", "--connections", "4", "--pipeline", pipeline, "--mix", mix),
        )
        for client, server, pipeline in (("client1", "primary", "1"), ("client2", "backup", "3"))
    ]
    for run in runs:
        report = run.result(timeout=120)
        assert report["counts"] == {"ok": 200, "failed": 0, "corrupted": 0}, report["problems"]
        assert report["resets"] == 0 and report["connection_errors"] == 0


def test_demo_command_runs_end_to_end(tmp_path: Path) -> None:
    plot = tmp_path / "demo.png"
    out = subprocess.run(
        [
            *CORAL,
            "demo",
            "--duration",
            "2",
            "--connections",
            "2",
            "--stream-mb",
            "5",
            "--product-seconds",
            "8",
            "--plot",
            str(plot),
            *("--interval-ms", "100", "--misses", "8"),  # see test_agent.INTERVAL_MS
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert not netns.list_namespaces("coral-demo"), "the demo removes its lab"
    assert "every reply verified correct" in out.stdout, out.stdout + out.stderr
    assert "demo: stage 2:" in out.stdout, out.stdout + out.stderr
    assert "demo: stage 3:" in out.stdout and "0 failed or corrupted" in out.stdout, out.stdout
    assert "every byte of every stream arrived" in out.stdout, out.stdout + out.stderr
    assert out.returncode == 0, out.stdout + out.stderr
    assert "outcome: all stages correct" in out.stdout
    assert plot.read_bytes().startswith(b"\x89PNG"), "stage 3 writes its plot"
