"""Network-namespace primitives shared by the lab, the tests and the data plane.

Commands enter a namespace with ``nsenter --net`` rather than ``ip netns
exec``: the latter remounts /sys, which hides bpffs pins and sysfs state of
the caller. Python code that must open sockets inside a namespace uses
:func:`call_in_netns`, which runs a function on a thread that entered the
namespace (setns affects only the calling thread), so no process is spawned.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

T = TypeVar("T")


class CommandError(Exception):
    """A command failed; carries its argv, exit status and error output."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        super().__init__(f"`{' '.join(self.argv)}` exited {returncode}: {self.stderr}")


def ns_path(ns: str) -> str:
    return os.path.join(NETNS_DIR, ns)


def ns_argv(ns: str | None, argv: Sequence[str]) -> list[str]:
    """ARGV prefixed so that it runs inside namespace NS (unchanged for None)."""
    if ns is None:
        return list(argv)
    return ["nsenter", f"--net={ns_path(ns)}", "--", *argv]


def run(
    argv: Sequence[str],
    ns: str | None = None,
    *,
    check: bool = True,
    input: str | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run ARGV (inside NS if given), capturing output; raise CommandError if CHECK fails."""
    full = ns_argv(ns, argv)
    proc = subprocess.run(
        full, input=input, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise CommandError(full, proc.returncode, proc.stderr or proc.stdout)
    return proc


def list_namespaces(prefix: str = "") -> list[str]:
    """Names of the named network namespaces starting with PREFIX."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def create(ns: str) -> None:
    run(["ip", "netns", "add", ns])
    run(["ip", "link", "set", "lo", "up"], ns)


def delete(ns: str) -> None:
    """Remove namespace NS if present (its veths go with it)."""
    if os.path.exists(ns_path(ns)):
        run(["ip", "netns", "delete", ns])


def pids_in(ns: str) -> list[int]:
    """PIDs of every process whose network namespace is NS (like `ip netns pids`)."""
    try:
        st = os.stat(ns_path(ns))
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            pst = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (pst.st_dev, pst.st_ino) == (st.st_dev, st.st_ino):
            pids.append(int(entry))
    return pids


def signal_all(ns: str, sig: signal.Signals) -> list[int]:
    """Send SIG to every process in NS (all of them were started by the project)."""
    hit = []
    for pid in pids_in(ns):
        try:
            os.kill(pid, sig)
            hit.append(pid)
        except ProcessLookupError:
            pass
    return hit


def _wait_empty(ns: str, timeout: float) -> list[int]:
    """Wait up to TIMEOUT s for NS to have no process; return those left."""
    deadline = time.monotonic() + timeout
    while (left := pids_in(ns)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return left


def stop_all(ns: str) -> list[int]:
    """SIGSTOP every process in NS, also those forked while it runs; return their PIDs.

    One sweep is not enough: a process not stopped yet may fork, and its child
    shows up only in the next listing. Sweeps repeat until one finds nothing new.
    """
    stopped: set[int] = set()
    while new := [pid for pid in pids_in(ns) if pid not in stopped]:
        for pid in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        stopped.update(new)
    return sorted(stopped)


def kill_now(ns: str, timeout: float = 3.0) -> None:
    """Kill every process in NS at once and return once they are gone (a crash, not a stop).

    Every process is stopped before any is killed: SIGKILL goes out one PID
    at a time, and a process that ran on while another died would answer for
    it, like a host that is half dead. Apache, for one, turns a CGI killed
    before its worker into a 500 that the host's proxy, killed later still,
    would relay to the client.
    """
    stop_all(ns)
    signal_all(ns, signal.SIGKILL)
    left = _wait_empty(ns, timeout)
    if left:
        raise CommandError(["kill"], 1, f"processes {left} in {ns} survived SIGKILL")


def kill_all(ns: str, grace: float = 3.0) -> None:
    """Stop every process in NS: SIGTERM (and SIGCONT, in case it is frozen), then SIGKILL."""
    signal_all(ns, signal.SIGTERM)
    signal_all(ns, signal.SIGCONT)
    _wait_empty(ns, grace)
    kill_now(ns, grace)


_libc = ctypes.CDLL(None, use_errno=True)


def call_in_netns(ns: str | None, fn: Callable[[], T]) -> T:
    """Run FN on a thread that entered namespace NS; return its result or raise its error.

    Sockets FN creates belong to NS and keep working after the thread ends.
    NS None means the caller's own namespace: FN runs directly.
    """
    if ns is None:
        return fn()
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            fd = os.open(ns_path(ns), os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as e:
            error.append(e)

    t = threading.Thread(target=body, name=f"netns-{ns}")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def wait_tcp(ns: str, host: str, port: int, timeout: float) -> bool:
    """Wait until HOST:PORT accepts a TCP connection from inside NS; False on timeout."""

    def probe() -> bool:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((host, port), timeout=0.5):
                    return True
            except OSError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.02)

    return call_in_netns(ns, probe)


def wait_udp_bound(ns: str, port: int, timeout: float) -> bool:
    """Wait until a UDP socket is bound to PORT inside NS; False on timeout."""

    def bound() -> bool:
        with open("/proc/thread-self/net/udp") as f:
            next(f)
            return any(int(line.split()[1].split(":")[1], 16) == port for line in f)

    deadline = time.monotonic() + timeout
    while not call_in_netns(ns, bound):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True
