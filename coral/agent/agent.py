"""`coral agent`: one per host; turns the data plane and the proxies into a pair
that fails over by itself.

What it does, in order (docs/design.md, "The node agent"):

1. Fences its data plane (an agent that starts knows nothing: it may not
   serve), destroys stale service sockets a crashed run left, configures
   every service with this host's role and the peer's addresses, and starts
   one front proxy per service under its supervisor.
2. Sends heartbeats every interval on every path (LAN, private link), each
   carrying its epoch and acknowledging the peer's (with an echo of the
   peer's send time). A heartbeat acknowledging this host's epoch is the
   fresh evidence that renews its lease, to (the echoed send time + lease):
   so a host's lease ends at most one lease after it last sent a heartbeat
   its peer acknowledged, on its own clock, whatever happens to later
   messages. A frozen host that thaws finds its lease gone and its peer's
   heartbeats no longer acknowledging it: it stays fenced.
3. Both hosts acknowledging each other: the services go duplex.
4. No acknowledgement for a lease: the peer is lost. This host stops
   acknowledging it, then needs the right to serve alone: the witness's sole
   grant for a new epoch (without a witness: an outside host reachable).
   Refused or unsure: it fences itself. Granted: it waits until the peer's
   lease has certainly run out (its last acknowledged heartbeat, received
   before the loss was detected, plus one lease), switches every service to
   simplex (one map write each), and a surviving primary takes the VIP
   (address, gratuitous ARP until an outside host answers through the
   router, refreshed). While alone it renews its lease with the witness.
5. A child (proxy) that dies unasked is a crash of this host: fence, kill
   the other children, stop heartbeats, exit 1.

Control: a unix socket (state_dir/<host>.sock) answers `coral status` and
`coral fence`; Prometheus metrics on metrics.listen; notify hooks on every
transition.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from coral.agent import reach
from coral.agent.config import AgentConfig, ServiceConfig
from coral.agent.heartbeat import Beat, HeartbeatEndpoint
from coral.agent.metrics import Metrics
from coral.agent.statemachine import State, StateMachine
from coral.agent.supervisor import Supervisor, raise_priority
from coral.agent.witness import Grant, WitnessClient, WitnessUnreachable
from coral.bpf.structs import Mode, Role
from coral.dataplane import DataPlane, DataPlaneError, identity, settings

log = logging.getLogger("coral.agent")
T = TypeVar("T")
WitnessAnswer = tuple[int, Grant, int]
"""(epoch asked, the witness's answer, time.monotonic_ns() when it came)."""

MARGIN_S = 0.002
"""Added to the peer's lease before serving alone: clock rates and scheduling."""
STARTUP_GRACE_LEASES = 50
"""A peer not heard for this many leases after start is treated as lost."""
PEER_MAC_TIMEOUT_S = 2.0
PROXY_START_TIMEOUT_S = 30.0
STATUS_EVERY_S = 1.0
GC_EVERY_S = 10.0
GC_IDLE_S = 30.0
"""Connection entries without a socket and idle this long are forgotten."""
REJOIN_EXIT = 75
"""The agent's exit status after `coral reintegrate`: restart me (EX_TEMPFAIL)."""
PAIR_PROTOCOL = 1
"""What the two agents of a pair must agree on (heartbeat info, join, roles)."""
JOIN_TIMEOUT_S = 5.0
ALONE_LEASE_S = 2.0
"""While alone, the lease (and the witness's grant) runs this long, renewed every
quarter of it: no peer waits to take over, and a busy machine (or witness)
must not make the only serving host fence itself for a late reply."""
NOTIFY_FLUSH_S = 2.0
"""How long a stopping agent waits for the notify hook to hear its last events."""


@dataclass
class Peer:
    """What this host knows of its peer, from its heartbeats."""

    name: str
    epoch: int = 0
    state: str = "unknown"
    last_rx_ns: int = 0
    """Any valid heartbeat."""
    last_acked_ns: int = 0
    """A heartbeat acknowledging this host's current epoch (it renewed our lease)."""
    lease_bound_ns: int = 0
    """Last heartbeat received while this host still acknowledged the peer: the peer's
    lease ends at most one lease after it."""
    echo: tuple[int, int] = (0, 0)
    """(the peer's sent_ns, our receive time) of its latest heartbeat, echoed back."""
    rtt_s: float | None = None
    settings: settings.TcpSettings | None = None
    info: dict[str, Any] | None = None
    paths: dict[str, int] = field(default_factory=dict)


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.name = cfg.host.name
        self.sm = StateMachine(self.name)
        self.key = cfg.heartbeat.key
        self.interval = cfg.heartbeat.interval_ms / 1000
        self.lease_s = cfg.heartbeat.lease_s
        self.peer = Peer(cfg.peer.name)
        self.epoch = 0
        self.acking = True
        self.metrics = Metrics()
        self.supervisor = Supervisor(self._child_crashed)
        self.dp: DataPlane | None = None
        self.hb: HeartbeatEndpoint | None = None
        self._announcer: identity.Announcer | None = None
        self.witness: WitnessClient | None = None
        self.witness_state: dict[str, Any] | None = None
        self.last_failover: dict[str, Any] | None = None
        self.failovers = 0
        self.arp_unsent = 0
        """Gratuitous ARP frames that could not be sent (logged each)."""
        self.exit_status = 0
        self._done = asyncio.Event()
        self._started = False
        self._events: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._takeover_idle = asyncio.Event()
        self._takeover_idle.set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._renewing = False
        self._started_ns = time.monotonic_ns()
        self._control: asyncio.Server | None = None
        self._lost_at_ns = 0
        self._claimed: list[str] = []
        self._peer_mac = bytes(6)
        self._forming = False
        self._admitting = False
        self._early: asyncio.Task[WitnessAnswer | None] | None = None
        """The request for the grant asked ahead (_ask_ahead), while it matters."""
        self._asked_epoch = 0
        """The highest epoch asked of the witness: a new request goes above it."""
        self._granted_ahead = False
        self._peer_duplex = asyncio.Event()
        """Set by a heartbeat of the peer in DUPLEX: a re-integration waits for it."""
        self._renewed_ns = 0
        self._nl = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="netlink")
        self.witness_reachable: bool | None = None
        own = settings.read(None, cfg.host.lan_interface)
        self._info: dict[str, Any] = {
            "v": PAIR_PROTOCOL,
            "sysctls": own.sysctls,
            "mtu": own.mtu,
            "services": sorted([s.vip, s.port] for s in cfg.services),
        }
        self._info_bytes = _compact(self._info)
        self.roles = {(s.vip, s.port): s.role for s in cfg.services}
        """This host's role per service now: the configured one until a re-integration
        makes the host that served alone the primary of every service."""
        self.last_reintegration: dict[str, Any] | None = None
        self._joining_since = 0
        self._rejoin_by_itself = False
        """Fenced for a cause that heals ([host] rejoin_after_s set): _rejoin_when_due."""
        self._peer_alone_since = 0
        """Since when every heartbeat of the peer says it serves alone (0: it does not)."""

    # ---- life

    async def run(self) -> int:
        """Serve until stopped (SIGTERM/SIGINT), fenced for good, or crashed; the exit status."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop, f"signal {sig.name}")
        try:
            await self._start()
            self._started = True
            self._spawn(self._tick_loop(), "tick")
            self._spawn(self._status_loop(), "status")
            self._spawn(self._notifier(), "notifier")
            await self._done.wait()
        finally:
            await self._shutdown()
        return self.exit_status

    async def _start(self) -> None:
        cfg = self.cfg
        raise_priority()
        self.dp = await self._netlink(
            DataPlane.open,
            None,
            cfg.host.lan_interface,
            cfg.host.pin_dir,
            cfg.host.conn_capacity,
            rto_min_ms=cfg.service_rto_min_ms,
        )
        await self._netlink(self.dp.attach)
        self.dp.fence()
        self._announcer = await self._netlink(identity.Announcer, None, cfg.host.lan_interface)
        self.epoch = max(self.dp.epoch(), 1)  # 0 means "no epoch" in a heartbeat
        for svc in cfg.services:
            _destroy_sockets(svc.vip, svc.port)
        await self._netlink(self.dp.gc, 0.0)  # entries of those sockets: this host knows nothing
        self.hb = await HeartbeatEndpoint.open(
            self.name, self.key, self._paths(), self._on_beat, expect_sender=cfg.peer.name
        )
        if cfg.witness is not None:
            self.witness = WitnessClient(cfg.witness.address, self.key, self.name)
            await self.witness.prepare()
        self.hb.send(self.epoch, 0, self.sm.state)  # resolves the peer's MAC meanwhile
        self._peer_mac = await self._neighbor_mac(PEER_MAC_TIMEOUT_S)
        for svc in cfg.services:
            await self._netlink(self._configure, svc)
        for svc in cfg.services:
            await self.supervisor.start(
                f"proxy-{svc.vip}-{svc.port}", self._proxy_argv(svc), self._log_path(svc)
            )
        for svc in cfg.services:  # no lease (no service) before every proxy listens
            await _wait_listening(svc.vip, svc.port, PROXY_START_TIMEOUT_S)
        state_dir = Path(cfg.host.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        sock = state_dir / f"{self.name}.sock"
        sock.unlink(missing_ok=True)
        self._control = await asyncio.start_unix_server(self._on_control, str(sock))
        if cfg.metrics.listen is not None:
            self.metrics.serve(cfg.metrics.listen)
        log.info("%s: started; epoch %d, lease %.0f ms", self.name, self.epoch, self.lease_s * 1e3)

    def _paths(self) -> dict[str, tuple[tuple[str, int], tuple[str, int]]]:
        h, p, port = self.cfg.host, self.cfg.peer, self.cfg.heartbeat.port
        paths = {"lan": ((h.lan_address, port), (p.lan_address, port))}
        if h.private_address is not None and p.private_address is not None:
            paths["private"] = ((h.private_address, port), (p.private_address, port))
        return paths

    def _configure(self, svc: ServiceConfig) -> None:
        assert self.dp is not None
        role = Role.PRIMARY if self.roles[svc.vip, svc.port] == "primary" else Role.BACKUP
        if role is Role.PRIMARY:
            self.dp.hide_vip(svc.vip)
        else:
            self.dp.claim_vip(svc.vip)  # answered only while the lease is live
        self.dp.add_service(svc.vip, svc.port, role, self.cfg.peer.lan_address, self._peer_mac)

    def _proxy_argv(self, svc: ServiceConfig) -> list[str]:
        h, p = self.cfg.host, self.cfg.peer
        own = h.private_address or h.lan_address
        peer = p.private_address or p.lan_address
        argv = [
            *(sys.executable, "-m", "coral", "proxy", "--listen", f"{svc.vip}:{svc.port}"),
            *("--backend", f"{svc.backend[0]}:{svc.backend[1]}", "--pin-dir", h.pin_dir),
            *("--log-key-file", str(self.cfg.heartbeat.key_file)),
            *("--log-listen", f"{own}:{svc.log_port}", "--log-peer", f"{peer}:{svc.log_port}"),
            *("--log-local", own, "--max-buffered-reply", str(svc.max_buffered_reply)),
        ]
        for prefix in svc.deterministic:
            argv += ["--deterministic", prefix]
        if svc.sync_static:
            argv.append("--sync-static")
        return argv

    def _log_path(self, svc: ServiceConfig) -> Path:
        return Path(self.cfg.host.state_dir) / f"proxy-{svc.vip}-{svc.port}.log"

    def _stop(self, why: str) -> None:
        if self.sm.allowed(State.STOPPED):
            self._fence_dataplane()
            self.sm.move(State.STOPPED, why)
            self._notify("stopped", why)
        self._done.set()

    async def _shutdown(self) -> None:
        with contextlib.suppress(TimeoutError):  # the last events (failed, fenced) first
            async with asyncio.timeout(NOTIFY_FLUSH_S):
                await self._events.join()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.supervisor.stop_all()
        if self.hb is not None:
            self.hb.close()
        if self._control is not None:
            self._control.close()
            (Path(self.cfg.host.state_dir) / f"{self.name}.sock").unlink(missing_ok=True)
        if self.dp is not None:
            self.dp.close()
        if self._announcer is not None:
            self._announcer.close()
        self._nl.shutdown(wait=False)

    async def _netlink(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """FN on the netlink thread: pyroute2's calls run an event loop of their own,
        which cannot nest in the agent's. The data plane's map operations (lease,
        mode, fence) are plain bpf(2) calls and stay on the loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._nl, functools.partial(fn, *args, **kwargs))

    async def _neighbor_mac(self, timeout: float) -> bytes:
        """The peer's MAC from the neighbour table (heartbeats make the kernel resolve
        it); zeros if it does not resolve within TIMEOUT (the peer is down: its MAC
        is needed only for duplex, and configured then)."""
        h, ip = self.cfg.host, self.cfg.peer.lan_address
        deadline = time.monotonic() + timeout
        while True:
            mac = await self._netlink(identity.neighbor_mac, None, ip, h.lan_interface)
            if mac is not None:
                return mac
            if time.monotonic() >= deadline:
                return bytes(6)
            with (
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s,
                contextlib.suppress(OSError),
            ):
                s.sendto(b"", (ip, 9))  # prompts the kernel to resolve it
            await asyncio.sleep(0.02)

    def _spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: task %s failed", self.name, task.get_name(), exc_info=task.exception())
            self._crash(f"agent task {task.get_name()} failed: {task.exception()}")

    # ---- heartbeats in

    def _on_beat(self, beat: Beat, path: str, rtt: float | None) -> None:
        now = time.monotonic_ns()
        peer = self.peer
        peer.last_rx_ns = now
        peer.paths[path] = now
        peer.epoch, peer.state, peer.echo = beat.epoch, beat.state, (beat.sent_ns, now)
        if beat.state != State.SIMPLEX:
            self._peer_alone_since = 0
        elif not self._peer_alone_since:
            self._peer_alone_since = now
        if beat.state == State.DUPLEX:
            self._peer_duplex.set()
        if rtt is not None:
            peer.rtt_s = rtt
        info = _info_of(beat.info)
        if info is not None:
            peer.info = info
            peer.settings = _settings_of(info)
        if self.acking:
            peer.lease_bound_ns = now
        state = self.sm.state
        if state is State.STARTING and beat.state == State.SIMPLEX:
            # Not before start-up is done (the next heartbeat will do): a host that
            # asked while its proxies did not listen yet was admitted, became backup
            # (VIP, gratuitous ARP) and then stayed silent until start-up ended, its
            # peer waiting with clients stalled (~300 ms, 9 returns in 100 cycles).
            if self._started:
                self._join()
        elif (
            state in (State.DUPLEX, State.LOST)
            and beat.state in (State.TAKEOVER, State.SIMPLEX)
            and not (info is not None and info.get("join") == "accepted")  # it completes
        ):
            self._fence(f"{peer.name} serves alone (epoch {beat.epoch}): re-integration needed")
            return
        elif state is State.SIMPLEX and beat.state == State.JOINING:
            self._admit()
        elif state is State.DUPLEX and info is not None and info.get("step_down") == self.name:
            self._fence(f"{peer.name} is promoted: stepping down", rejoin=False)
            return
        elif state is State.JOINING and info is not None:
            if info.get("join") == "accepted":
                self._become_backup()
            elif "refused" in info:
                self._fence(f"{peer.name} refused the join: {info['refused']}", rejoin=False)
                return
        acked = beat.peer_epoch != 0 and beat.peer_epoch == self.epoch and beat.echo_ns != 0
        if acked:
            peer.last_acked_ns = now
        if acked and state in (State.STARTING, State.DUPLEX, State.JOINING):
            remaining = self.lease_s - (now - beat.echo_ns) / 1e9
            if remaining > 0 and self.dp is not None:
                self.dp.renew_lease(self.epoch, remaining)

    # ---- the clock

    async def _tick_loop(self) -> None:
        next_ns = time.monotonic_ns()
        step = round(self.interval * 1e9)
        while True:
            self._tick()
            next_ns += step
            delay = (next_ns - time.monotonic_ns()) / 1e9
            if delay < 0:  # late (overload, a pause): do not burst to catch up
                next_ns = time.monotonic_ns()
                delay = 0
            await asyncio.sleep(delay)

    def _beat(self) -> None:
        """Send a heartbeat now: every tick, and at once when the peer waits for what
        it carries (a re-integration's steps), rather than up to an interval later.
        Not before start-up is done: a joiner that told its peer it is a backup
        before its proxies listen would then stay silent until its first tick,
        and the peer would lose it."""
        state = self.sm.state
        if self._started and self.hb is not None and state is not State.FAILED:
            acked = self.peer.epoch if self.acking and self.peer.last_rx_ns else 0
            self.hb.send(self.epoch, acked, state, info=self._info_bytes)

    def _tick(self) -> None:
        now = time.monotonic_ns()
        state = self.sm.state
        self._beat()
        lease_ns = round(self.lease_s * 1e9)
        if state is State.STARTING:
            if self.peer.last_acked_ns and now - self.peer.last_acked_ns < lease_ns:
                self._form_duplex()
            elif now - self._started_ns > STARTUP_GRACE_LEASES * lease_ns:
                self._lose(f"{self.peer.name} not heard since start")
        elif state is State.DUPLEX:
            silent = now - self.peer.last_acked_ns
            if silent > lease_ns:
                self._lose(
                    f"no heartbeat acknowledging epoch {self.epoch} for {silent / 1e6:.0f} ms"
                )
            elif self.witness is not None:
                self._ask_ahead(silent > lease_ns - round(self.interval * 1e9))
        elif state is State.SIMPLEX:
            self._renew_alone()
        elif state is State.JOINING and now - self._joining_since > JOIN_TIMEOUT_S * 1e9:
            self._fence(f"{self.peer.name} did not accept the join in {JOIN_TIMEOUT_S:.0f} s")
        elif state is State.FENCED:
            self._rejoin_when_due(now)

    # ---- the pair

    def _form_duplex(self) -> None:
        if self.peer.settings is None or self._forming:
            return  # its settings come with its next heartbeat; or already under way
        self._forming = True
        self._spawn(self._go_duplex(), "duplex")

    async def _go_duplex(self) -> None:
        assert self.dp is not None
        try:
            if self._peer_mac == bytes(6):  # the peer was down when this host started
                self._peer_mac = await self._neighbor_mac(0)
                if self._peer_mac == bytes(6):
                    return
                for svc in self.cfg.services:
                    await self._netlink(self._configure, svc)
            for svc in self.cfg.services:
                await self._set_duplex(svc)
        except DataPlaneError as e:
            self._fence(f"duplex refused: {e}", rejoin=False)
            return
        finally:
            self._forming = False
        if self.sm.state is State.STARTING:
            self.sm.move(State.DUPLEX, f"{self.peer.name} acknowledges epoch {self.epoch}")
            self._notify("duplex", "pair formed")

    def _lose(self, why: str) -> None:
        self._set_info(step_down=None)
        self.acking = False
        self._lost_at_ns = time.monotonic_ns()
        self.sm.move(State.LOST, why)
        self.sm.want(State.SIMPLEX)
        self._takeover_idle.clear()
        self._spawn(self._take_over(), "takeover")
        self._notify("peer-lost", why)

    # ---- the witness's grant, asked one interval before the peer would be lost

    def _next_epoch(self) -> int:
        return max(self.epoch, self.peer.epoch, self._asked_epoch) + 1

    async def _ask_witness(self, epoch: int) -> WitnessAnswer | None:
        """The witness's answer for EPOCH and when it came; None if unreachable."""
        assert self.witness is not None
        self._asked_epoch = max(self._asked_epoch, epoch)
        try:
            grant = await self.witness.request(epoch, ALONE_LEASE_S)
        except WitnessUnreachable:
            self.witness_reachable = False
            return None
        self.witness_reachable = True
        self.witness_state = {"holder": grant.holder, "epoch": grant.epoch}
        return epoch, grant, time.monotonic_ns()

    def _ask_ahead(self, peer_late: bool) -> None:
        """DUPLEX: with the peer one interval from being lost, ask for the grant now,
        so a takeover does not wait for the witness (its durable write takes
        milliseconds); give the grant back once the peer is heard again. Safe:
        holding the grant serves nothing; only the takeover, one lease after the
        peer's last word, does."""
        early = self._early
        if peer_late and early is None:
            self._early = self._spawn(self._ask_witness(self._next_epoch()), "ask-ahead")
        elif not peer_late and early is not None and early.done():
            self._early = None
            answer = early.result()
            if answer is not None and answer[1].granted:
                assert self.witness is not None
                self._spawn(self.witness.release(answer[0]), "release-ahead")

    async def _grant_for_takeover(self) -> WitnessAnswer | None:
        """The grant a takeover needs: the one asked ahead if it was granted, else a
        request now. A refusal naming a holder is asked again once that holder's
        grant would have run out: a holder that asked ahead and died a moment
        later must not keep this host from serving (a live holder renews it)."""
        early, self._early = self._early, None
        answer = await early if early is not None else None
        fresh = answer is not None and _grant_left_s(answer) > ALONE_LEASE_S / 2
        self._granted_ahead = fresh and answer is not None and answer[1].granted
        if not self._granted_ahead:
            answer = await self._ask_witness(self._next_epoch())
        if answer is not None and not answer[1].granted and answer[1].holder is not None:
            await asyncio.sleep(answer[1].remaining_s + MARGIN_S)
            self._asked_epoch = max(self._asked_epoch, answer[1].epoch)
            answer = await self._ask_witness(self._next_epoch())
        return answer

    async def _take_over(self) -> None:
        """LOST -> TAKEOVER -> SIMPLEX, or FENCED when the right to serve alone is not
        certain; then, serving alone as primary, announce the VIPs."""
        try:
            await self._take_over_steps()
        finally:
            self._takeover_idle.set()
        if self.sm.state is State.SIMPLEX and self._claimed:
            await self._announce()

    async def _take_over_steps(self) -> None:
        assert self.dp is not None
        detected = self._lost_at_ns
        lease_s = ALONE_LEASE_S
        if self.witness is not None:
            answer = await self._grant_for_takeover()
            if answer is None:
                self._fence("the witness is unreachable: the right to serve alone is not certain")
                return
            epoch, grant, _ = answer
            if not grant.granted:
                self._fence(f"the witness granted epoch {grant.epoch} to {grant.holder}")
                return
            lease_s = _grant_left_s(answer)
        elif not await reach.any_reachable(self.cfg.identity.confirm_hosts):
            self._fence("no outside host reachable: this host is the isolated one")
            return
        else:
            epoch = self._next_epoch()
        self.epoch = epoch
        self.dp.renew_lease(epoch, lease_s)
        self._renewed_ns = time.monotonic_ns()
        granted = time.monotonic_ns()
        if self.sm.state is not State.LOST:
            return  # fenced meanwhile
        self.sm.move(State.TAKEOVER, f"entitled to epoch {epoch}")
        end = self.peer.lease_bound_ns + round((self.lease_s + MARGIN_S) * 1e9)
        await asyncio.sleep(max(0, end - time.monotonic_ns()) / 1e9)
        waited = time.monotonic_ns()
        # A surviving primary moves the VIP first: going simplex releases the
        # replies its proxy held for the log, and the clients' next requests
        # must reach this host, not the dead one (they would wait for a
        # loss probe, 200 ms and more).
        self._claimed = [s.vip for s in self.cfg.services if self.roles[s.vip, s.port] == "primary"]
        for vip in self._claimed:
            await self._netlink(self.dp.claim_vip, vip)
        self._gratuitous_arp(self._claimed)
        claimed = time.monotonic_ns()
        for svc in self.cfg.services:
            self.dp.set_mode(svc.vip, svc.port, Mode.SIMPLEX)
        for svc in self.cfg.services:
            self.dp.pin_simplex(svc.vip, svc.port)
        pinned = time.monotonic_ns()
        last_ack = self.peer.last_acked_ns or detected
        self.failovers += 1
        self.last_failover = {
            "at": _utc_now(),
            "why": f"{self.peer.name} lost",
            "total_ms": (pinned - last_ack) / 1e6,
            "grant_ms": (granted - detected) / 1e6,
            "granted_ahead": self._granted_ahead,
            "phases_ms": {
                "detection": (detected - last_ack) / 1e6,
                "fencing_wait": (waited - detected) / 1e6,
                "identity": (claimed - waited) / 1e6,
                "data_plane": (pinned - claimed) / 1e6,
            },
        }
        self.sm.move(State.SIMPLEX, f"{self.peer.name}'s lease has run out; serving alone")
        self._notify("simplex", f"serving alone after {self.last_failover['total_ms']:.1f} ms")

    # ---- re-integration (CoRAL 4.4.5): the host serving alone stays the primary of
    # every service; the returning host becomes the backup and takes the VIPs.

    def _join(self) -> None:
        """This host starts while its peer serves alone: ask to join as its backup."""
        problem = _incompatible(self._info, self.peer.info)
        if problem:
            self._fence(f"cannot join {self.peer.name}: {problem}", rejoin=False)
            return
        self._joining_since = time.monotonic_ns()
        self.sm.move(State.JOINING, f"{self.peer.name} serves alone (epoch {self.peer.epoch})")
        self.sm.want(State.DUPLEX)
        self._beat()

    def _admit(self) -> None:
        """The peer asks to join while this host serves alone."""
        if self._admitting or self._info.get("join") == "accepted":
            return
        problem = _incompatible(self._info, self.peer.info)
        if problem:
            if self._info.get("refused") != problem:
                log.warning("%s: refusing %s's join: %s", self.name, self.peer.name, problem)
                self._set_info(refused=problem)
            return
        self._admitting = True
        self._spawn(self._reintegrate(), "reintegrate")

    async def _reintegrate(self) -> None:
        """Make this host the primary of every service, let the peer take the VIPs as
        backup, and go duplex once it has; connections of the simplex era stay ours."""
        assert self.dp is not None
        t0 = time.monotonic_ns()
        try:
            self._peer_mac = await self._neighbor_mac(PEER_MAC_TIMEOUT_S)
            for svc in self.cfg.services:
                await self._netlink(self.dp.hide_vip, svc.vip)
                if self.roles[svc.vip, svc.port] != "primary":
                    self.roles[svc.vip, svc.port] = "primary"
                    await self._netlink(self._configure, svc)  # fences it: simplex again
                    self.dp.set_mode(svc.vip, svc.port, Mode.SIMPLEX)
            self._claimed = []
            self.acking = True
            self._peer_duplex.clear()
            self._set_info(join="accepted", refused=None)
            self._beat()
            reconfigured = time.monotonic_ns()
            async with asyncio.timeout(JOIN_TIMEOUT_S):
                await self._peer_duplex.wait()
            joined = time.monotonic_ns()
            for svc in self.cfg.services:
                await self._set_duplex(svc)
        except (TimeoutError, DataPlaneError) as e:
            self._fence(f"re-integration of {self.peer.name} failed: {e or 'timeout'}")
            return
        finally:
            self._admitting = False
        self.peer.last_acked_ns = time.monotonic_ns()
        self._set_info(join=None)
        self.sm.move(State.DUPLEX, f"{self.peer.name} re-integrated as backup")
        done = time.monotonic_ns()
        self.last_reintegration = {
            "at": _utc_now(),
            "total_ms": (done - t0) / 1e6,
            "phases_ms": {
                "reconfigure": (reconfigured - t0) / 1e6,
                "peer_backup": (joined - reconfigured) / 1e6,
                "duplex": (done - joined) / 1e6,
            },
        }
        self._notify("duplex", f"{self.peer.name} re-integrated")
        if self.witness is not None:  # no longer renewed; giving it back is a courtesy
            await self.witness.release(self.epoch)

    async def _set_duplex(self, svc: ServiceConfig) -> None:
        """SVC duplex, checked against the peer's TCP settings (on the netlink
        thread: the check reads this host's settings)."""
        assert self.dp is not None and self.peer.settings is not None
        await self._netlink(
            self.dp.set_mode, svc.vip, svc.port, Mode.DUPLEX, peer_settings=self.peer.settings
        )

    def _become_backup(self) -> None:
        if not self._admitting:
            self._admitting = True
            self._spawn(self._join_as_backup(), "join")

    async def _join_as_backup(self) -> None:
        """The peer accepted: become the backup of every service, take the VIPs."""
        assert self.dp is not None and self.peer.settings is not None
        try:
            self._peer_mac = await self._neighbor_mac(PEER_MAC_TIMEOUT_S)
            for svc in self.cfg.services:
                self.roles[svc.vip, svc.port] = "backup"
                await self._netlink(self._configure, svc)
                await self._set_duplex(svc)
            vips = sorted({svc.vip for svc in self.cfg.services})
            self._gratuitous_arp(vips)  # the first announcement; the rest below
        except DataPlaneError as e:
            self._fence(f"joining {self.peer.name} failed: {e}")
            return
        finally:
            self._admitting = False
        self.sm.move(State.DUPLEX, f"joined {self.peer.name} as backup")
        self._beat()
        self._notify("duplex", f"joined {self.peer.name}")
        for _ in range(self.cfg.identity.arp_count - 1):
            await asyncio.sleep(self.cfg.identity.arp_spacing_ms / 1000)
            self._gratuitous_arp(vips)

    # ---- planned switch-over

    def _promote(self) -> dict[str, Any]:
        """Move every service to this host alone: ask the peer to step down (it fences
        itself; this host then takes over as after a failure, one lease later). The
        peer rejoins with `coral reintegrate` once its maintenance is done."""
        if self.sm.state is not State.DUPLEX:
            return {
                "ok": False,
                "error": f"promote needs a duplex pair; this host is {self.sm.state}",
            }
        self._set_info(step_down=self.peer.name)
        log.info("%s: promote: asking %s to step down", self.name, self.peer.name)
        return {"ok": True, "state": str(self.sm.state)}

    def _restart_to_rejoin(self, why: str) -> dict[str, Any]:
        """A fenced host rejoins by starting afresh: the agent exits with
        REJOIN_EXIT; its service manager (systemd: Restart=always) starts it again,
        and it joins its peer as backup."""
        if self.sm.state is not State.FENCED:
            return {
                "ok": False,
                "error": f"only a fenced agent rejoins; this one is {self.sm.state}",
            }
        self.exit_status = REJOIN_EXIT
        asyncio.get_running_loop().call_soon(self._stop, why)
        return {"ok": True, "state": "restarting"}

    def _rejoin_due_ns(self) -> int | None:
        """When this fenced host rejoins by itself (monotonic ns); None: not by itself,
        or not yet known (its peer is not heard serving alone)."""
        if not (self._rejoin_by_itself and self._peer_alone_since):
            return None
        return self._peer_alone_since + self.cfg.host.rejoin_after_s * 1_000_000_000

    def _rejoin_when_due(self, now: int) -> None:
        """[host] rejoin_after_s: a host fenced while its peer took over (it froze, lost
        its links, lost a split brain) rejoins as its backup once it has heard the
        peer serving alone that long, without waiting for `coral reintegrate`:
        hearing it proves the paths between them are back."""
        if now - self.peer.last_rx_ns > self.lease_s * 1e9:
            self._peer_alone_since = 0  # heard no more: the wait starts again
        due = self._rejoin_due_ns()
        if due is not None and now >= due:
            self._rejoin_by_itself = False
            after = self.cfg.host.rejoin_after_s
            self._restart_to_rejoin(f"{self.peer.name} served alone for {after} s: rejoining")

    def _set_info(self, **changes: Any) -> None:
        for key, value in changes.items():
            if value is None:
                self._info.pop(key, None)
            else:
                self._info[key] = value
        self._info_bytes = _compact(self._info)

    def _gratuitous_arp(self, vips: list[str]) -> None:
        """One gratuitous ARP for each of VIPS (microseconds: an open packet socket).
        A frame that does not leave is logged, never fatal: the announcement is
        repeated, and ENOBUFS means this host's data plane dropped it (fenced, or
        the lease ran out), which the log line shows."""
        assert self._announcer is not None and self.dp is not None
        for vip in vips:
            try:
                self._announcer.announce(vip)
            except OSError as e:
                self.arp_unsent += 1
                log.warning(
                    "%s: gratuitous ARP for %s not sent: %s (state %s, lease %.3f s left)",
                    self.name, vip, e.strerror, self.sm.state, self.dp.lease_remaining_s(),
                )  # fmt: skip

    async def _announce(self) -> None:
        """Gratuitous ARP for the claimed VIPs until an outside host answers through the
        router (the router's ARP entry moved), then again every arp_refresh_s."""
        ident = self.cfg.identity
        confirmed = not ident.confirm_hosts
        while self.sm.state is State.SIMPLEX:
            for _ in range(ident.arp_count):
                self._gratuitous_arp(self._claimed)
                await asyncio.sleep(ident.arp_spacing_ms / 1000)
            if not confirmed:
                confirmed = all(
                    [
                        await reach.any_reachable(ident.confirm_hosts, source=v)
                        for v in self._claimed
                    ]
                )
                if confirmed:
                    log.info("%s: VIP move confirmed through the router", self.name)
                    if self.last_failover is not None:
                        self.last_failover["confirmed_ms"] = (
                            time.monotonic_ns() - self._lost_at_ns
                        ) / 1e6
                    continue
            if confirmed:
                if not ident.arp_refresh_s:
                    return
                await asyncio.sleep(ident.arp_refresh_s)

    def _renew_alone(self) -> None:
        """The lease while alone: the witness's renewed grant is the evidence; without a
        witness, the peer's continued silence."""
        assert self.dp is not None
        if time.monotonic_ns() - self._renewed_ns < ALONE_LEASE_S / 4 * 1e9:
            return
        if self.witness is None:
            self.dp.renew_lease(self.epoch, ALONE_LEASE_S)
            self._renewed_ns = time.monotonic_ns()
            return
        if self._renewing:
            if self.dp.lease_remaining_s() == 0:
                self._fence("the lease ran out: the witness did not renew the grant in time")
            return
        self._renewing = True
        self._spawn(self._renew_with_witness(), "renew")

    async def _renew_with_witness(self) -> None:
        assert self.dp is not None and self.witness is not None
        try:
            asked = time.monotonic_ns()
            grant = await self.witness.request(self.epoch, ALONE_LEASE_S)
            self.witness_reachable = True
            self.witness_state = {"holder": grant.holder, "epoch": grant.epoch}
            if self.sm.state is not State.SIMPLEX:
                pass  # a re-integration released the grant meanwhile: nothing to renew
            elif not grant.granted:
                self._fence(f"the witness now grants epoch {grant.epoch} to {grant.holder}")
            else:
                self.dp.renew_lease(self.epoch, ALONE_LEASE_S - (time.monotonic_ns() - asked) / 1e9)
                self._renewed_ns = asked
        except WitnessUnreachable:
            self.witness_reachable = False  # the lease runs out by itself if this lasts
        finally:
            self._renewing = False

    # ---- ending badly

    def _fence_dataplane(self) -> None:
        if self.dp is not None:
            self.dp.fence()

    def _fence(self, why: str, rejoin: bool = True) -> None:
        """Stop serving. REJOIN: the cause may heal by itself (not an operator's
        order, a step-down or a refusal that would only repeat), so with [host]
        rejoin_after_s set the host rejoins once its peer is heard serving alone."""
        if not self.sm.allowed(State.FENCED):
            return
        self._fence_dataplane()
        self.acking = False
        self.sm.move(State.FENCED, why)
        self._rejoin_by_itself = rejoin and self.cfg.host.rejoin_after_s > 0
        self._notify("fenced", why)

    def _child_crashed(self, name: str, status: int) -> None:
        self._crash(f"{name} exited with status {status}")

    def _crash(self, why: str) -> None:
        """A part of this host died: the whole host is down (fence, kill, stop heartbeats)."""
        if not self.sm.allowed(State.FAILED):
            return
        self._fence_dataplane()
        self.supervisor.kill_all()
        if self.hb is not None:
            self.hb.close()
            self.hb = None
        self.sm.move(State.FAILED, why)
        self._notify("failed", why)
        self.exit_status = 1
        self._done.set()

    # ---- telling others

    def _notify(self, event: str, why: str) -> None:
        """Queue EVENT for the notify hook (_notifier delivers it)."""
        if self.cfg.notify.command:
            self._events.put_nowait((event, why))

    async def _notifier(self) -> None:
        """Run the hook for each event, one at a time and in order, each with the
        status when it runs. Never during a takeover: the status reads every
        connection and the hook is a fork, both on the takeover's event loop."""
        while True:
            event, why = await self._events.get()
            try:
                await self._takeover_idle.wait()
                payload = {"event": event, "why": why, "status": self.status()}
                await _run_hook(list(self.cfg.notify.command), json.dumps(payload).encode())
            finally:
                self._events.task_done()

    async def _status_loop(self) -> None:
        refused, swept = 0, time.monotonic()
        while True:
            self.metrics.update(self.status())
            if self.dp is not None and time.monotonic() - swept > GC_EVERY_S:
                swept = time.monotonic()  # entries of connections whose sockets are gone
                await self._netlink(self.dp.gc, GC_IDLE_S)
            if self.hb is not None:
                now = self.hb.counters["forged"]
                if now > refused:
                    log.warning(
                        "%s: %d heartbeats failed authentication: forged, or the peer has "
                        "the wrong key", self.name, now - refused,
                    )  # fmt: skip
                refused = now
            await asyncio.sleep(STATUS_EVERY_S)

    def status(self) -> dict[str, Any]:
        now = time.monotonic_ns()
        peer = self.peer
        lease = self.dp.lease_remaining_s() if self.dp is not None else 0.0
        conns = self.dp.connections() if self.dp is not None else []
        services = []
        for svc in self.cfg.services:
            mode = "unknown"
            if self.dp is not None:
                with contextlib.suppress(DataPlaneError):
                    mode = self.dp.mode(svc.vip, svc.port).name.lower()
            mine = [c for c in conns if (c.vip, c.vip_port) == (svc.vip, svc.port)]
            child = self.supervisor.children.get(f"proxy-{svc.vip}-{svc.port}")
            services.append({
                "vip": svc.vip, "port": svc.port, "role": self.roles[svc.vip, svc.port],
                "mode": mode,
                "connections": {
                    "duplex": sum(c.mode is Mode.DUPLEX for c in mine),
                    "simplex": sum(c.mode is Mode.SIMPLEX for c in mine),
                },
                "proxy": {"pid": child.proc.pid if child else None,
                          "running": bool(child and child.running)},
            })  # fmt: skip
        hb = self.hb
        return {
            "host": self.name,
            "pid": os.getpid(),
            "peer": peer.name,
            "state": str(self.sm.state),
            "wantstate": str(self.sm.wantstate),
            "since_s": round(self.sm.since_s, 3),
            "epoch": self.epoch,
            "lease_remaining_s": round(lease, 4),
            "peer_status": {
                "alive": bool(peer.last_rx_ns) and now - peer.last_rx_ns < self.lease_s * 1e9,
                "state": peer.state,
                "epoch": peer.epoch,
                "last_seen_s": _age(now, peer.last_rx_ns),
                "rtt_ms": None if peer.rtt_s is None else round(peer.rtt_s * 1e3, 3),
                "misses": _misses(now, peer.last_rx_ns, self.interval),
                "paths": {
                    name: {
                        "received": st.received,
                        "last_seen_s": _age(now, st.last_seen_ns),
                        "rtt_ms": None if st.rtt_s is None else round(st.rtt_s * 1e3, 3),
                    }
                    for name, st in (hb.path_stats.items() if hb else [])
                },
            },
            "heartbeats": dict(hb.counters) if hb else {},
            "witness": None
            if self.cfg.witness is None
            else {
                "address": "{}:{}".format(*self.cfg.witness.address),
                "reachable": self.witness_reachable,
                **(self.witness_state or {"holder": None, "epoch": 0}),
            },
            "services": services,
            "last_failover": self.last_failover,
            "failovers": self.failovers,
            "arp_unsent": self.arp_unsent,
            "last_reintegration": self.last_reintegration,
            "auto_rejoin": self._auto_rejoin(now),
            "transitions": [t.as_dict() for t in self.sm.history],
        }

    def _auto_rejoin(self, now: int) -> dict[str, Any] | None:
        """Whether and when this fenced host rejoins by itself (status)."""
        if self.sm.state is not State.FENCED or not self._rejoin_by_itself:
            return None
        due = self._rejoin_due_ns()
        return {
            "after_s": self.cfg.host.rejoin_after_s,
            "in_s": None if due is None else round(max(0, due - now) / 1e9, 1),
        }

    async def _on_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One JSON request per connection: {"cmd": "status"} or {"cmd": "fence"}."""
        try:
            async with asyncio.timeout(5):
                request = json.loads(await reader.readline() or b"{}")
            cmd = request.get("cmd")
            if cmd == "status":
                reply: dict[str, Any] = {"ok": True, "status": self.status()}
            elif cmd == "fence":
                self._fence(f"operator: {request.get('why') or 'coral fence'}", rejoin=False)
                reply = {"ok": True, "state": str(self.sm.state)}
            elif cmd == "promote":
                reply = self._promote()
            elif cmd == "reintegrate":
                reply = self._restart_to_rejoin("operator: reintegrate")
            else:
                reply = {"ok": False, "error": f"unknown command {cmd!r}"}
        except (ValueError, TimeoutError, AttributeError) as e:
            reply = {"ok": False, "error": f"bad request: {e}"}
        writer.write(json.dumps(reply).encode() + b"\n")
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()


def _grant_left_s(answer: WitnessAnswer) -> float:
    """How long the grant of ANSWER lasts from now."""
    _, grant, received_ns = answer
    return grant.remaining_s - (time.monotonic_ns() - received_ns) / 1e9


def _age(now: int, then: int) -> float | None:
    return None if not then else round((now - then) / 1e9, 4)


def _misses(now: int, then: int, interval: float) -> int:
    return 0 if not then else max(0, int((now - then) / 1e9 / interval) - 1)


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def _compact(info: dict[str, Any]) -> bytes:
    return json.dumps(info, separators=(",", ":")).encode()


def _info_of(raw: bytes) -> dict[str, Any] | None:
    """A heartbeat's info (authenticated already); None if absent or not ours."""
    try:
        info = json.loads(raw) if raw else None
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def _settings_of(info: dict[str, Any]) -> settings.TcpSettings | None:
    try:
        return settings.TcpSettings(dict(info["sysctls"]), int(info["mtu"]))
    except (KeyError, TypeError, ValueError):
        return None


def _incompatible(ours: dict[str, Any], theirs: dict[str, Any] | None) -> str | None:
    """Why two agents cannot form a pair (protocol, services); None if they can.
    The protocol number changes only when a change breaks the pair: a host can
    then be upgraded while its peer serves alone, one at a time."""
    if theirs is None:
        return "its heartbeats carry no pair information (an older coral?)"
    if theirs.get("v") != ours["v"]:
        return f"pair protocol {theirs.get('v')} there, {ours['v']} here"
    if theirs.get("services") != ours["services"]:
        return f"services differ: {theirs.get('services')} there, {ours['services']} here"
    return None


async def _run_hook(argv: list[str], payload: bytes) -> None:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        async with asyncio.timeout(10):
            await proc.communicate(payload)
    except (OSError, TimeoutError) as e:
        log.warning("notify hook %s failed: %s", argv[0], e)


async def _wait_listening(vip: str, port: int, timeout: float) -> None:
    """Until a socket listens on VIP:PORT in this namespace (a proxy just started);
    RuntimeError after TIMEOUT seconds."""
    want = f"{socket.inet_aton(vip)[::-1].hex().upper()}:{port:04X}"
    deadline = time.monotonic() + timeout
    while True:
        with open("/proc/self/net/tcp") as table:
            next(table)
            if any(ln.split()[1] == want and ln.split()[3] == "0A" for ln in table):
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on {vip}:{port} after {timeout:.0f} s")
        await asyncio.sleep(0.02)


def _destroy_sockets(vip: str, port: int) -> None:
    """Stale service sockets of an earlier run (a crash): destroyed before this host
    may serve again (SOCK_DESTROY through `ss -K`; start-up only)."""
    subprocess.run(
        ["ss", "-K", "-t", "-n", "state", "all", "src", vip, "sport", "=", f":{port}"],
        check=False,
        capture_output=True,
        timeout=10,
    )
