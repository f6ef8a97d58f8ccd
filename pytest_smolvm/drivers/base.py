"""The backend seam: what the VM handle needs from a VMM driver.

A driver turns (config, image, working directory) into a running :class:`Machine`. The VM
handle owns everything above that line (agent protocol, transcripts, cleanup order); a
driver owns disks in its format, the VMM process, and how the control stream is reached.
Every driver runs through ``tests/integration/test_conformance.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import psutil

from ..config import VMConfig
from ..images import Image
from ..reporting import tail
from .consolelog import COLLECTOR, CappedLog, read_bounded
from .watchdog import WATCHDOG

#: The user VMMs drop to when the engine runs as root: this one if it exists (create it with
#: ``useradd --system --no-create-home --shell /usr/sbin/nologin smolvm``), else ``nobody``.
VMM_USER = "smolvm"
#: How long a reader waits for a dead VMM's last output to reach its log.
DRAIN_TIMEOUT = 2.0


@dataclasses.dataclass(frozen=True)
class Accel:
    """The accelerator a driver will use, and why it was chosen (shown in the pytest header)."""

    name: str
    reason: str


#: The MAC of every guest NIC in a VMM's configuration (so snapshots stay shared); the
#: guest sets the MAC leased for it at setup.
TEMPLATE_MAC = "02:53:56:00:00:01"

#: What a snapshot template is, in the snapshot key: 3 = the template writes the identity
#: files and primes the guest page cache before it is saved (boot.PRIME_COMMANDS).
TEMPLATE_FORMAT = 3


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


@functools.cache
def vmm_user() -> tuple[str, int, int] | None:
    """(name, uid, gid) of the user VMMs drop to, or None when they do not drop (the engine
    is not root, or neither ``smolvm`` nor ``nobody`` exists)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    import pwd

    for name in (VMM_USER, "nobody"):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        if pw.pw_uid != 0:
            return pw.pw_name, pw.pw_uid, pw.pw_gid
    return None


def vmm_uid() -> int | None:
    """The uid VMMs drop to (None when they do not drop)."""
    user = vmm_user()
    return user[1] if user else None


@dataclasses.dataclass
class Spawned:
    """A VMM process just started by :func:`spawn_vmm`, with its output logs."""

    proc: subprocess.Popen[bytes]
    logs: tuple[CappedLog, ...]
    watched: bool


def spawn_vmm(argv: Sequence[str], workdir: Path, *, driver: str, uid: int, stderr_name: str | None,
              pass_fds: Sequence[int] = (), watch: bool = True) -> Spawned:
    """Start a VMM in its own session with the console (stdout) and ``stderr_name`` (None:
    merged into the console) piped into capped logs. With ``watch``, the VM directory is
    registered with the watchdog first, so the VMM cannot outlive this process.
    Writes ``vmm.json`` (pid, create_time, uid, driver) for the reaper: the VMM's only pid
    record (the reaper still reads older versions' ``qemu.pid`` / ``firecracker.pid``)."""
    logs = [CappedLog(workdir / "console.log")]
    pipes = [os.pipe()]
    if stderr_name is not None:
        logs.append(CappedLog(workdir / stderr_name, what="VMM stderr", head=64 << 10, tail=192 << 10))
        pipes.append(os.pipe())
    if watch:
        WATCHDOG.register(workdir, vmm_uid())
    try:
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=pipes[0][1],
            stderr=pipes[1][1] if stderr_name is not None else subprocess.STDOUT,
            start_new_session=True, close_fds=True, cwd=workdir, pass_fds=tuple(pass_fds))
    except BaseException:
        for r, _ in pipes:
            os.close(r)
        if watch:
            WATCHDOG.unregister(workdir)
        raise
    finally:
        for _, w in pipes:
            os.close(w)
    for (r, _), log in zip(pipes, logs, strict=True):
        COLLECTOR.add(r, log)
    write_vmm_json(workdir, proc.pid, uid, driver)
    return Spawned(proc, tuple(logs), watch)


def write_vmm_json(workdir: Path, pid: int, uid: int, driver: str) -> None:
    """``<workdir>/vmm.json``, atomically: what the reaper needs to recognise this VMM."""
    try:
        created = psutil.Process(pid).create_time()
    except psutil.Error:
        created = 0.0
    tmp = workdir / f".vmm.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"pid": pid, "create_time": created, "uid": uid, "driver": driver}))
    os.replace(tmp, workdir / "vmm.json")


class VMMProcess:
    """The one owner of a VMM process: liveness, exit status, kill, and its console and stderr
    logs. A driver's Machine adds only how the control stream is reached (``connect``)."""

    def __init__(self, proc: subprocess.Popen[bytes], accel: Accel, workdir: Path, disk: Path,
                 log_name: str, spawned: Spawned | None = None) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.accel = accel
        self.workdir = workdir
        self.console_path = workdir / "console.log"
        self.stderr_path = workdir / log_name
        self.disk_path = disk
        self._logs = spawned.logs if spawned else ()
        self._watched = spawned.watched if spawned else False

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
            return
        self.sync_logs()
        if self._watched:
            self._watched = False
            WATCHDOG.unregister(self.workdir)

    def sync_logs(self) -> None:
        """Once the VMM has exited, wait (bounded) until its last output is in its logs."""
        if self.proc.poll() is None:
            return
        for log in self._logs:
            log.closed.wait(DRAIN_TIMEOUT)

    def diagnostics(self) -> str:
        self.sync_logs()
        return read_bounded(self.stderr_path, 8192)[-2000:].strip()

    def console_tail(self, lines: int = 40) -> str:
        self.sync_logs()
        return tail(read_bounded(self.console_path, 64 << 10), lines)


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


@runtime_checkable
class CheckpointDriver(Protocol):
    """A driver that can save a running VM's state and start clones of it (vm.checkpoint())."""

    def checkpoint_shape(self, config: VMConfig, image: Image, ram: str) -> dict[str, object]:
        """Everything the saved state depends on, by field: a clone must match every value."""

    def ram_layout(self, machine: Machine) -> str:
        """How ``machine``'s RAM is named in its migration stream (a shape field: clones of a
        checkpoint name theirs the same way)."""

    def save_checkpoint(self, machine: Machine, config: VMConfig, image: Image, target: Path, *, ram: str,
                        timeout: float, nic: Nic | None = None) -> tuple[int, float]:
        """Save ``machine``'s RAM, devices and disk layer into ``target`` and let it run on;
        returns the disk's virtual size in bytes and the seconds the guest was paused."""

    def launch_checkpoint(self, config: VMConfig, image: Image, checkpoint: Path, workdir: Path, *, ram: str,
                          disk_bytes: int, nic: Nic | None = None) -> Machine:
        """Start a VM restored from the checkpoint in ``checkpoint``, with its own overlay."""
