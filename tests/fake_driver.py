"""A fake driver for *plugin-logic* tests only: the real (static) guest agent, run as a
process on the host, serving one end of a socketpair (tests/agentproc.py). Commands it runs
execute on the host, so tests that use it run only harmless commands. It never stands in for
a feature test: those boot real VMs.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from agentproc import AgentProcess

from pytest_smolvm.config import VMConfig
from pytest_smolvm.drivers import Accel
from pytest_smolvm.images import Image

LAUNCHES: list[VMConfig] = []


class FakeMachine:
    def __init__(self, workdir: Path) -> None:
        self.accel = Accel("fake", "fake driver for plugin tests")
        self.console_path = workdir / "console.log"
        self.console_path.write_text("fake console: agent ready\n")
        self.disk_path = workdir / "disk.fake"
        self._agent = AgentProcess(cwd=workdir)
        self._agent.sock.settimeout(None)
        self.pid = self._agent.proc.pid

    def connect(self, timeout: float) -> socket.socket:
        return self._agent.sock

    def alive(self) -> bool:
        return self._agent.proc.poll() is None

    def exit_status(self) -> int | None:
        return self._agent.proc.poll()

    def kill(self) -> None:
        try:
            self._agent.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._agent.proc.kill()
        try:
            self._agent.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def diagnostics(self) -> str:
        return ""


class FakeDriver:
    name = "fake"

    def select_accel(self, requested: str, image: Image) -> Accel:
        return Accel("fake", "fake driver for plugin tests")

    def launch(self, config: VMConfig, image: Image, workdir: Path) -> FakeMachine:
        LAUNCHES.append(config)
        return FakeMachine(workdir)
