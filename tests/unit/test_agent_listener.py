"""The agent's listening-socket mode (Firecracker's AF_VSOCK channel), driven over AF_UNIX:
the same accept-and-serve loop, since this host has no vsock transport to test with."""

from __future__ import annotations

import _socket
import socket
import threading
from pathlib import Path

from pytest_smolvm.drivers.firecracker import AGENT_VSOCK_PORT
from pytest_smolvm.guest import agent
from pytest_smolvm.guest.channel import Channel


def test_agent_port_matches_the_driver() -> None:
    assert agent.VSOCK_PORT == AGENT_VSOCK_PORT


def test_listener_serves_one_host_after_another(tmp_path: Path) -> None:
    path = str(tmp_path / "agent.sock")
    listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    threading.Thread(target=agent.serve_listener, args=(listener,), daemon=True).start()
    for _ in range(2):  # the host disconnects and connects again
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        chan = Channel(sock, lambda: True, max_body=1 << 20)
        reply, _ = chan.call({"op": "ping"}, timeout=10)
        assert reply["op"] == "pong"
        chan.close()
