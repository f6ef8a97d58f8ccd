"""The VM handle: a VM's life (start, close, detach, lifetime), its network, checkpoints,
ssh and port forwards. Commands (:mod:`.commands`) and files (:mod:`.transfer`) have owners
of their own; the handle delegates to them in a line each. Usable without pytest."""

from __future__ import annotations

import enum
import functools
import itertools
import json
import os
import secrets
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from . import images, paths, runs
from .boot import Boot
from .checkpoints import Checkpoint, VMCheckpoints, clone_config
from .commands import Commands, Transcript
from .config import VMConfig
from .drivers import Accel, Driver, default_driver
from .errors import BootError, ConfigError, GuestDied, NetworkError, ProtocolError, SmolVMError
from .evidence import Evidence, EvidenceProbe
from .guest.ssh import SSHKeys
from .network import hub
from .network.credentials import Secret
from .network.forward import PortForward
from .network.hub import VMNetwork
from .network.policy import Caps
from .network.state import NetworkState
from .paths import cache_dir, check_name, make_private_dirs
from .process import OutputCallback, Process
from .reporting import clip
from .results import RunResult as RunResult  # re-exported: it was defined here
from .session import GuestSession
from .snapshots import SnapshotError, SnapshotStore, SnapshotWarning
from .transfer import DEFAULT_GET_LIMIT, GET_TIMEOUT, Files

__all__ = ["AttachNetwork", "NetworkState", "RunResult", "SmolVM", "VMState"]

#: How a networked VM gets its NIC: ``network.hub.attach(vm, run_id, policy, allow, uplink, caps, dns_upstream,
#: secrets)``.
AttachNetwork = Callable[[str, str, str, tuple[str, ...], str | None, Caps, tuple[str, ...], dict[str, Secret]],
                         VMNetwork]
#: Numbers VM names; the warm-pool thread and the test's thread both create VMs. The lock
#: makes that safe without leaning on the GIL (which makes a bare next() atomic today, but
#: not on a free-threaded build).
_numbers = itertools.count(1)
_numbers_lock = threading.Lock()


def _next_name() -> str:
    with _numbers_lock:
        return f"vm{next(_numbers)}-{secrets.token_hex(2)}"


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


class SmolVM:
    """One microVM. Use as a context manager, or call :meth:`start` and :meth:`close`.

    >>> with SmolVM(VMConfig(memory_mib=256)) as vm:   # doctest: +SKIP
    ...     vm.run("echo hi").stdout
    'hi\\n'
    """

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
        self.config = clone_config(config, checkpoint)
        self._driver = driver
        self._driver_used: Driver | None = None
        self._resolve_image = resolve_image
        self._snapshot_store = snapshot_store
        self._attach_network = attach_network
        self.name = check_name(name or _next_name(), "VM name")
        self.run_id = check_name(runs.current_run_id(), "run id (SMOLVM_RUN_ID)")
        self._root = runtime_dir if runtime_dir is not None else paths.runtime_dir()
        self.workdir = self._root / self.run_id / self.name
        self._checkpoints = VMCheckpoints(self.name, checkpoint)
        #: What every command did, with this VM's env values (config and run()) masked.
        self._transcript = Transcript(self.config.env.values())
        self.transcript = self._transcript.entries
        self.network = NetworkState(self.config.network, self.config.allow, self.config.uplink)
        self.image: images.Image | None = None
        self.boot_time: float | None = None
        #: "snapshot" (a clone of a golden snapshot), "checkpoint" or "cold" (booted from scratch).
        self.boot_mode: str | None = None
        self.disk_path: Path | None = None
        self._session: GuestSession | None = None  # the running guest, once booted
        self._commands = Commands(self.name, self.config, self._transcript)
        self._files = Files(self.name)
        self._probe = EvidenceProbe(self.name)
        self._state = VMState.NEW
        self._lock = threading.Lock()
        self._lifetime_timer: threading.Timer | None = None
        self._net: VMNetwork | None = None
        self._forwards: list[PortForward] = []
        self._ssh_keys: SSHKeys | None = None
        self._ssh_clients: list[Any] = []
        #: Live output of every command (the pytest plugin's, under ``-s``): called with a
        #: label (the VM's name; ``name:pid`` for a spawn) once per command, it returns an
        #: ``on_output`` callback for that command, used beside the caller's. None: off.
        self.live_output: Callable[[str], OutputCallback] | None = None

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
            driver = self._driver_used = self._driver or default_driver(self.config)
            if self._checkpoints.start_from is not None:
                self._checkpoints.check_clone(driver, self.config, self.image)
            make_private_dirs(self.workdir, self._root)
            runs.write_owner(self.workdir, self.run_id, self.name)
            runs.track(self)
            if self.config.network != "none":
                self._net = (self._attach_network or hub.attach)(
                    self.name, self.run_id, self.config.network, self.config.allow, self.config.uplink,
                    Caps(self.config.egress_kib_per_s, self.config.egress_conns_per_s), self.config.dns_upstream,
                    dict(self.config.secrets))
                self._commands.guest_env = self._net.guest_env()
                self.network = NetworkState(self.config.network, self.config.allow, self.config.uplink, self._net)
            session = self._session = self._boot(driver, t0)
            self._commands.attach(session, self.image.name)
            self._files.attach(session)
            self.disk_path = session.machine.disk_path if session.machine else None
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
        pre-started VM to a test, so time spent waiting as a spare does not count (nor in
        :meth:`evidence`). When it runs out the VMM is destroyed; calls in flight and later
        ones raise GuestDied naming the limit."""
        self._probe.attach(self.pid, self.disk_path)
        if self._lifetime_timer is not None:
            self._lifetime_timer.cancel()
        if self.config.lifetime is not None and self._state == VMState.RUNNING and self._session is not None:
            why = f"the VM exceeded its lifetime of {self.config.lifetime:g}s and was destroyed"
            self._lifetime_timer = threading.Timer(self.config.lifetime, self._session.expire, args=(why,))
            self._lifetime_timer.daemon = True
            self._lifetime_timer.start()

    def _boot(self, driver: Driver, t0: float) -> GuestSession:
        """Clone the checkpoint or the golden snapshot if this VM can, else (or if the
        snapshot fails) cold-boot."""
        assert self.image is not None
        boot = Boot(self.name, self.config, self.image, self.workdir, driver, self._net,
                    snapshots=self._snapshot_store, redact=self.redact)
        if self._checkpoints.start_from is not None:
            session = boot.restore(self._checkpoints.start_from)
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
        return session

    def checkpoint(self, *, timeout: float = 300.0) -> Checkpoint:
        """Save this VM's state (RAM, devices, disk) and let it run on; returns a
        :class:`~pytest_smolvm.checkpoints.Checkpoint` to start clones from.

        The VM is paused while its RAM is written (no command runs meanwhile) and then
        resumes where it was: processes keep running, files stay. The checkpoint lives in the
        run's runtime directory until :meth:`Checkpoint.remove`, session end (pytest) or
        interpreter exit, and ``reap`` removes a dead run's. Needs ``disk_mode='isolated'``
        and a backend that can do it (QEMU; Firecracker cannot yet).
        """
        session = self._session
        if self._state != VMState.RUNNING or session is None or session.machine is None:
            raise SmolVMError(f"{self.name} is not running (state {self._state}); cannot take a checkpoint")
        assert self._driver_used is not None and self.image is not None
        driver = self._checkpoints.driver_for(self._driver_used, self.config, timeout)
        try:
            return self._checkpoints.take(session, driver, self.config, self.image, root=self._root,
                                          run_id=self.run_id, net=self._net, timeout=float(timeout))
        finally:
            self.disk_path = session.machine.disk_path  # a checkpoint moves the VM onto a new layer

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
        self._checkpoints.release()
        runs.untrack(self)
        if net_error is not None:
            raise net_error

    def evidence(self, *, guest: bool = True, archive_limit: int = 0) -> Evidence:
        """What this VM did since it was handed over (an :class:`Evidence`; ``archive_limit``: its files as a tar)."""
        run = functools.partial(self._commands.quiet, max_output=max(256 * 1024, archive_limit))
        return self._probe.gather(pid=self.pid, disk=self.disk_path, net=self._net, transcript=self._transcript,
                                  run=run if guest and self.alive else None, archive_limit=archive_limit,
                                  rootfs=self.image.rootfs if self.image else None)

    @property
    def console_log(self) -> str:
        """What the guest printed on its serial console so far: all of it up to 2 MiB, else
        the first and last MiB around a marker line; lines cut at 4 KiB."""
        return self._session.console() if self._session is not None else ""

    def redact(self, text: str) -> str:
        """``text`` with this VM's env values (config and ``run(env=...)``) masked as ``***``."""
        return self._transcript.redact(text)

    # ------------------------------------------------------------------ commands and files

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
        return self._commands.run(
            command, timeout=timeout, env=env, cwd=cwd, input=input, check=check, max_output=max_output,
            on_output=on_output, live=self.live_output)

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
        return self._commands.spawn(
            command, env=env, cwd=cwd, input=input, max_output=max_output, on_output=on_output, live=self.live_output)

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
        self._files.put(src, dest, mode=mode)

    def get_dir(self, src: str, local: str | os.PathLike[str], *, max_size: int = DEFAULT_GET_LIMIT,
                timeout: float = GET_TIMEOUT) -> Path:
        """Copy the guest directory ``src`` to the new local directory ``local`` and return it.

        ``local`` must not exist (its parent must) or be an empty directory. The tree comes
        as one tar of at most ``max_size`` bytes (its files plus 512 bytes a header), else
        GuestFileError and nothing is written. Modes are kept (setuid/setgid/sticky dropped),
        files belong to the caller, symlinks arrive as links (never followed, wherever they
        point), devices and FIFOs are skipped with a :class:`~pytest_smolvm.TransferWarning`.
        """
        return self._files.get_dir(src, local, max_size=max_size, timeout=timeout)

    def get(self, path: str, *, max_size: int = DEFAULT_GET_LIMIT) -> bytes:
        """Read the guest file ``path`` (at most ``max_size`` bytes, else GuestFileError)."""
        return self._files.get(path, max_size=max_size)

    # ------------------------------------------------------------------ network

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
