"""The backend seam: what the VM handle needs from a VMM driver.

A driver turns (config, image, working directory) into a running :class:`Machine`. The VM
handle owns everything above that line (agent protocol, transcripts, cleanup order); a
driver owns disks in its format, the VMM process, and how the control stream is reached.
Every driver runs through ``tests/integration/test_conformance.py``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..config import VMConfig
from ..images import Image


@dataclasses.dataclass(frozen=True)
class Accel:
    """The accelerator a driver will use, and why it was chosen (shown in the pytest header)."""

    name: str
    reason: str


#: The MAC of every guest NIC in a VMM's configuration (so snapshots stay shared); the
#: guest sets the MAC leased for it at setup.
TEMPLATE_MAC = "02:53:56:00:00:01"


@dataclasses.dataclass(frozen=True)
class Nic:
    """A guest NIC's host end: an open TAP descriptor the VMM inherits, and the MAC in the
    VMM's configuration (fixed, so snapshots are shared; the guest sets its leased MAC)."""

    tap_fd: int
    tap: str
    mac: str


def guest_flags(config: VMConfig, accel: Accel) -> list[str]:
    """Kernel command-line flags read by the guest's init (pure; used by every driver)."""
    flags = []
    aslr = config.aslr if config.aslr is not None else accel.name != "tcg"
    if not aslr:
        flags.append("smolvm.aslr=0")
    if config.network != "none":
        flags.append("smolvm.net=1")
    return flags


class VMMProcess:
    """Process handling every VMM's Machine shares: the process, its console and stderr logs.
    A driver's Machine adds how the control stream is reached (``connect``)."""

    def __init__(self, proc: subprocess.Popen[bytes], accel: Accel, workdir: Path, disk: Path,
                 log_name: str) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.accel = accel
        self.workdir = workdir
        self.console_path = workdir / "console.log"
        self.stderr_path = workdir / log_name
        self.disk_path = disk

    def alive(self) -> bool:
        return self.proc.poll() is None

    def exit_status(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> None:
        """SIGKILL the VMM's process group and reap it. Idempotent."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - D state; nothing more to do
            pass

    def diagnostics(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-2000:].strip()
        except OSError:
            return ""

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = self.console_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@runtime_checkable
class Machine(Protocol):
    """A running VMM process with a guest inside."""

    pid: int
    accel: Accel
    console_path: Path
    disk_path: Path

    def connect(self, timeout: float) -> socket.socket:
        """Return a connected stream to the guest agent's control port."""

    def alive(self) -> bool:
        """True while the VMM process runs."""

    def exit_status(self) -> int | None:
        """The VMM's exit status once it has exited, else None."""

    def kill(self) -> None:
        """Stop the VMM and reap it. Idempotent; never raises for an already-dead VMM."""

    def diagnostics(self) -> str:
        """The VMM's own stderr (tail), for error messages."""


@runtime_checkable
class Driver(Protocol):
    """Creates machines. ``name`` is what ``--smolvm-backend`` selects."""

    name: str

    def select_accel(self, requested: str, image: Image) -> Accel:
        """Resolve ``auto``/``kvm``/``hvf``/``tcg`` to what works here (raises ConfigError)."""

    def launch(self, config: VMConfig, image: Image, workdir: Path, nic: Nic | None = None) -> Machine:
        """Prepare the VM's disk in ``workdir`` and start the VMM (with ``nic`` when the config
        has a network); cleans up after itself on failure."""


@runtime_checkable
class SnapshotDriver(Protocol):
    """A driver that can snapshot a booted guest and restore clones of it."""

    def snapshot_key(self, config: VMConfig, image: Image) -> str:
        """Identity of the snapshot a VM with ``config`` would restore from."""

    def launch_template(self, config: VMConfig, image: Image, workdir: Path, target: Path,
                        nic: Nic | None = None) -> Machine:
        """Cold-boot a VM whose RAM and disk can be saved into ``target`` (sockets in ``workdir``)."""

    def save_snapshot(self, machine: Machine, target: Path) -> None:
        """Save the template's state into ``target`` and stop it for good."""

    def launch_clone(self, config: VMConfig, image: Image, snapshot: Path, workdir: Path,
                     nic: Nic | None = None) -> Machine:
        """Start a VM restored from ``snapshot``, with its own disk overlay in ``workdir``."""
