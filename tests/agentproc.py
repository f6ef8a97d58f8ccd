"""The static guest agent run on the host, for tests: the very binary the guest boots
(``--serve-fd N``: it serves one end of a socketpair, stops at EOF, and ``setup`` does
nothing, so it never touches the host's clock or hostname). Commands it runs execute on the
host, so tests that use it run only harmless commands.

``SMOLVM_TEST_AGENT_ARCH=arm64`` runs the agent built for that architecture instead (on
another host through binfmt_misc and qemu-user): scripts/run-arm64 does."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Any

from sockpeer import recv_exact

from pytest_smolvm.guest import protocol
from pytest_smolvm.images.agentbin import agent_binary


def agent_under_test() -> Path:
    """The agent binary the host-mode tests run (``SMOLVM_TEST_AGENT_ARCH``: another architecture's)."""
    return agent_binary(os.environ.get("SMOLVM_TEST_AGENT_ARCH") or None)


def recv_frame(sock: socket.socket, max_body: int = 1 << 30) -> tuple[dict[str, Any], bytes]:
    return protocol.decode(lambda n: recv_exact(sock, n), max_body)


class AgentProcess:
    """One agent process serving ``self.sock`` (the host's end)."""

    def __init__(self, binary: Path | None = None, *, cwd: Path | None = None) -> None:
        self.sock, guest = socket.socketpair()
        fd = guest.fileno()
        self.proc = subprocess.Popen([str(binary or agent_under_test()), "--serve-fd", str(fd)], pass_fds=[fd],
                                     cwd=cwd, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        guest.close()
        self.sock.settimeout(30)
        self._next = 0

    def send(self, header: dict[str, Any], body: bytes = b"") -> int:
        self._next += 1
        self.sock.sendall(protocol.encode({**header, "id": self._next}, body))
        return self._next

    def call(self, header: dict[str, Any], body: bytes = b"") -> tuple[dict[str, Any], bytes]:
        rid = self.send(header, body)
        reply, data = recv_frame(self.sock)
        assert reply.get("id") == rid, reply
        return reply, data

    def close(self) -> int:
        """Hang up and wait for the agent: its exit status."""
        self.sock.close()
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
