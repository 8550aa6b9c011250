"""The request-reply tool answers right, and its client catches every kind of wrong reply."""

from __future__ import annotations

import contextlib
import json
import socket
import threading

import pytest

from coral import cli, reqrep, stream
from coral.reqrep import ReqRepConfig


def start_server(mark_closing: stream.Marker | None = None) -> tuple[str, int]:
    srv = reqrep.listen_socket("127.0.0.1", 0)
    threading.Thread(target=reqrep.serve, args=(srv, mark_closing), daemon=True).start()
    return srv.getsockname()


def bad_server(mode: str) -> tuple[str, int]:
    """A server that gets every reply wrong in one way (MODE)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def handle(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while req := conn.recv(reqrep.REQUEST.size, socket.MSG_WAITALL):
                _, size, rid = reqrep.REQUEST.unpack(req)
                reply = bytearray(reqrep.reply_bytes(size, rid))
                if mode == "flip":
                    reply[size // 2] ^= 1
                elif mode == "extra":
                    reply += b"x"
                elif mode == "truncate":
                    del reply[size // 2 :]
                if mode != "silent":
                    conn.sendall(reply)
                if mode == "truncate":
                    return
            threading.Event().wait(5)  # "silent": never answers, never closes

    def accept() -> None:
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return srv.getsockname()


def test_every_reply_is_verified_and_closes_are_marked() -> None:
    marked: list[tuple[str, int]] = []
    host, port = start_server(lambda sock: marked.append(sock.getpeername()))
    cfg = ReqRepConfig(host, port, connections=3, requests=600, size=15 * 1024)
    out = reqrep.run(cfg).to_json()
    assert out["counts"] == {"ok": 600, "failed": 0, "corrupted": 0}, out["problems"]
    lat = out["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert out["throughput_rps"] > 0
    assert len(marked) == 3  # every connection marked closing before its FIN


def test_replies_differ_per_request() -> None:
    assert reqrep.reply_bytes(1024, 1) != reqrep.reply_bytes(1024, 2)
    assert len(reqrep.reply_bytes(reqrep.MAX_SIZE, 10**12)) == reqrep.MAX_SIZE


@pytest.mark.parametrize(
    ("mode", "outcome", "detail"),
    [
        ("flip", "corrupted", "wrong byte at offset 512"),
        ("extra", "corrupted", "1 bytes beyond the reply"),
        ("truncate", "failed", "EOF after 512 bytes"),
        ("silent", "failed", "timeout on request"),
    ],
)
def test_bad_replies_are_caught(mode: str, outcome: str, detail: str) -> None:
    cfg = ReqRepConfig(*bad_server(mode), connections=2, requests=4, size=1024, timeout=0.3)
    out = reqrep.run(cfg).to_json()
    assert out["counts"]["ok"] == 0
    assert out["counts"][outcome] == 4, out
    assert any(detail in p for p in out["problems"]), out["problems"]


def test_cli_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    host, port = start_server()
    assert cli.main(["reqrep", "run", f"{host}:{port}", "--requests", "50", "--size", "100"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["ok"] == 50
    host, port = bad_server("flip")
    assert cli.main(["reqrep", "run", f"{host}:{port}", "--requests", "5"]) == 1
    assert json.loads(capsys.readouterr().out)["counts"]["corrupted"] == 5
