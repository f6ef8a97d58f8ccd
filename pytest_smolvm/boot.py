"""Bringing a VM's guest up: a cold boot, a clone of a golden snapshot (whose template VM is
booted and saved first when the snapshot is missing), or a clone of a checkpoint.

:class:`Boot` runs the sequence and *returns* the running guest as a
:class:`~pytest_smolvm.session.GuestSession`, which the VM handle (vm.py) then owns. An
attempt that fails cleans up after itself here (agent client, VMM, and for a clone the files
the cold boot would trip over) before its error propagates.
"""

from __future__ import annotations

import contextlib
import functools
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .checkpoints import BOOT_LOG_LIMIT, Checkpoint
from .config import VMConfig
from .drivers import Driver, Machine
from .drivers.base import TEMPLATE_MAC, CheckpointDriver, Nic, SnapshotDriver
from .drivers.consolelog import read_bounded
from .errors import BootError, GuestError, NetworkError
from .guest.client import GuestClient, exec_body_limit
from .guest.replies import ExecReply
from .images import Image
from .network.hub import VMNetwork
from .session import GuestSession
from .snapshots import SnapshotError, SnapshotStore, default_store
from .timeouts import scaled
from .transfer import BUSYBOX
from .volumes import check_mounted, guest_mounts

#: How long a restored clone may take to answer before the VM falls back to a cold boot.
RESTORE_TIMEOUT = 30.0
#: Files of a VM directory a failed clone attempt leaves for the cold boot.
KEEP_ON_DISCARD = ("owner.json",)
#: Run once in a snapshot template before it is saved, failures ignored (an image may lack
#: them): what they read from the rootfs (the shell, the C library, Python and its startup
#: modules) is then in the page cache of every clone, which shares the template's RAM. The
#: static agent reads nothing from the rootfs, so without this each clone's first command
#: would read them from disk (measured under TCG: first python3 in a clone 662 -> ~360 ms).
PRIME_COMMANDS: tuple[tuple[str, ...], ...] = (("/bin/sh", "-c", "true"), ("python3", "-c", "pass"))
PRIME_TIMEOUT = 60.0
#: Run in a checkpoint's clone (busybox sh, ``$1`` the prepared VM's address/prefix): the
#: agent's setup added the clone's lease but the saved NIC still holds the old address,
#: which the host's policy would drop as spoofed.
#: Appends stdin (the run CA) to the guest's system trust bundle, once per CA.
TRUST_CA = ('umask 022; mkdir -p /etc/ssl/certs; ca=$(cat); b=/etc/ssl/certs/ca-certificates.crt; '
            'grep -qF "$(printf %s "$ca" | sed -n 2p)" "$b" 2>/dev/null || printf "%s\\n" "$ca" >> "$b"')
DROP_ADDRESS = ('for d in /sys/class/net/*; do n=${d##*/}; '
                '[ "$n" = lo ] || ip addr del "$1" dev "$n" 2>/dev/null; done; true')


class Boot:
    """One start of one VM (``name``, booting ``image`` with ``config`` in ``workdir``);
    clones come from ``snapshots``. ``redact`` masks the VM's secrets in what its session
    reports."""

    def __init__(self, name: str, config: VMConfig, image: Image, workdir: Path, driver: Driver,
                 net: VMNetwork | None, *, snapshots: SnapshotStore | None = None,
                 redact: Callable[[str], str] = lambda text: text) -> None:
        self.name = name
        self.config = config
        self.image = image
        self.workdir = workdir
        self.driver = driver
        self.net = net
        self.snapshots = snapshots  # None: snapshots.default_store(), looked up when cloning
        self.redact = redact
        #: "cold", "snapshot" (a clone of a golden snapshot) or "checkpoint", once up.
        self.mode: str | None = None

    @property
    def wants_snapshot(self) -> bool:
        return (self.config.snapshot and self.config.disk_mode == "isolated"
                and isinstance(self.driver, SnapshotDriver))

    @property
    def grows_root(self) -> bool:
        """Whether the disk is bigger than the image, so the root filesystem must grow."""
        return bool(self.config.disk_size_mib and self.config.disk_size_mib > self.image.rootfs_mib)

    def _nic_kw(self) -> dict[str, Nic]:
        """``nic=`` for a driver's launch methods (absent without a network, so drivers that
        have no networking need not accept it)."""
        if self.net is None:
            return {}
        return {"nic": Nic(self.net.tap_fd, self.net.addr.tap, TEMPLATE_MAC)}

    def cold(self, t0: float) -> GuestSession:
        """Boot from scratch; ``t0`` is when the VM's start began (the boot timeout counts from it)."""
        with self._attempt() as attempt:
            session = attempt(self.driver.launch(self.config, self.image, self.workdir, **self._nic_kw()))
            session.hello(t0, self.config.boot_timeout)
            self._setup(session, grow_root=self.grows_root)
        self.mode = "cold"
        return session

    def clone(self) -> GuestSession:
        """Restore a clone of this config's golden snapshot, building the snapshot first if
        it is missing. Raises SnapshotError (and BootError, GuestDied, ProtocolError) when
        the caller should fall back to :meth:`cold`; the VM directory is then as before."""
        driver = self.driver
        assert isinstance(driver, SnapshotDriver)
        store = self.snapshots if self.snapshots is not None else default_store()
        key = driver.snapshot_key(self.config, self.image)
        try:
            snap = store.lookup(key)
        except SnapshotError:
            store.discard(key)  # corrupt: this VM cold-boots, the next one rebuilds it
            raise
        if snap is None:
            snap = store.create(key, lambda target: self.build_template(driver, target))
        boot_log = read_bounded(snap / "console.log", BOOT_LOG_LIMIT)
        with self._attempt(discard=True) as attempt:
            session = attempt(driver.launch_clone(self.config, self.image, snap, self.workdir, **self._nic_kw()),
                              f"{boot_log}--- {self.name}: restored from snapshot {key} ---\n")
            session.hello(time.monotonic(), min(self.config.boot_timeout, scaled(RESTORE_TIMEOUT)))
            self._setup(session, grow_root=False)
        self.mode = "snapshot"
        return session

    def restore(self, checkpoint: Checkpoint) -> GuestSession:
        """Start a clone of ``checkpoint`` (no fallback: a cold boot would lack the prepared
        state), then make it unique like any clone. The prepared VM's NIC address is dropped
        for this VM's own lease."""
        driver = self.driver
        assert isinstance(driver, CheckpointDriver)
        checkpoint.verify()
        boot_log = read_bounded(checkpoint.path / "console.log", BOOT_LOG_LIMIT)
        with self._attempt() as attempt:
            session = attempt(driver.launch_checkpoint(self.config, self.image, checkpoint.path, self.workdir,
                                                       ram=str(checkpoint.shape["ram"]),
                                                       disk_bytes=checkpoint.disk_bytes, **self._nic_kw()),
                              f"{boot_log}--- {self.name}: restored from checkpoint {checkpoint.name} ---\n")
            session.hello(time.monotonic(), min(self.config.boot_timeout, scaled(RESTORE_TIMEOUT)))
            self._setup(session, grow_root=False)
            old = checkpoint.guest_address
            if self.net is not None and old and old != self.net.guest_setup()["address"]:
                session.call("dropping the prepared VM's address", lambda guest: guest.exec(
                    [BUSYBOX, "sh", "-c", DROP_ADDRESS, BUSYBOX, old], timeout=30, wait=scaled(30) + 10,
                    max_output=4096))
        self.mode = "checkpoint"
        return session

    @contextlib.contextmanager
    def _attempt(self, *, discard: bool = False) -> Iterator[Callable[..., GuestSession]]:
        """One launch: yields ``attempt(machine, console_prefix="")``, which opens the session
        on the machine just launched. If anything inside fails, the session is closed (or the
        machine killed, if no session was opened) and, with ``discard``, the VM directory is
        emptied but for KEEP_ON_DISCARD, so a cold boot can follow."""
        made: list[GuestSession] = []
        launched: list[Machine] = []

        def attempt(machine: Machine, console_prefix: str = "") -> GuestSession:
            launched.append(machine)
            session = GuestSession.open(self.name, machine, max_body=exec_body_limit(self.config.max_output),
                                        console_prefix=console_prefix, redact=self.redact)
            made.append(session)
            return session

        try:
            yield attempt
        except BaseException:
            if made:
                made[0].close()
            elif launched:
                launched[0].kill()
            if discard:
                self._discard_files()
            raise

    def _discard_files(self) -> None:
        for child in self.workdir.iterdir():
            if child.name not in KEEP_ON_DISCARD:
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)

    def build_template(self, driver: SnapshotDriver, target: Path) -> None:
        """Cold-boot a template into ``target``, bring it to the state every clone starts
        from (root grown, disk synced, agent idle), and save it."""
        tdir = self.workdir / "template"
        tdir.mkdir()
        machine = driver.launch_template(self.config, self.image, tdir, target, **self._nic_kw())
        try:
            session = GuestSession.open(f"{self.name}-template", machine, max_body=1 << 20)
            try:
                self._prime(session)
            except GuestError as exc:
                raise SnapshotError(f"the snapshot template did not come up ({exc}): "
                                    f"{machine.diagnostics()}") from None
            finally:
                session.disconnect()
            driver.save_snapshot(machine, target)
            (target / "console.log").write_text(read_bounded(machine.console_path, BOOT_LOG_LIMIT))
        finally:
            machine.kill()
            shutil.rmtree(tdir, ignore_errors=True)

    def _prime(self, session: GuestSession) -> None:
        """The template's steps before it is saved: handshake, setup, PRIME_COMMANDS, sync."""
        session.call("hello", lambda guest: guest.hello(timeout=self.config.boot_timeout))
        # The files every clone's setup rewrites are written here once too, so their
        # inodes and blocks are in the page cache clones inherit.
        resize = session.call("setup", lambda guest: guest.setup(
            grow_root=self.grows_root, hostname="smolvm-template", machine_id=secrets.token_hex(16),
            timeout=120)).resize
        if resize and resize.exit_code:
            raise SnapshotError(f"growing the template's root failed: {resize.output}")
        for argv in PRIME_COMMANDS:
            session.call(f"priming {argv[0]}", functools.partial(
                GuestClient.exec, argv=argv, timeout=PRIME_TIMEOUT, wait=scaled(PRIME_TIMEOUT) + 30, max_output=4096))
        session.call("sync", lambda guest: guest.sync(timeout=60))

    def _trust_run_ca(self, session: GuestSession) -> None:
        """Append the run CA's certificate (public; its key never leaves the host) to the
        guest's system bundle, which SSL_CERT_FILE/REQUESTS_CA_BUNDLE also name."""
        assert self.net is not None and self.net.proxy is not None
        pem = self.net.proxy.ca.pem.encode()
        reply = session.call("trusting the run CA", functools.partial(
            GuestClient.exec, argv=["/bin/sh", "-c", TRUST_CA], timeout=30, wait=scaled(30.0) + 30, max_output=4096,
            stdin=pem))
        if not isinstance(reply, ExecReply) or reply.exit_code:
            raise BootError(f"{self.name}: installing the run CA for secrets failed: {reply}", session.console_tail())

    def _setup(self, session: GuestSession, *, grow_root: bool) -> None:
        """Make the guest current and unique: clock, RNG reseed, hostname, machine-id (and
        grow the root filesystem on a cold boot). Clones of one snapshot share RAM up to here."""
        net = self.net.guest_setup() if self.net is not None else None
        reply = session.call("guest setup", lambda guest: guest.setup(
            time_ns=time.time_ns(), hostname=f"smolvm-{self.name}", machine_id=secrets.token_hex(16),
            grow_root=grow_root, net=net, volumes=guest_mounts(self.config.volumes), entropy=secrets.token_bytes(64),
            timeout=scaled(60.0)))
        if reply.error is not None:
            raise BootError(f"{self.name}: guest setup failed: {reply.error.message}", session.console_tail())
        nic = reply.net
        if self.net is not None and (not nic or nic.exit_code):
            raise NetworkError(f"{self.name}: configuring the guest's NIC failed: "
                               f"{nic.output if nic else 'the agent did not configure it'}")
        if self.net is not None and self.net.proxy is not None:
            self._trust_run_ca(session)
        if self.config.volumes:
            check_mounted(reply.volumes, self.config.volumes, self.name)
        resize = reply.resize
        if resize and resize.exit_code:
            raise BootError(f"{self.name}: growing the root filesystem to "
                            f"{self.config.disk_size_mib} MiB failed: {resize.output}")
