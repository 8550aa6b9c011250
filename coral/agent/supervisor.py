"""The agent's children (one front proxy per service), and what their death means.

Any child that exits while the agent has not asked it to is a crash of this
host (CoRAL 4.4.3): the agent fences its data plane, kills the other
children and stops its heartbeats, so the peer takes over cleanly instead of
replicating into a host that lost part of itself. Children are bound to the
agent's life too: each gets PR_SET_PDEATHSIG, so an agent that dies (even by
SIGKILL) takes its proxies with it, and its data plane's lease runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("coral.agent")

PR_SET_PDEATHSIG = 1
STOP_TIMEOUT_S = 2.0


def raise_priority() -> None:
    """Heartbeats (and the witness's replies) must go out on time under full load:
    real-time scheduling if allowed, else the highest nice level. Children drop it."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except OSError:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, -20)


def _child_setup() -> None:  # runs in the child between fork and exec
    """Die with the agent, and drop the agent's real-time priority: a busy proxy
    at SCHED_FIFO would starve the server and everything else on the host."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, 0, 0)


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: asyncio.subprocess.Process
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.proc.returncode is None


class Supervisor:
    """Starts, watches and stops the agent's children. ON_CRASH(name, status) is
    called (on the agent's loop) when a child exits unasked."""

    def __init__(self, on_crash: Callable[[str, int], None]) -> None:
        self._on_crash = on_crash
        self.children: dict[str, Child] = {}
        self._stopping = False

    async def start(self, name: str, argv: list[str], log_path: Path) -> Child:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                preexec_fn=_child_setup,
            )
        child = Child(name, argv, proc)
        child.watcher = asyncio.create_task(self._watch(child), name=f"watch-{name}")
        self.children[name] = child
        log.info("started %s (pid %d)", name, proc.pid)
        return child

    async def _watch(self, child: Child) -> None:
        status = await child.proc.wait()
        if not self._stopping:
            log.error("%s (pid %d) exited with status %d", child.name, child.proc.pid, status)
            self._on_crash(child.name, status)

    def signal(self, name: str, sig: int) -> None:
        child = self.children[name]
        if child.running:
            child.proc.send_signal(sig)

    def kill_all(self) -> None:
        """SIGKILL every child now (a host crash: nothing of this host may go on)."""
        self._stopping = True
        for child in self.children.values():
            if child.running:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()

    async def stop_all(self) -> None:
        """SIGTERM every child, SIGKILL what is left after STOP_TIMEOUT_S; wait for all."""
        self._stopping = True
        for child in self.children.values():
            if child.running:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.terminate()
        for child in self.children.values():
            try:
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await child.proc.wait()
            except TimeoutError:
                child.proc.kill()
                await child.proc.wait()
        for child in self.children.values():
            if child.watcher is not None:
                child.watcher.cancel()
