"""Exact reads from a socket, for the tests that talk the agent protocol by hand (tests/ is on
sys.path: see the root conftest.py)."""

from __future__ import annotations

import socket


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from ``sock``; EOFError if the host closes first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("the peer closed the stream")
        buf += chunk
    return bytes(buf)
