"""The VM handle: boot, run commands, move files, tear down. Usable without pytest."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import itertools
import json
import os
import secrets
import shlex
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from . import images, paths, runs, transfer
from .boot import BOOT_LOG_LIMIT, Boot
from .checkpoints import Checkpoint, CheckpointError, check_network, digest_files, register, shape_mismatch, write_meta
from .checkpoints import hold as hold_checkpoint
from .checkpoints import release as release_checkpoint
from .config import VMConfig
from .drivers import Accel, Driver, default_driver
from .drivers.base import TEMPLATE_MAC, CheckpointDriver, Nic
from .drivers.consolelog import read_bounded
from .errors import (
    BootError,
    CommandFailed,
    CommandTimeout,
    ConfigError,
    GuestDied,
    GuestError,
    GuestFileError,
    GuestTimeout,
    ImageError,
    NetworkError,
    ProtocolError,
    SmolVMError,
)
from .guest import replies
from .guest.client import GuestClient, WireEnv
from .guest.ssh import SSHKeys
from .host import host_name, owner_stamp
from .network import hub
from .network.forward import PortForward
from .network.hub import VMNetwork
from .network.policy import Caps, Denied
from .paths import cache_dir, check_name, make_private_dirs
from .process import CallbackFailed, ExecCall, OutputCallback, Process, run_streamed
from .reporting import clip, redact
from .results import RunResult as RunResult  # re-exported: it was defined here
from .session import GuestSession
from .snapshots import SnapshotError, SnapshotStore, SnapshotWarning
from .timeouts import scaled

#: Extra seconds the host waits past a command's timeout for the agent's (killed) reply.
REPLY_GRACE = 10.0
DEFAULT_GET_LIMIT = 256 * 1024 * 1024
MAX_PUT = 1 << 30  # the agent's request-body limit
TRANSCRIPT_HEAD = 1024
GET_TIMEOUT = 120.0
#: Room for a tree transfer's tar messages (its stderr) in the reply.
TRANSFER_MESSAGES = 64 * 1024

T = TypeVar("T")
#: How a networked VM gets its NIC: ``network.hub.attach(vm, run_id, policy, allow, uplink, caps)``.
AttachNetwork = Callable[[str, str, str, tuple[str, ...], str | None, Caps], VMNetwork]
class VMState(enum.Enum):
    """Where a SmolVM is in its life. Shown by value in messages and ``repr``."""

    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    FAILED = "failed"  # start() failed; torn down
    DEAD = "dead"  # the guest or VMM stopped during a call
    CLOSING = "closing"
    CLOSED = "closed"
    DETACHED = "detached"  # left running for inspection (keep-failed)

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class TranscriptEntry:
    """One ``run()`` call as shown in a failing test's report."""

    command: str
    outcome: str
    duration: float
    stdout_head: str
    stderr_head: str

    def render(self) -> str:
        lines = [f"$ {self.command}    [{self.outcome}, {self.duration * 1000:.0f} ms]"]
        for label, head in (("stdout", self.stdout_head), ("stderr", self.stderr_head)):
            if head:
                lines.append(f"  {label}: " + head.replace("\n", "\n          ").rstrip())
        return "\n".join(lines)


#: How the guest agent reports that ``/bin/sh`` could not be executed (exit status 127).
NO_SHELL = b"smolvm: cannot execute /bin/sh:"


def command_argv(command: object) -> tuple[list[str], str]:
    """``run()``'s command as an argv and as shown: a string goes to ``/bin/sh -c``."""
    if isinstance(command, str):
        return ["/bin/sh", "-c", command], command
    if isinstance(command, Sequence) and command and all(isinstance(a, str) for a in command):
        return list(command), shlex.join(command)
    raise ConfigError(f"invalid command {command!r}: expected a shell string or a non-empty list of str")


class NetworkState:
    """``vm.network``: the policy in force, the VM's addresses, and the egress attempts the
    policy dropped (``denied``: ``(destination, port, protocol)`` tuples, read live)."""

    def __init__(self, policy: str, allow: tuple[str, ...] = (), uplink: str | None = None) -> None:
        self.policy = policy
        self.allow = allow
        self.uplink = uplink
        self._net: VMNetwork | None = None

    def __repr__(self) -> str:
        return f"<NetworkState {self.policy}{' allow=' + ','.join(self.allow) if self.allow else ''}>"

    @property
    def guest_ip(self) -> str | None:
        return str(self._net.addr.guest_ip) if self._net else None

    @property
    def host_ip(self) -> str | None:
        """The guest's gateway: the host side of its TAP, inside the run's namespace."""
        return str(self._net.addr.host_ip) if self._net else None

    @property
    def tap(self) -> str | None:
        return self._net.addr.tap if self._net else None

    @property
    def netns(self) -> str | None:
        return self._net.netns if self._net else None

    @property
    def denied(self) -> list[tuple[str, int, str]]:
        return [d.as_tuple() for d in self.denied_details()]

    def denied_details(self) -> list[Denied]:
        """Like ``denied``, with the number of packets dropped for each."""
        return self._net.denied() if self._net else []

    @property
    def unitemised(self) -> int:
        """Packets denied while the run's denial ledger was full (dropped, not in ``denied``)."""
        return self._net.counters().get("unitemised", 0) if self._net else 0

    @property
    def capped(self) -> dict[str, int]:
        """Packets the egress caps dropped: ``bandwidth`` and new ``connections``."""
        found = self._net.counters() if self._net else {}
        return {"bandwidth": found.get("bandwidth", 0), "connections": found.get("connections", 0)}


class SmolVM:
    """One microVM. Use as a context manager, or call :meth:`start` and :meth:`close`.

    >>> with SmolVM(VMConfig(memory_mib=256)) as vm:   # doctest: +SKIP
    ...     vm.run("echo hi").stdout
    'hi\\n'
    """

    #: Numbers VM names; the warm-pool thread and the test's thread both create VMs. The
    #: lock makes that safe without leaning on the GIL (which makes a bare next() atomic
    #: today, but not on a free-threaded build).
    _counter = itertools.count(1)
    _counter_lock = threading.Lock()

    def __init__(self, config: VMConfig | None = None, *, driver: Driver | None = None,
                 name: str | None = None, resolve_image: Callable[[str], images.Image] | None = None,
                 snapshot_store: SnapshotStore | None = None, runtime_dir: Path | None = None,
                 attach_network: AttachNetwork | None = None, checkpoint: Checkpoint | None = None) -> None:
        """``checkpoint``: start a clone of that prepared state (:meth:`checkpoint`) instead of
        booting; ``config`` (default: the prepared VM's) must have the checkpoint's shape
        (backend, accelerator, image, vcpus, memory, CPU, volumes: a ConfigError names the
        field that differs), and a network policy with a NIC exactly when the checkpoint has one.

        ``resolve_image``, ``snapshot_store``, ``runtime_dir`` and ``attach_network`` replace,
        for this VM, the image store (``images.resolve``), the snapshot store
        (``snapshots.default_store()``), the runtime directory (``paths.runtime_dir()``, which
        ``reap`` searches; one given must exist and be trusted) and the network hub
        (``network.hub.attach``); None means those."""
        self.config = self._clone_config(config, checkpoint)
        self._checkpoint = checkpoint
        #: The checkpoint whose disk layer this VM's disk sits on (its files must stay).
        self._disk_parent: Checkpoint | None = None
        self._no_checkpoint: str | None = None  # why checkpoint() is refused from now on
        self._driver_used: Driver | None = None
        self._checkpoints = itertools.count(1)
        #: How the guest's RAM appears in a migration stream (checkpoints.SHAPE_FIELDS "ram").
        self._ram_layout = "builtin"
        self._driver = driver
        self._resolve_image = resolve_image
        self._snapshot_store = snapshot_store
        self._runtime_dir = runtime_dir
        self._attach_network = attach_network
        self.name = check_name(name or f"vm{self._next_number()}-{secrets.token_hex(2)}", "VM name")
        self.run_id = check_name(runs.current_run_id(), "run id (SMOLVM_RUN_ID)")
        self.workdir = self._runtime_root() / self.run_id / self.name
        self.transcript: list[TranscriptEntry] = []
        self.network = NetworkState(self.config.network, self.config.allow, self.config.uplink)
        self.image: images.Image | None = None
        self.boot_time: float | None = None
        #: "snapshot" (a clone of a golden snapshot) or "cold" (booted from scratch).
        self.boot_mode: str | None = None
        self.disk_path: Path | None = None
        self._session: GuestSession | None = None  # the running guest, once booted
        self._state = VMState.NEW
        self._lock = threading.Lock()
        self._lifetime_timer: threading.Timer | None = None
        self._net: VMNetwork | None = None
        self._forwards: list[PortForward] = []
        self._ssh_keys: SSHKeys | None = None
        self._ssh_clients: list[Any] = []
        #: env values this VM was given (config and run()): masked in messages and transcripts.
        self._secrets: set[str] = set(self.config.env.values())
        #: Live output of every command (the pytest plugin's, under ``-s``): called with a
        #: label (the VM's name; ``name:pid`` for a spawn) once per command, it returns an
        #: ``on_output`` callback for that command, used beside the caller's. None: off.
        self.live_output: Callable[[str], OutputCallback] | None = None

    @staticmethod
    def _clone_config(config: VMConfig | None, checkpoint: Checkpoint | None) -> VMConfig:
        """The VM's config: ``config``, else the checkpoint's, else the default; checked
        against what a clone of ``checkpoint`` needs."""
        if checkpoint is None:
            return config or VMConfig()
        if not isinstance(checkpoint, Checkpoint):
            raise ConfigError(f"invalid checkpoint={checkpoint!r}: expected what vm.checkpoint() returned")
        config = config or checkpoint.config
        if config.disk_mode != "isolated":
            raise ConfigError(f"invalid disk_mode={config.disk_mode!r} for a clone of checkpoint "
                              f"{checkpoint.name}: clones need their own disk (disk_mode='isolated')")
        check_network(checkpoint, config)
        return config

    @classmethod
    def _next_number(cls) -> int:
        with cls._counter_lock:
            return next(cls._counter)

    def _runtime_root(self) -> Path:
        return self._runtime_dir if self._runtime_dir is not None else paths.runtime_dir()

    # ------------------------------------------------------------------ lifecycle

    def __repr__(self) -> str:
        return f"<SmolVM {self.name} {self._state} {self.config.describe()}>"

    def __enter__(self) -> SmolVM:
        if self._state == VMState.NEW:
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def accel(self) -> Accel | None:
        """The accelerator in use (and why it was chosen)."""
        return self._session.machine.accel if self._session and self._session.machine else None

    @property
    def pid(self) -> int | None:
        """The VMM's process id."""
        return self._session.machine.pid if self._session and self._session.machine else None

    @property
    def alive(self) -> bool:
        return self._state == VMState.RUNNING and self._session is not None and self._session.alive

    def start(self) -> SmolVM:
        """Boot the VM and wait for its agent. On any failure nothing is left behind.

        Isolated-disk VMs start as clones of a golden snapshot when the driver supports it
        (``config.snapshot``); if the snapshot cannot be built or restored, the VM is
        cold-booted instead and a :class:`~pytest_smolvm.snapshots.SnapshotWarning` says why.
        """
        if self._state != VMState.NEW:
            raise SmolVMError(f"{self.name} was already started (state {self._state})")
        self._state = VMState.STARTING
        t0 = time.monotonic()
        try:
            self.image = (self._resolve_image or images.resolve)(self.config.image)
            driver = self._driver or default_driver(self.config)
            self._driver_used = driver
            if self._checkpoint is not None:
                self._check_checkpoint(driver, self._checkpoint)
                hold_checkpoint(self._checkpoint)
                self._disk_parent = self._checkpoint
            make_private_dirs(self.workdir, self._runtime_root())
            (self.workdir / "owner.json").write_text(json.dumps(
                {**owner_stamp(os.getpid()), "run_id": self.run_id, "vm": self.name, "started": time.time(),
                 "host": host_name()}))
            runs.track(self)
            if self.config.network != "none":
                self._attach()
            self._session = self._boot(driver, t0)
            self.disk_path = self._session.machine.disk_path if self._session.machine else None
        except BaseException:
            self._state = VMState.FAILED
            self._teardown()
            raise
        self._state = VMState.RUNNING
        self.boot_time = time.monotonic() - t0
        self.arm_lifetime()
        return self

    def arm_lifetime(self) -> None:
        """(Re)start the ``config.lifetime`` clock: the pool calls this when it hands a
        pre-started VM to a test, so time spent waiting as a spare does not count."""
        if self._lifetime_timer is not None:
            self._lifetime_timer.cancel()
        if self.config.lifetime is not None and self._state == VMState.RUNNING:
            self._lifetime_timer = threading.Timer(self.config.lifetime, self._expire)
            self._lifetime_timer.daemon = True
            self._lifetime_timer.start()

    def _expire(self) -> None:
        """Destroy the VMM: the VM outlived ``config.lifetime``. Calls in flight and later
        ones raise GuestDied naming the limit."""
        if self._session is not None:
            self._session.expire(f"the VM exceeded its lifetime of {self.config.lifetime:g}s and was destroyed")

    def _attach(self) -> None:
        """Give the VM its NIC, with the config's network policy in force."""
        attach = self._attach_network or hub.attach
        self._net = attach(self.name, self.run_id, self.config.network, self.config.allow, self.config.uplink,
                           Caps(self.config.egress_kib_per_s, self.config.egress_conns_per_s))
        self.network._net = self._net

    def _boot(self, driver: Driver, t0: float) -> GuestSession:
        """Clone the golden snapshot if this VM can, else (or if that fails) cold-boot."""
        assert self.image is not None
        boot = Boot(self.name, self.config, self.image, self.workdir, driver, self._net,
                    snapshots=self._snapshot_store, redact=self.redact)
        if self._checkpoint is not None:
            session = boot.restore(self._checkpoint)
            self._ram_layout = str(self._checkpoint.shape["ram"])
        elif boot.wants_snapshot:
            try:
                session = boot.clone()
            except (SnapshotError, BootError, GuestDied, ProtocolError) as exc:
                # stacklevel 3: the line that called start()
                warnings.warn(f"{self.name}: starting from a snapshot failed ({exc}); cold-booting "
                              f"instead", SnapshotWarning, stacklevel=3)
                session = boot.cold(t0)
        else:
            session = boot.cold(t0)
        self.boot_mode = boot.mode
        if boot.mode == "snapshot":
            self._ram_layout = "mem"
        return session

    def _check_checkpoint(self, driver: Driver, cp: Checkpoint) -> None:
        """ConfigError unless this VM can start from ``cp`` (before anything is created)."""
        assert self.image is not None
        if not isinstance(driver, CheckpointDriver):
            raise ConfigError(f"{self.name}: backend {driver.name!r} cannot start from checkpoint {cp.name}")
        mismatch = shape_mismatch(cp.shape, driver.checkpoint_shape(self.config, self.image, str(cp.shape["ram"])))
        if mismatch:
            raise ConfigError(f"{self.name}: cannot start from checkpoint {cp.name}: {mismatch}; a clone "
                              f"needs the same VM shape (start it with the checkpoint's config, cp.config)")
        cp.verify()

    def _checkpoint_driver(self, timeout: object) -> CheckpointDriver:
        """The driver, once checkpoint() is known to be possible (else the error saying why)."""
        if self._state != VMState.RUNNING or self._session is None or self._session.machine is None:
            raise SmolVMError(f"{self.name} is not running (state {self._state}); cannot take a checkpoint")
        if self._no_checkpoint:
            raise SmolVMError(f"{self.name}: cannot take another checkpoint: {self._no_checkpoint}")
        if self.config.disk_mode != "isolated":
            raise ConfigError(f"{self.name}: cannot take a checkpoint of a VM with disk_mode="
                              f"{self.config.disk_mode!r}: its disk is the image's shared one, which later "
                              f"VMs keep changing; use disk_mode='isolated'")
        driver = self._driver_used
        assert driver is not None  # set when it started
        if not isinstance(driver, CheckpointDriver):
            raise ConfigError(f"{self.name}: backend {driver.name!r} cannot take checkpoints (QEMU can)")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ConfigError(f"invalid timeout={timeout!r} for checkpoint(): expected seconds > 0")
        return driver

    def checkpoint(self, *, timeout: float = 300.0) -> Checkpoint:
        """Save this VM's state (RAM, devices, disk) and let it run on; returns a
        :class:`~pytest_smolvm.checkpoints.Checkpoint` to start clones from.

        The VM is paused while its RAM is written (no command runs meanwhile) and then
        resumes where it was: processes keep running, files stay. The checkpoint lives in the
        run's runtime directory until :meth:`Checkpoint.remove`, session end (pytest) or
        interpreter exit, and ``reap`` removes a dead run's. Needs ``disk_mode='isolated'``
        and a backend that can do it (QEMU; Firecracker cannot yet).
        """
        driver = self._checkpoint_driver(timeout)
        assert self.image is not None and self._session is not None and self._session.machine is not None
        machine = self._session.machine
        root = self._runtime_root()
        name = check_name(f"{self.name[:52]}.cp{next(self._checkpoints)}", "checkpoint name")
        path = root / self.run_id / name
        t0 = time.monotonic()
        old_disk = machine.disk_path
        make_private_dirs(path, root)
        try:
            (path / "owner.json").write_text(json.dumps(
                {**owner_stamp(os.getpid()), "run_id": self.run_id, "vm": name, "started": time.time(),
                 "checkpoint_of": self.name}))
            with self._quiesced():  # nothing in flight while the state is saved
                disk_bytes, paused = driver.save_checkpoint(
                    machine, self.config, self.image, path, ram=self._ram_layout, timeout=float(timeout),
                    **({"nic": Nic(self._net.tap_fd, self._net.addr.tap, TEMPLATE_MAC)} if self._net else {}))
            self.disk_path = machine.disk_path
            (path / "console.log").write_text(read_bounded(machine.console_path, BOOT_LOG_LIMIT))
            cp = Checkpoint(name=name, path=path, run_id=self.run_id, config=self.config,
                            shape=driver.checkpoint_shape(self.config, self.image, self._ram_layout),
                            files=digest_files(path), disk_bytes=disk_bytes,
                            guest_address=str(self._net.guest_setup()["address"]) if self._net else None,
                            paused_s=paused, taken_s=time.monotonic() - t0, parent=self._disk_parent)
            write_meta(cp)
        except BaseException as exc:
            shutil.rmtree(path, ignore_errors=True)
            if machine.disk_path != old_disk:  # it runs on, on a layer whose name is gone
                self._no_checkpoint = f"an earlier checkpoint() failed after its disk moved ({exc})"
            raise
        # This VM's disk now sits on cp's layer, which sits on the old parent's: cp takes over
        # the VM's hold on the parent (register), and the VM holds cp.
        register(cp)
        hold_checkpoint(cp)
        if self._disk_parent is not None:
            release_checkpoint(self._disk_parent)
        self._disk_parent = cp
        return cp

    def _quiesced(self) -> contextlib.AbstractContextManager[None]:
        assert self._session is not None
        return self._session.quiesced(lambda why: CheckpointError(
            f"checkpoint() of {self.name} needs its agent idle, but {why}: a spawn()ed process still "
            f"running or a run() in another thread. Wait for or kill them first; start services "
            f"meant to outlive the checkpoint with run('cmd >/dev/null 2>&1 &') instead"))

    def close(self) -> None:
        """Stop the VM and remove everything it created. Idempotent."""
        with self._lock:
            if self._state in (VMState.CLOSED, VMState.NEW):
                self._state = VMState.CLOSED
                return
            # "closing" until the teardown has run to its end: a Ctrl-C or SIGTERM that lands
            # inside it leaves the VM closable, so a later close() (a fixture finaliser, the
            # atexit hook) finishes the job instead of finding it "closed" and doing nothing.
            self._state = VMState.CLOSING
            try:
                self._teardown()
            except Exception:
                self._state = VMState.CLOSED
                raise
            self._state = VMState.CLOSED

    def detach(self) -> None:
        """Leave the VM running for inspection and forget it (``--smolvm-keep-failed``).

        Reach it with ``python -m pytest_smolvm shell WORKDIR``; remove it with
        ``python -m pytest_smolvm reap --kept``.
        """
        with self._lock:
            if self._state != VMState.RUNNING:
                raise SmolVMError(f"{self.name} is not running (state {self._state}); cannot detach")
            if self._session is not None:
                self._session.disconnect("detached")
            (self.workdir / "kept").write_text(json.dumps({"pid": self.pid, "at": time.time()}))
            self._state = VMState.DETACHED
            runs.untrack(self)

    def _teardown(self) -> None:
        if self._lifetime_timer is not None:
            self._lifetime_timer.cancel()
        # Order matters: channels first (no call may wait on a dying VM), then the VMM, then
        # its network (the TAP dies with its last descriptor), then files. Each step runs
        # even if an earlier one failed.
        for fwd in self._forwards:
            fwd.close()
        for client in self._ssh_clients:
            try:
                client.close()
            except Exception:
                pass
        if self._session is not None:
            self._session.close()
        net_error = None
        if self._net is not None:
            try:
                self._net.close()
            except NetworkError as exc:
                net_error = exc
        if self.config.retain_disk_on_delete and self.disk_path and self.disk_path.is_relative_to(self.workdir) \
                and self.disk_path.exists():
            keep = cache_dir() / "retained" / f"{self.run_id}-{self.name}{self.disk_path.suffix}"
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.disk_path), keep)
            self.disk_path = keep
        shutil.rmtree(self.workdir, ignore_errors=True)
        try:
            self.workdir.parent.rmdir()  # the run directory, once its last VM is gone
        except OSError:
            pass
        if self._disk_parent is not None:
            parent, self._disk_parent = self._disk_parent, None
            release_checkpoint(parent)
        runs.untrack(self)
        if net_error is not None:
            raise net_error

    # ------------------------------------------------------------------ console

    @property
    def console_log(self) -> str:
        """What the guest printed on its serial console so far: all of it up to 2 MiB, else
        the first and last MiB around a marker line; lines cut at 4 KiB."""
        return self._session.console() if self._session is not None else ""

    # ------------------------------------------------------------------ calls

    def _call(self, what: str, op: Callable[[GuestClient], T], *, wait: float | None = None,
              on_timeout: Callable[[], Exception] | None = None) -> T:
        """``op`` on this VM's guest (:meth:`GuestSession.call`, which maps its errors)."""
        if self._session is None or self._state not in (VMState.STARTING, VMState.RUNNING):
            raise SmolVMError(f"{self.name} is not running (state {self._state}); cannot {what}")
        return self._session.call(what, op, wait=wait, on_timeout=on_timeout)

    def run(
        self,
        command: str | Sequence[str],
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        input: bytes | str | None = None,
        check: bool = False,
        max_output: int | None = None,
        on_output: OutputCallback | None = None,
    ) -> RunResult:
        """Run ``command`` in the guest: a string goes to ``/bin/sh -c``, a list is an argv.

        Returns when the command's own process exits. ``timeout`` (default: the config's)
        kills its whole process group and raises :class:`CommandTimeout`. ``env`` is added
        to the config's env for this call only and never written to the guest's disk.

        ``on_output(stream, text)`` is called, in this thread, with each piece of output as
        it arrives: ``stream`` is ``"stdout"`` or ``"stderr"``, ``text`` a str (UTF-8, errors
        replaced, a character never split across calls; the result keeps the raw bytes). What
        is over ``max_output`` is not passed on. If it raises, the command's process group is
        killed and the exception propagates out of ``run()``.
        """
        call = self._exec_call(command, timeout=timeout, env=env, cwd=cwd, input=input, max_output=max_output,
                               on_output=on_output)
        t0 = time.monotonic()
        callbacks = [cb for cb in (on_output, self.live_output and self.live_output(self.name)) if cb is not None]
        parsed = self._exec(call, t0, callbacks)
        if isinstance(command, str):
            self._check_shell(call.shown, parsed, time.monotonic() - t0)
        return self._result(call.shown, call.timeout, parsed, time.monotonic() - t0, check)

    def spawn(
        self,
        command: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        input: bytes | str | None = None,
        max_output: int | None = None,
        on_output: OutputCallback | None = None,
    ) -> Process:
        """Start ``command`` in the background and return its :class:`~pytest_smolvm.process.Process`
        handle once it runs (``wait``, ``poll``, ``kill``, ``write_stdin``, output so far).

        Arguments are as for :meth:`run`; ``input`` is written to its stdin first, and stdin
        stays open for ``write_stdin()``. It has no time limit: it runs until it exits, is
        killed, or the VM closes (which kills every process it spawned). Its output is kept
        up to ``max_output`` bytes a stream. ``on_output`` is called as for :meth:`run`, but
        in a thread of the spawn's own; if it raises, the process is killed and ``wait()``
        raises that exception.
        """
        call = self._exec_call(command, timeout=None, env=env, cwd=cwd, input=input, max_output=max_output,
                               on_output=on_output, what="spawn")
        live = self.live_output
        proc = Process(self, call, on_output, None if live is None else lambda pid: live(f"{self.name}:{pid}"))
        proc._start(scaled(REPLY_GRACE) * 3)
        self._record(call.shown, f"spawned, pid {proc.pid}" if proc.pid else "spawn failed", 0.0, b"", b"")
        return proc

    def _check_shell(self, shown: str, parsed: replies.ExecReply | replies.AgentError, duration: float) -> None:
        """A shell string in an image without ``/bin/sh`` (the agent reports the failed exec
        as a shell would, 127) is the caller's mistake: say so, and what to do instead."""
        if (isinstance(parsed, replies.ExecReply) and parsed.exit_code == 127
                and parsed.stderr.startswith(NO_SHELL)):
            self._record(shown, "no /bin/sh", duration, b"", parsed.stderr)
            image = self.image.name if self.image is not None else self.config.image
            raise ImageError(self.redact(
                f"{self.name}: image {image!r} has no /bin/sh, so the shell string {shown!r} cannot run; "
                f"pass an argv list instead (run(['prog', 'arg'])) or add a shell to the image"))

    def _exec_call(self, command: str | Sequence[str], *, timeout: float | None, env: Mapping[str, str] | None,
                   cwd: str | None, input: bytes | str | None, max_output: int | None,
                   on_output: object = None, what: str = "run") -> ExecCall:
        """``what``'s (run() or spawn()) arguments, checked (a ConfigError names the bad one)
        and merged with the config."""
        if on_output is not None and not callable(on_output):
            raise ConfigError(f"invalid on_output={on_output!r} for {what}(): expected a callable(stream, text)")
        argv, shown = command_argv(command)
        limit = self.config.timeout if timeout is None else timeout
        if not (isinstance(limit, (int, float)) and limit > 0):
            raise ConfigError(f"invalid timeout={timeout!r} for {what}({shown!r}): expected seconds > 0")
        cap = self.config.max_output if max_output is None else max_output
        if not (isinstance(cap, int) and cap > 0):
            raise ConfigError(f"invalid max_output={max_output!r} for {what}({shown!r}): expected bytes > 0")
        merged_env = WireEnv(self.config.env)
        if env:
            from .config import check_field

            merged_env.update(check_field("env", env))
            self._secrets.update(merged_env.values())
        data = input.encode() if isinstance(input, str) else bytes(input or b"")
        return ExecCall(argv, shown, float(limit), cap, merged_env, cwd, data)

    def _exec(self, call: ExecCall, t0: float,
              callbacks: list[OutputCallback] | None = None) -> replies.ExecReply | replies.AgentError:
        """Send ``call`` to the guest and wait for its reply (its output streamed to
        ``callbacks`` if any). A guest that never confirms the kill is a CommandTimeout; it,
        a guest that died and a failing callback are recorded in the transcript."""
        grace = scaled(REPLY_GRACE)

        def op(guest: GuestClient) -> replies.ExecReply | replies.AgentError:
            if callbacks:
                return run_streamed(guest, call, call.timeout + grace, callbacks)
            return guest.exec(call.argv, timeout=call.timeout, wait=call.timeout + grace,
                              max_output=call.max_output, env=call.env, cwd=call.cwd, stdin=call.stdin)

        def no_reply() -> CommandTimeout:
            # No confirmation: the guest is overloaded or the test stopped its agent. Either
            # way it is the guest's doing, so the test fails (not an infrastructure ERROR).
            self._record(call.shown, "no reply", time.monotonic() - t0, b"", b"")
            return CommandTimeout(self.redact(
                f"{self.name}: run({call.shown!r}) timed out after {call.timeout:g}s and the guest agent did "
                f"not confirm the kill within {grace:g}s more (the guest is overloaded or its agent "
                f"was stopped)"), command=call.shown, timeout=call.timeout)

        try:
            return self._call(f"run({call.shown!r})", op, on_timeout=no_reply)
        except CallbackFailed as exc:
            self._record(call.shown, "killed: on_output raised", time.monotonic() - t0, b"", b"")
            raise exc.error from None
        except GuestDied:
            self._record(call.shown, "guest died", time.monotonic() - t0, b"", b"")
            raise

    def _result(self, shown: str, limit: float, parsed: replies.ExecReply | replies.AgentError,
                duration: float, check: bool) -> RunResult:
        """Turn a validated exec reply into run()'s result or error, and record it."""
        if isinstance(parsed, replies.AgentError):
            self._record(shown, "agent error", duration, b"", b"")
            raise GuestError(self.redact(f"{self.name}: the guest agent could not run {shown!r}: {parsed.message}"))
        out_b, err_b = parsed.stdout, parsed.stderr
        if parsed.timed_out:
            self._record(shown, f"timeout after {limit:g}s", duration, out_b, err_b)
            raise CommandTimeout(
                self.redact(f"{self.name}: run({shown!r}) timed out after {limit:g}s; its process group was killed"),
                command=shown, timeout=limit,
                stdout=out_b.decode(errors="replace"), stderr=err_b.decode(errors="replace"))
        result = RunResult(
            command=shown, exit_code=parsed.exit_code,
            stdout=out_b.decode(errors="replace"), stderr=err_b.decode(errors="replace"),
            duration=duration, stdout_bytes=out_b, stderr_bytes=err_b,
            stdout_truncated=parsed.stdout_truncated, stderr_truncated=parsed.stderr_truncated,
        )
        self._record(shown, f"exit {result.exit_code}" + (", truncated" if result.truncated else ""),
                     duration, out_b, err_b)
        if check and result.exit_code != 0:
            raise CommandFailed(result, secrets=self._secrets)
        return result

    def redact(self, text: str) -> str:
        """``text`` with this VM's env values (config and ``run(env=...)``) masked as ``***``."""
        return redact(text, self._secrets)

    def _record(self, shown: str, outcome: str, duration: float, out: bytes, err: bytes) -> None:
        self.transcript.append(TranscriptEntry(
            self.redact(shown), outcome, duration,
            self.redact(out[:TRANSCRIPT_HEAD].decode(errors="replace")),
            self.redact(err[:TRANSCRIPT_HEAD].decode(errors="replace"))))

    def put(self, src: bytes | bytearray | memoryview | os.PathLike[str], dest: str,
            *, mode: int | None = None) -> None:
        """Write ``src`` (bytes, or a local file or directory given as a Path) to ``dest`` in the guest.

        Parent directories are created. A ``str`` source is refused: it is ambiguous between
        content and a path; pass ``Path(...)`` or ``text.encode()``.

        A directory is copied as a tree (one tar stream, :mod:`pytest_smolvm.transfer`):
        ``dest`` becomes the copy of ``src`` (created with ``src``'s mode if missing, merged
        into if it exists), modes and mtimes are kept, everything belongs to root, symlinks
        are copied as links and never followed; a FIFO, socket or device in it is refused.
        """
        if isinstance(src, str):
            raise TypeError(f"put() takes bytes or a pathlib.Path, not str ({src[:40]!r}); "
                            f"use Path(...) for a local file or .encode() for text")
        self._check_guest_path(dest, "put")
        if not isinstance(src, (bytes, bytearray, memoryview)):
            local = Path(src)
            if local.is_dir():
                if mode is not None:
                    raise ConfigError(f"put({str(local)!r}, {dest!r}, mode={mode!r}): mode= is for a file; "
                                      f"a directory's entries keep their own modes")
                return self._put_tree(local, dest)
            if not local.exists():
                raise ConfigError(f"put({str(local)!r}, {dest!r}): the local source does not exist")
        data = bytes(src) if isinstance(src, (bytes, bytearray, memoryview)) else Path(src).read_bytes()
        if len(data) > MAX_PUT:
            raise ConfigError(f"put({dest!r}): {len(data)} bytes is over the {MAX_PUT}-byte limit of one transfer")
        timeout = 60.0 + len(data) / 5e6
        self._file_call(lambda guest: guest.put(dest, data, mode=mode, timeout=timeout), timeout=timeout,
                        what=f"put({dest!r})", path=dest)

    def _put_tree(self, src: Path, dest: str) -> None:
        packed = transfer.pack(src, MAX_PUT)
        what = f"put({str(src)!r}, {dest!r})"
        reply = self._transfer(what, dest, transfer.put_argv(dest, packed.root_mode), packed.data,
                               timeout=60.0 + len(packed.data) / 5e6, max_output=TRANSFER_MESSAGES)
        if reply.exit_code != 0:
            raise transfer.guest_failure(reply, f"{self.name}: {what}", dest)

    def get_dir(self, src: str, local: str | os.PathLike[str], *, max_size: int = DEFAULT_GET_LIMIT,
                timeout: float = GET_TIMEOUT) -> Path:
        """Copy the guest directory ``src`` to the new local directory ``local`` and return it.

        ``local`` must not exist (its parent must) or be an empty directory. The tree comes
        as one tar of at most ``max_size`` bytes (its files plus 512 bytes a header), else
        GuestFileError and nothing is written. Modes are kept (setuid/setgid/sticky dropped),
        files belong to the caller, symlinks arrive as links (never followed, wherever they
        point), devices and FIFOs are skipped with a :class:`~pytest_smolvm.TransferWarning`.
        """
        self._check_guest_path(src, "get_dir")
        what = f"get_dir({src!r})"
        if isinstance(max_size, bool) or not isinstance(max_size, int) or not 0 < max_size <= MAX_PUT:
            raise ConfigError(f"invalid max_size={max_size!r} for {what}: expected bytes in 1..{MAX_PUT}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ConfigError(f"invalid timeout={timeout!r} for {what}: expected seconds > 0")
        path = transfer.check_local(local, what)
        reply = self._transfer(what, src, transfer.get_argv(src), b"", timeout=float(timeout), max_output=max_size)
        if reply.stdout_truncated:
            raise GuestFileError(errno.EFBIG, f"{self.name}: {what}: the tree is over the limit of {max_size} "
                                 f"bytes as a tar (max_size=); nothing was written to {str(path)!r}", src)
        if reply.exit_code != 0:
            raise transfer.guest_failure(reply, f"{self.name}: {what}", src)
        transfer.unpack(reply.stdout, path, f"{self.name}: {what}")
        return path

    def _transfer(self, what: str, path: str, argv: list[str], stdin: bytes, *, timeout: float,
                  max_output: int) -> replies.ExecReply:
        """One tar command of a tree transfer in the guest (busybox, no shell of the image needed)."""
        grace = scaled(REPLY_GRACE)
        parsed = self._call(what, lambda guest: guest.exec(argv, timeout=timeout, wait=timeout + grace,
                                                           max_output=max_output, cwd="/", stdin=stdin),
                            wait=timeout + grace)
        if isinstance(parsed, replies.AgentError):
            raise GuestFileError(parsed.errno or errno.EIO, f"{self.name}: {what} failed in the guest: "
                                 f"{parsed.message}", path)
        if parsed.timed_out:
            raise GuestTimeout(f"{self.name}: {what} did not finish within {timeout:g}s; its tar was killed")
        return parsed

    def get(self, path: str, *, max_size: int = DEFAULT_GET_LIMIT) -> bytes:
        """Read the guest file ``path`` (at most ``max_size`` bytes, else GuestFileError)."""
        self._check_guest_path(path, "get")
        return self._file_call(lambda guest: guest.get(path, max_size=max_size, timeout=GET_TIMEOUT),
                               timeout=GET_TIMEOUT, what=f"get({path!r})", path=path)

    def _file_call(self, op: Callable[[GuestClient], bytes | replies.AgentError | None], *, timeout: float,
                   what: str, path: str) -> bytes:
        """One ``put``/``get`` round trip: a silent agent is a GuestTimeout, a failure in the
        guest a GuestFileError; returns what was read (nothing for a put)."""
        outcome = self._call(what, op, wait=timeout)
        if isinstance(outcome, replies.AgentError):
            raise GuestFileError(outcome.errno, f"{self.name}: {what} failed in the guest: {outcome.message}", path)
        return outcome or b""

    @staticmethod
    def _check_guest_path(path: object, what: str) -> None:
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
            raise ConfigError(f"invalid guest path {path!r} for {what}(): expected an absolute path")

    def _require_net(self, what: str) -> VMNetwork:
        if self._net is None:
            raise NetworkError(f"{self.name}: {what} needs network='isolated' or 'nat'; "
                               f"this VM has network={self.config.network!r}")
        if self._state != VMState.RUNNING:
            raise SmolVMError(f"{self.name} is not running (state {self._state}); cannot {what}")
        return self._net

    def ssh(self, *, timeout: float = 60.0) -> Any:
        """A connected ``paramiko.SSHClient`` as root, with the guest's host key pinned
        (networked policies only). The first call starts sshd in the guest with a host key
        made for this VM; the client refuses any other key (``RejectPolicy``). Clients are
        closed with the VM."""
        from .guest import ssh

        net = self._require_net("vm.ssh()")
        if self._ssh_keys is None:
            keys = ssh.SSHKeys.generate()
            for path, (data, mode) in ssh.guest_files(keys, str(net.addr.guest_ip)).items():
                self.put(data, path, mode=mode)
            r = self.run(ssh.START_SSHD, timeout=60)
            if r.exit_code != 0:
                raise NetworkError(f"{self.name}: sshd did not start in the guest (exit {r.exit_code}): "
                                   f"{clip(self.redact(r.stderr.strip()), 500, end=True)}")
            self._ssh_keys = keys
        # sshd daemonises before it listens: give it a moment to open its port.
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock = net.connect(22, timeout=timeout)
                break
            except NetworkError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client = ssh.connect(sock, str(net.addr.guest_ip), self._ssh_keys, timeout=timeout)
        self._ssh_clients.append(client)
        return client

    def forward(self, guest_port: int) -> int:
        """Forward a new port on the host's 127.0.0.1 to ``guest_port`` in the guest and
        return the host port (networked policies only). Closed with the VM."""
        if isinstance(guest_port, bool) or not isinstance(guest_port, int) or not 0 < guest_port < 65536:
            raise ConfigError(f"invalid guest_port={guest_port!r} for vm.forward(): expected 1..65535")
        net = self._require_net(f"vm.forward({guest_port})")
        fwd = PortForward(lambda: net.connect(guest_port), f"{self.name}-{guest_port}")
        self._forwards.append(fwd)
        return fwd.host_port
