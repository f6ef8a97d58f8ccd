"""A minimal synchronous QMP client (QEMU Machine Protocol, JSON over a Unix socket).

https://www.qemu.org/docs/master/interop/qmp-spec.html
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from ..errors import BootError


class QMP:
    """Connects, negotiates capabilities, then runs commands one at a time."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(str(path))
                break
            except OSError as exc:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise BootError(f"cannot connect to QMP at {path}: {exc}") from exc
                time.sleep(0.002)
        self.sock.settimeout(timeout)
        self._buf = b""
        self.events: list[dict[str, Any]] = []
        self._read()  # greeting
        self.command("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise BootError("QMP connection closed by QEMU")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    def command(self, name: str, **arguments: Any) -> Any:
        """Run ``name``; return its ``return`` value or raise BootError with QEMU's error."""
        req: dict[str, Any] = {"execute": name}
        if arguments:
            req["arguments"] = arguments
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        return self._reply(name)

    def _reply(self, name: str) -> Any:
        """The answer to the command just sent (events that arrive first are kept aside)."""
        while True:
            msg = self._read()
            if "event" in msg:
                self.events.append(msg)
                continue
            if "error" in msg:
                raise BootError(f"QMP {name} failed: {msg['error'].get('desc', msg['error'])}")
            return msg.get("return")

    def send_fd(self, name: str, fd: int) -> None:
        """Hand QEMU an open file descriptor as ``name`` (``getfd`` with SCM_RIGHTS), for
        ``fd:NAME`` migration URIs: QEMU then never has to spawn a helper, so it can run
        under ``-sandbox spawn=deny``."""
        req = json.dumps({"execute": "getfd", "arguments": {"fdname": name}}).encode() + b"\n"
        socket.send_fds(self.sock, [req], [fd])
        self._reply("getfd")

    def add_fd(self, fd: int, fdset: int | None, opaque: str) -> tuple[int, int]:
        """Add ``fd`` to fd set ``fdset`` (None: a new one); QEMU opens ``/dev/fdset/ID``
        through it (``add-fd`` with SCM_RIGHTS). Returns the set's id and the descriptor's
        number in QEMU."""
        args: dict[str, Any] = {"opaque": opaque}
        if fdset is not None:
            args["fdset-id"] = fdset
        req = json.dumps({"execute": "add-fd", "arguments": args}).encode() + b"\n"
        socket.send_fds(self.sock, [req], [fd])
        reply = self._reply("add-fd")
        return int(reply["fdset-id"]), int(reply["fd"])

    def send_file(self, name: str, path: Path, flags: int) -> None:
        """Open ``path`` with ``flags`` and hand it to QEMU as ``name`` (see :meth:`send_fd`)."""
        fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
        try:
            self.send_fd(name, fd)
        finally:
            os.close(fd)

    def wait_migration(self, timeout: float) -> dict[str, Any]:
        """Poll ``query-migrate`` until it completes; return its final status."""
        deadline = time.monotonic() + timeout
        while True:
            status: dict[str, Any] = self.command("query-migrate")
            state = status.get("status")
            if state == "completed":
                return status
            if state in ("failed", "cancelled"):
                raise BootError(f"migration {state}: {status.get('error-desc', status)}")
            if time.monotonic() > deadline:
                raise BootError(f"migration did not complete within {timeout:.0f}s (state {state})")
            time.sleep(0.005)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
