"""The deterministic stream tool catches every kind of wrong byte stream."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

from coral import stream


@pytest.fixture
def server() -> Iterator[tuple[str, int]]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    srv.close()
    threading.Thread(target=stream.serve, args=("127.0.0.1", port), daemon=True).start()
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            threading.Event().wait(0.01)
    yield "127.0.0.1", port


def test_streams_both_ways_are_verified(server: tuple[str, int]) -> None:
    report = stream.run_streams(*server, streams=3, up=3_000_000, down=5_000_000, timeout=10)
    assert report.ok, report.to_json()
    assert [r.received for r in report.results] == [5_000_000] * 3


def test_pattern_never_lines_up_with_a_shifted_copy() -> None:
    a = bytes(stream.stream_bytes(1, "down", 0, 4096))
    assert a != bytes(stream.stream_bytes(1, "down", 65536, 4096))
    assert a != bytes(stream.stream_bytes(2, "down", 0, 4096))
    assert a != bytes(stream.stream_bytes(1, "up", 0, 4096))


def _bad_server(mode: str) -> tuple[str, int]:
    """A server that gets the download wrong in one way."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def handle() -> None:
        conn, _ = srv.accept()
        srv.close()
        # the client hangs up as soon as it sees the fault: that is not an error here
        with conn, contextlib.suppress(OSError):
            _, up, down, seed = stream.HEADER.unpack(stream._recv_exact(conn, stream.HEADER.size))
            stream._recv_exact(conn, up)
            data = bytearray(
                b"".join(
                    bytes(stream.stream_bytes(seed, "down", o, min(stream.CHUNK, down - o)))
                    for o in range(0, down, stream.CHUNK)
                )
            )
            if mode == "flip":
                data[777] ^= 1
            elif mode == "gap":
                del data[1000:2000]
                data += b"\0" * 1000
            conn.sendall(bytes(data[: down // 2] if mode == "truncate" else data))
            if mode == "truncate":
                return
            conn.sendall(b"\0" * 32)  # a wrong digest of the upload

    threading.Thread(target=handle, daemon=True).start()
    return srv.getsockname()


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        ("flip", "offset 777"),
        ("gap", "offset 1000"),
        ("truncate", "EOF at byte 150000"),
        ("digest", "digest"),
    ],
)
def test_bad_streams_are_caught(mode: str, error: str) -> None:
    r = stream.run_stream(0, *_bad_server(mode), up=10_000, down=300_000, seed=5, timeout=5)
    assert not r.ok
    assert r.error is not None and error in r.error, r.error
