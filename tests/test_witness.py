"""The split-brain witness: the grant rules, persistence across a restart, forged,
replayed and stale messages in both directions, and the `coral witness` command."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import socket
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from coral.agent.witness import (
    Grant,
    Op,
    Reply,
    Request,
    WitnessClient,
    WitnessError,
    WitnessServer,
    WitnessUnreachable,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)
from coral.cli import build_parser

pytestmark = pytest.mark.timeout(20)

T = TypeVar("T")

KEY = b"w" * 32
OTHER_KEY = b"x" * 32
REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python")


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(10):
            return await coro

    return asyncio.run(bounded())


@asynccontextmanager
async def witness(state_file: Path | None = None) -> AsyncIterator[WitnessServer]:
    server = await WitnessServer.start(
        ("127.0.0.1", 0), KEY, None if state_file is None else str(state_file)
    )
    try:
        yield server
    finally:
        while CLIENTS:
            CLIENTS.pop().close()
        await server.close()


CLIENTS: list[WitnessClient] = []
"""Clients made by client(), closed with their witness."""


def client(server: WitnessServer, name: str, key: bytes = KEY, **kw: Any) -> WitnessClient:
    c = WitnessClient(server.address, key, name, **{"timeout_s": 0.5, **kw})
    CLIENTS.append(c)
    return c


def request(name: str, epoch: int = 1) -> Request:
    return Request(Op.GRANT, "", name, secrets.token_bytes(16), time.time_ns(), epoch, 5000)


# ---- wire format


def test_messages_round_trip_and_refuse_forgeries() -> None:
    req = Request(Op.RELEASE, "pair-1", "primäry", b"n" * 16, 12345, 2**64 - 1, 0)
    assert decode_request(encode_request(req, KEY), KEY) == req
    reply = Reply(Op.GRANT, True, "backup", b"n" * 16, 9, 1500)
    assert decode_reply(encode_reply(reply, KEY), KEY) == reply
    nobody = Reply(Op.GRANT, False, None, b"n" * 16, 0, 0)
    assert decode_reply(encode_reply(nobody, KEY), KEY) == nobody
    with pytest.raises(WitnessError) as e:
        decode_request(encode_request(req, OTHER_KEY), KEY)
    assert e.value.kind == "forged"
    frame = encode_request(req, KEY)
    # A request is not a reply, even with a valid tag.
    for data, decoder in [
        (frame, decode_reply),
        (frame[:-1], decode_request),
        (b"", decode_request),
        (frame[:4] + b"\x07" + frame[5:], decode_request),
    ]:
        with pytest.raises(WitnessError) as e:
            decoder(data, KEY)
        assert e.value.kind == "garbled"


def test_fuzzed_requests_raise_only_witness_errors() -> None:
    import hashlib
    import hmac
    import random

    rng = random.Random(7)
    frame = encode_request(request("primary"), KEY)
    for i in range(3000):
        data = bytearray(frame[:-32])
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(len(data) + 1)
            if rng.random() < 0.5 and data:
                data[pos % len(data)] = rng.randrange(256)
            else:
                data[pos:pos] = rng.randbytes(rng.randint(0, 4))
        signed = bytes(data)
        out = signed + hmac.digest(KEY, signed, hashlib.sha256) if i % 2 else signed
        try:
            decode_request(out, KEY)
        except WitnessError as e:
            assert e.kind in ("garbled", "forged")


# ---- the rules

G, R = True, False
# (host, op, epoch, duration_s, granted, holder, epoch told); "expire" waits for the
# current grant to run out.
RULES: list[tuple[str, str, int, float, bool, str | None, int]] = [
    ("primary", "request", 1, 5.0, G, "primary", 1),  # nobody holds it: granted
    ("primary", "request", 1, 5.0, G, "primary", 1),  # the holder renews
    ("backup", "request", 2, 5.0, R, "primary", 1),  # the other host: refused
    ("primary", "request", 2, 5.0, G, "primary", 2),  # the holder moves to a higher epoch
    ("backup", "release", 2, 0, R, "primary", 2),  # not the holder: nothing released
    ("primary", "release", 2, 0, R, None, 2),  # released: the pair is duplex again
    ("backup", "request", 2, 5.0, R, None, 2),  # an epoch already granted: refused
    ("backup", "request", 3, 0.3, G, "backup", 3),  # above every epoch granted
    ("primary", "request", 4, 5.0, R, "backup", 3),  # refused while it lasts
    ("", "expire", 0, 0, R, None, 0),
    ("backup", "request", 3, 5.0, R, None, 3),  # an expired grant is not renewed
    ("primary", "request", 3, 5.0, R, None, 3),  # an equal epoch: refused
    ("primary", "request", 1, 5.0, R, None, 3),  # a lower one: refused
    ("primary", "request", 4, 5.0, G, "primary", 4),  # a higher one: granted
]


def test_grant_rules() -> None:
    async def main() -> None:
        async with witness() as server:
            hosts = {name: client(server, name) for name in ("primary", "backup")}
            last: Grant | None = None
            for step, (host, op, epoch, duration, granted, holder, told) in enumerate(RULES):
                if op == "expire":
                    assert last is not None
                    await asyncio.sleep(last.remaining_s + 0.02)  # the time under test
                    continue
                if op == "release":
                    await hosts[host].release(epoch)
                    got = server.state()["pairs"][""]
                    assert (got["holder"], got["epoch"]) == (holder, told), step
                    continue
                last = await hosts[host].request(epoch, duration)
                assert (last.granted, last.holder, last.epoch) == (granted, holder, told), step
                if granted:
                    assert 0 < last.remaining_s <= duration
                elif holder is not None:
                    assert 0 < last.remaining_s <= 5.0
                else:
                    assert last.remaining_s == 0
            assert {k: v for k, v in server.counters.items() if v} == {
                "requests": 11,
                "granted": 4,
                "renewed": 1,
                "refused": 6,
                "release_requests": 2,
                "released": 1,
            }
            assert hosts["primary"].counters["granted"] == 4
            assert hosts["primary"].reachable is True

    run(main())


def test_exactly_one_of_two_concurrent_requests_is_granted() -> None:
    async def main() -> None:
        async with witness() as server:
            a, b = client(server, "primary"), client(server, "backup")
            grants = await asyncio.gather(a.request(7, 5), b.request(7, 5))
            assert sorted(g.granted for g in grants) == [False, True]
            winner = "primary" if grants[0].granted else "backup"
            assert all(g.holder == winner and g.epoch == 7 for g in grants)

    run(main())


def test_pairs_are_independent() -> None:
    async def main() -> None:
        async with witness() as server:
            one = client(server, "primary", pair="one")
            two = client(server, "primary", pair="two")
            assert (await one.request(4, 5)).granted
            assert (await two.request(1, 5)).granted
            assert server.state()["pairs"]["two"]["epoch"] == 1

    run(main())


# ---- persistence


def test_a_restarted_witness_keeps_grants_and_epochs(tmp_path: Path) -> None:
    state = tmp_path / "witness.json"

    async def main() -> None:
        async with witness(state) as server:
            assert (await client(server, "primary").request(4, 30)).granted
        doc = json.loads(state.read_text())
        assert doc["pairs"][""]["holder"] == "primary" and doc["pairs"][""]["epoch"] == 4

        async with witness(state) as server:  # restarted: the grant still stands
            refused = await client(server, "backup").request(5, 5)
            assert (refused.granted, refused.holder, refused.epoch) == (False, "primary", 4)
            assert 25 < refused.remaining_s <= 30
            primary = client(server, "primary")
            assert (await primary.request(4, 30)).granted  # and is renewed
            await primary.release(4)
            assert server.counters["released"] == 1

        async with witness(state) as server:  # released: no holder, but epoch 4 is used
            assert server.state()["pairs"][""] == {"holder": None, "epoch": 4, "remaining_s": 0}
            backup = client(server, "backup")
            assert not (await backup.request(4, 5)).granted
            assert (await backup.request(5, 5)).granted

    run(main())
    assert not (tmp_path / "witness.json.tmp").exists()


@pytest.mark.parametrize("content", ["{", '{"version": 2, "pairs": {}}', '{"pairs": []}', "[]"])
def test_a_corrupt_state_file_is_refused(tmp_path: Path, content: str) -> None:
    state = tmp_path / "witness.json"
    state.write_text(content)

    async def main() -> None:
        with pytest.raises(ValueError, match="not a witness state file"):
            await WitnessServer.start(("127.0.0.1", 0), KEY, str(state))

    run(main())


# ---- bad messages


def test_a_client_with_the_wrong_key_gets_no_reply() -> None:
    async def main() -> None:
        async with witness() as server:
            forger = client(server, "primary", key=OTHER_KEY, timeout_s=0.05, attempts=2)
            with pytest.raises(WitnessUnreachable):
                await forger.request(1, 5)
            await forger.release(1)  # best effort: does not raise
            assert server.counters["forged"] == 4
            assert server.counters["requests"] == 0
            assert forger.reachable is False
            assert forger.counters["unreachable"] == 2

    run(main())


def test_replayed_stale_and_garbled_requests_are_counted_and_unanswered() -> None:
    async def main() -> None:
        async with witness() as server:
            loop = asyncio.get_running_loop()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
                raw.setblocking(False)
                raw.connect(server.address)

                async def reply() -> Reply:
                    return decode_reply(await loop.sock_recv(raw, 2048), KEY)

                first = request("primary")
                raw.send(encode_request(first, KEY))
                answer = await reply()
                assert answer.nonce == first.nonce and answer.granted

                raw.send(encode_request(first, KEY))  # replayed
                old = Request(Op.GRANT, "", "primary", b"o" * 16, time.time_ns() - 6 * 10**9, 1, 1)
                raw.send(encode_request(old, KEY))  # stale
                ahead = Request(Op.GRANT, "", "backup", b"a" * 16, time.time_ns() + 6 * 10**9, 9, 1)
                raw.send(encode_request(ahead, KEY))  # from the future
                raw.send(b"CRWQ\x01nonsense")
                raw.send(encode_request(request("backup", 2), OTHER_KEY))
                # Answered in order: the next reply is this one's, so none came before.
                fresh = request("primary")
                raw.send(encode_request(fresh, KEY))
                answer = await reply()
                assert answer.nonce == fresh.nonce and answer.granted
            c = server.counters
            assert (c["replayed"], c["garbled"], c["forged"]) == (3, 1, 1)
            assert (c["requests"], c["granted"], c["renewed"]) == (2, 1, 1)

    run(main())


# ---- the client against a scripted witness


@asynccontextmanager
async def fake_witness(
    timeout_s: float = 0.5,
) -> AsyncIterator[tuple[socket.socket, WitnessClient]]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        c = WitnessClient(sock.getsockname(), KEY, "primary", timeout_s=timeout_s, attempts=3)
        try:
            yield sock, c
        finally:
            c.close()


async def receive(sock: socket.socket) -> tuple[Request, Any]:
    data, addr = await asyncio.get_running_loop().sock_recvfrom(sock, 2048)
    return decode_request(data, KEY), addr


def test_the_client_accepts_only_genuine_replies_to_its_own_request() -> None:
    async def main() -> None:
        async with fake_witness() as (sock, c):
            call = asyncio.create_task(c.request(3, 2.0))
            req, addr = await receive(sock)
            assert (req.op, req.host, req.epoch, req.duration_ms) == (Op.GRANT, "primary", 3, 2000)
            good = Reply(Op.GRANT, True, "primary", req.nonce, 3, 2000)
            sock.sendto(encode_reply(good, OTHER_KEY), addr)  # forged
            sock.sendto(
                encode_reply(Reply(Op.GRANT, True, "primary", b"?" * 16, 3, 2000), KEY), addr
            )
            sock.sendto(encode_reply(Reply(Op.RELEASE, True, None, req.nonce, 3, 0), KEY), addr)
            sock.sendto(b"junk", addr)
            sock.sendto(encode_reply(good, KEY), addr)
            grant = await call
            assert grant.granted and grant.holder == "primary" and grant.epoch == 3
            assert 1.9 < grant.remaining_s <= 2.0  # less the round trip
            assert (c.counters["forged"], c.counters["stale"], c.counters["garbled"]) == (1, 2, 1)
            assert c.counters["timeouts"] == 0

    run(main())


def test_the_client_retries_with_a_fresh_nonce_and_accepts_a_late_reply() -> None:
    async def main() -> None:
        async with fake_witness(timeout_s=0.1) as (sock, c):
            call = asyncio.create_task(c.request(3, 2.0))
            first, addr = await receive(sock)  # dropped, as if lost
            second, _ = await receive(sock)  # the retry, after one timeout
            assert second.nonce != first.nonce
            late = Reply(Op.GRANT, False, "backup", first.nonce, 8, 1234)
            sock.sendto(encode_reply(late, KEY), addr)
            grant = await call
            assert grant == Grant(False, "backup", 8, 1.234)  # a refusal is not reduced
            assert c.counters["timeouts"] == 1 and c.counters["refused"] == 1

    run(main())


# ---- the command


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "key"
    path.write_bytes(KEY + b"\n")
    return path


# args (formatted with the names below), what stderr must say, whether to run it as a
# new process (the first few: the command as users run it) or in this one (faster).
COMMAND_ERRORS = [
    (["--listen", "127.0.0.1:0", "--key-file", "{short}"], "at least 16 bytes", True),
    (["--listen", "127.0.0.1:0", "--key-file", "{missing}"], "cannot read the key", True),
    (["--listen", "nowhere", "--key-file", "{key}"], "need HOST:PORT", True),
    (["--listen", "127.0.0.1:65536", "--key-file", "{key}"], "need HOST:PORT", False),
    (["--listen", "127.0.0.1:{busy}", "--key-file", "{key}"], "cannot listen on", False),
    (
        ["--listen", "127.0.0.1:0", "--key-file", "{key}", "--state-file", "{corrupt}"],
        "not a witness state file",
        False,
    ),
    (
        ["--listen", "127.0.0.1:0", "--key-file", "{key}", "--state-file", "{nodir}"],
        "cannot write the state file",
        False,
    ),
]


def in_process(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int | None, str]:
    try:
        parsed = build_parser().parse_args(["witness", *args])
        code: int | None = parsed.func(parsed)
    except SystemExit as e:  # argparse
        code = int(e.code) if isinstance(e.code, int) else None
    return code, capsys.readouterr().err


def test_command_errors(tmp_path: Path, key_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each bad invocation exits 2 with a one-line reason."""
    (tmp_path / "short").write_bytes(b"  fifteen-bytes!  \n")
    (tmp_path / "corrupt").write_text("{")

    async def new_process(args: list[str]) -> tuple[int | None, str]:
        proc = await asyncio.create_subprocess_exec(
            PYTHON,
            *("-m", "coral", "witness", *args),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            cwd=REPO,
        )
        _, err = await proc.communicate()
        return proc.returncode, err.decode()

    async def processes(cases: list[list[str]]) -> list[tuple[int | None, str]]:
        return await asyncio.gather(*(new_process(args) for args in cases))

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        names = {
            "short": tmp_path / "short",
            "missing": tmp_path / "missing",
            "key": key_file,
            "busy": busy.getsockname()[1],
            "corrupt": tmp_path / "corrupt",
            "nodir": tmp_path / "no" / "state.json",
        }
        cases = [([a.format(**names) for a in args], sub) for args, _, sub in COMMAND_ERRORS]
        spawned = iter(run(processes([args for args, sub in cases if sub])))
        results = [next(spawned) if sub else in_process(args, capsys) for args, sub in cases]
    for (args, message, _), (code, err) in zip(COMMAND_ERRORS, results, strict=True):
        assert code == 2, (args, err)
        assert message in err, (args, err)
        assert "Traceback" not in err, (args, err)


def test_command_serves_reports_and_stops(tmp_path: Path, key_file: Path) -> None:
    state = tmp_path / "state.json"

    async def main() -> None:
        proc = await asyncio.create_subprocess_exec(
            PYTHON,
            "-m",
            "coral",
            "witness",
            *("--listen", "127.0.0.1:0", "--key-file", str(key_file), "--state-file", str(state)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=REPO,
        )
        assert proc.stdout is not None and proc.stderr is not None
        try:
            line = (await proc.stderr.readline()).decode()
            assert "listening on 127.0.0.1:" in line, line
            port = int(line.split("127.0.0.1:")[1].split()[0])
            c = WitnessClient(("127.0.0.1", port), KEY, "primary", timeout_s=0.5)
            assert (await c.request(2, 10)).granted
            c.close()
            proc.send_signal(signal.SIGUSR1)
            while True:
                line = (await proc.stderr.readline()).decode()
                assert line, "stderr closed before the report"
                if line.startswith("{"):
                    break
            report = json.loads(line)
            assert report["state"]["pairs"][""]["holder"] == "primary"
            assert report["counters"]["granted"] == 1
            proc.send_signal(signal.SIGTERM)
            out, _ = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0
        assert json.loads(out)["granted"] == 1
        assert json.loads(state.read_text())["pairs"][""]["epoch"] == 2

    run(main())


def test_the_command_is_registered() -> None:
    args = build_parser().parse_args(["witness", "--listen", "[::1]:0", "--key-file", "k"])
    assert (args.listen, args.key_file, args.state_file) == (("::1", 0), "k", None)
