"""The agent's states and the only transitions allowed between them.

`state` is where the host is; `wantstate` where the agent is taking it (a
takeover passes through LOST and TAKEOVER on the way to SIMPLEX). Every
change goes through StateMachine.move(), which refuses a transition the
table does not list (a bug, never a judgement call), logs one line with the
time spent in the state left, and keeps the last transitions for status.

    STARTING --peer acknowledges our epoch--> DUPLEX
    STARTING/DUPLEX --peer silent for misses x interval--> LOST
    LOST --peer back before anything was decided--> DUPLEX
    LOST --sole grant (witness) or no witness and the router reachable--> TAKEOVER
    TAKEOVER --the peer's lease has certainly expired; switched--> SIMPLEX
    STARTING --the peer serves alone--> JOINING --accepted, backup of every service--> DUPLEX
    SIMPLEX --the joining peer became the backup--> DUPLEX
    LOST/TAKEOVER/SIMPLEX/DUPLEX --no right to serve--> FENCED
    any --a local component died--> FAILED
    any --shut down--> STOPPED
"""

from __future__ import annotations

import datetime
import enum
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("coral.agent")


class State(enum.StrEnum):
    STARTING = "starting"
    """Data plane loaded and fenced; waiting for the peer (or for the right to serve alone)."""
    DUPLEX = "duplex"
    """The pair stands: connections replicated, leases renewed by each other's heartbeats."""
    LOST = "lost"
    """The peer fell silent: no longer acknowledged; asking for the right to serve alone."""
    TAKEOVER = "takeover"
    """Entitled to serve alone; waiting until the peer's lease has certainly run out."""
    SIMPLEX = "simplex"
    """Serving alone; the lease renewed with the witness."""
    JOINING = "joining"
    """Started while the peer serves alone: asking to join it as its backup."""
    FENCED = "fenced"
    """No right to serve: the data plane drops all service traffic."""
    FAILED = "failed"
    """A local component died: treated as a crash of this host."""
    STOPPED = "stopped"


S = State
TRANSITIONS: dict[State, frozenset[State]] = {
    S.STARTING: frozenset({S.DUPLEX, S.LOST, S.FENCED, S.JOINING}),
    S.JOINING: frozenset({S.DUPLEX, S.FENCED}),
    S.DUPLEX: frozenset({S.LOST, S.FENCED}),
    S.LOST: frozenset({S.DUPLEX, S.TAKEOVER, S.FENCED}),
    S.TAKEOVER: frozenset({S.SIMPLEX, S.FENCED}),
    S.SIMPLEX: frozenset({S.DUPLEX, S.FENCED}),
    S.FENCED: frozenset(),
    S.FAILED: frozenset(),
    S.STOPPED: frozenset(),
}
"""Allowed moves besides the two open to every state but STOPPED: FAILED and STOPPED."""
ALWAYS = frozenset({S.FAILED, S.STOPPED})

HISTORY = 10


class TransitionError(Exception):
    """A move the table does not allow."""


@dataclass(frozen=True)
class Transition:
    at: str
    source: State
    target: State
    why: str
    ms: float
    """Time spent in SOURCE."""

    def as_dict(self) -> dict[str, Any]:
        return {"at": self.at, "from": self.source, "to": self.target, "why": self.why,
                "ms": round(self.ms, 3)}  # fmt: skip


class StateMachine:
    """The one place the agent's state changes."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.state = State.STARTING
        self.wantstate = State.DUPLEX
        self.since_ns = time.monotonic_ns()
        self.history: deque[Transition] = deque(maxlen=HISTORY)

    def allowed(self, target: State) -> bool:
        if self.state is State.STOPPED:
            return False
        return target in ALWAYS or target in TRANSITIONS[self.state]

    def move(self, target: State, why: str) -> Transition:
        """Go to TARGET (TransitionError if the table forbids it); log and keep the move."""
        if not self.allowed(target):
            raise TransitionError(f"{self.host}: {self.state} -> {target} is not allowed ({why})")
        now = time.monotonic_ns()
        t = Transition(
            datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
            self.state,
            target,
            why,
            (now - self.since_ns) / 1e6,
        )
        log.info("%s: %s -> %s after %.1f ms: %s", self.host, t.source, target, t.ms, why)
        self.state, self.since_ns = target, now
        if target in (State.FENCED, State.FAILED, State.STOPPED, State.SIMPLEX, State.DUPLEX):
            self.wantstate = target
        self.history.append(t)
        return t

    def want(self, target: State) -> None:
        self.wantstate = target

    @property
    def since_s(self) -> float:
        return (time.monotonic_ns() - self.since_ns) / 1e9
