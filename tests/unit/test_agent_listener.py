"""The agent's listening-socket mode (Firecracker's AF_VSOCK channel), driven over AF_UNIX
(``--listen-unix``): the same accept-and-serve loop, since this host has no vsock transport."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path

from agentproc import agent_under_test

from pytest_smolvm.drivers.firecracker import AGENT_VSOCK_PORT
from pytest_smolvm.guest.channel import Channel
from pytest_smolvm.images.agentbin import agent_source


def test_agent_port_matches_the_driver() -> None:
    found = re.search(rb"#define VSOCK_PORT (\d+)", agent_source())
    assert found is not None and int(found.group(1)) == AGENT_VSOCK_PORT


def test_listener_serves_one_host_after_another(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    proc = subprocess.Popen([str(agent_under_test()), "--listen-unix", str(path)], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        for _ in range(2):  # the host disconnects and connects again
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            while True:  # the socket file exists from bind(), a moment before listen()
                try:
                    sock.connect(str(path))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    assert time.monotonic() < deadline, "the agent never listened"
                    time.sleep(0.01)
            chan = Channel(sock, lambda: True, max_body=1 << 20)
            reply, _ = chan.call({"op": "ping"}, timeout=10)
            assert reply["op"] == "pong"
            reply, body = chan.call({"op": "exec", "argv": ["echo", "again"]}, timeout=10)
            assert (reply["exit_code"], body) == (0, b"again\n")
            chan.close()
    finally:
        proc.kill()
        proc.wait()
