"""A fake driver for *plugin-logic* tests only: the real guest agent, run in a thread of the
test process, serving over a socketpair. Commands it runs execute on the host, so tests that
use it run only harmless commands. It never stands in for a feature test: those boot real VMs.
"""

from __future__ import annotations

import _thread
import socket
import threading
from pathlib import Path

from pytest_smolvm.config import VMConfig
from pytest_smolvm.drivers import Accel
from pytest_smolvm.guest import agent, protocol
from pytest_smolvm.images import Image

LAUNCHES: list[VMConfig] = []


class FakeMachine:
    def __init__(self, workdir: Path) -> None:
        self.pid = threading.get_ident()
        self.accel = Accel("fake", "fake driver for plugin tests")
        self.console_path = workdir / "console.log"
        self.console_path.write_text("fake console: agent ready\n")
        self.disk_path = workdir / "disk.fake"
        self._host, guest = socket.socketpair()
        self._guest = guest
        self._alive = True
        _thread.start_new_thread(self._serve, ())

    def _serve(self) -> None:
        chan = agent.Channel(self._guest.fileno(), wait_on_eof=False)
        try:
            while True:
                req, body = protocol.decode(chan.read_exact, agent.MAX_REQUEST_BODY)
                if req["op"] == "setup":  # would set the *host's* clock and hostname
                    chan.send({"op": "ok", "id": req["id"]})
                else:
                    agent.handle(chan, req, body)
        except (OSError, EOFError):
            self._alive = False

    def connect(self, timeout: float) -> socket.socket:
        return self._host

    def alive(self) -> bool:
        return self._alive

    def exit_status(self) -> int | None:
        return None if self._alive else 0

    def kill(self) -> None:
        self._alive = False
        for s in (self._host, self._guest):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
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
