"""What the scripted agent peers of the unit tests share (this directory is on sys.path)."""

from __future__ import annotations

import socket


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from ``sock``; EOFError if the host closes first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("host closed")
        buf += chunk
    return bytes(buf)
