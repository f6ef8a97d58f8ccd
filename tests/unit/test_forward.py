"""PortForward on loopback only: byte copying, half-close, refused upstreams, close."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from pytest_smolvm.network.forward import PortForward


@pytest.fixture
def upstream() -> Iterator[socket.socket]:
    srv = socket.create_server(("127.0.0.1", 0))
    yield srv
    srv.close()


def _reply_after_eof(srv: socket.socket) -> None:
    """Read until the client's end of stream, then answer with what came, reversed."""
    conn, _ = srv.accept()
    with conn:
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        conn.sendall(data[::-1])


def test_half_close_reaches_upstream_and_the_answer_comes_back(upstream: socket.socket) -> None:
    fwd = PortForward(lambda: socket.create_connection(upstream.getsockname()), "t")
    server = threading.Thread(target=_reply_after_eof, args=(upstream,))
    server.start()
    try:
        payload = bytes(range(256)) * 4096  # 1 MiB: more than any buffer the forwarder holds
        with socket.create_connection(("127.0.0.1", fwd.host_port), timeout=30) as c:
            sender = threading.Thread(target=lambda: (c.sendall(payload), c.shutdown(socket.SHUT_WR)))
            sender.start()
            got = b""
            while chunk := c.recv(65536):
                got += chunk
            sender.join()
        assert got == payload[::-1]
    finally:
        server.join(timeout=30)
        fwd.close()


def test_refused_upstream_ends_the_client_connection() -> None:
    def refuse() -> socket.socket:
        raise ConnectionRefusedError("guest port closed")

    fwd = PortForward(refuse, "t")
    try:
        with socket.create_connection(("127.0.0.1", fwd.host_port), timeout=30) as c:
            assert c.recv(1) == b""
    finally:
        fwd.close()


def test_close_ends_every_connection_and_is_idempotent(upstream: socket.socket) -> None:
    fwd = PortForward(lambda: socket.create_connection(upstream.getsockname()), "t")
    with socket.create_connection(("127.0.0.1", fwd.host_port), timeout=30) as c:
        peer, _ = upstream.accept()
        with peer:
            c.sendall(b"hi")
            assert peer.recv(2) == b"hi"
            fwd.close()
            fwd.close()
            assert c.recv(1) == b""
            assert peer.recv(1) == b""
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", fwd.host_port), timeout=5)
