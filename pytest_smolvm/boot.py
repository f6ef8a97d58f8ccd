"""Bringing a VM's guest up: a cold boot, or a clone of a golden snapshot (whose template
VM is booted and saved first when the snapshot is missing).

:class:`Boot` runs the sequence; the VM handle (vm.py) owns the result. Whatever a boot
launches or connects is handed to the VM at once (:class:`VMHooks`), so the VM's teardown
covers a boot that fails half-way, and the VM keeps the errors that describe it (console
tail, how a guest died).
"""

from __future__ import annotations

import dataclasses
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from .checkpoints import Checkpoint
from .config import VMConfig
from .drivers import Driver, Machine
from .drivers.base import TEMPLATE_MAC, CheckpointDriver, Nic, SnapshotDriver
from .drivers.consolelog import read_bounded
from .errors import BootError, NetworkError, ProtocolError
from .guest.channel import Channel, ChannelClosed, ReplyTimeout
from .guest.client import GuestClient, exec_body_limit
from .guest.replies import SetupReply
from .images import Image
from .network.hub import VMNetwork
from .snapshots import SnapshotError, SnapshotStore, default_store
from .timeouts import scaled
from .transfer import BUSYBOX
from .volumes import check_mounted, guest_mounts

#: How long a restored clone may take to answer before the VM falls back to a cold boot.
RESTORE_TIMEOUT = 30.0
#: The most of a snapshot's boot log a clone's console starts with (the log is guest-fed).
BOOT_LOG_LIMIT = 256 * 1024
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
DROP_ADDRESS = ('for d in /sys/class/net/*; do n=${d##*/}; '
                '[ "$n" = lo ] || ip addr del "$1" dev "$n" 2>/dev/null; done; true')


@dataclasses.dataclass(frozen=True)
class VMHooks:
    """What a boot needs from the VM it starts."""

    #: Take ownership of the VMM launched (None: forget it) and what its console starts with.
    launched: Callable[[Machine | None, str], None]
    #: Take ownership of the guest client connected (None: forget it).
    connected: Callable[[GuestClient | None], None]
    #: Run a call on the guest, turning a guest that stops under it into GuestDied.
    call: Callable[[str, Callable[[GuestClient], SetupReply]], SetupReply]
    #: The console's last lines, for a BootError.
    console_tail: Callable[[], str]
    #: The VMM's exit status once it has had a moment to exit (None: it still runs).
    exit_status: Callable[[], int | None]


class Boot:
    """One start of one VM (``name``, booting ``image`` with ``config`` in ``workdir``);
    clones come from ``snapshots``."""

    def __init__(self, name: str, config: VMConfig, image: Image, workdir: Path, driver: Driver,
                 net: VMNetwork | None, hooks: VMHooks, *, snapshots: SnapshotStore | None = None) -> None:
        self.name = name
        self.config = config
        self.image = image
        self.workdir = workdir
        self.driver = driver
        self.net = net
        self.hooks = hooks
        self.snapshots = snapshots  # None: snapshots.default_store(), looked up when cloning
        #: "snapshot" (a clone of a golden snapshot) or "cold" (booted from scratch), once up.
        self.mode: str | None = None
        self._machine: Machine | None = None
        self._guest: GuestClient | None = None

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

    def _launched(self, machine: Machine | None, console_prefix: str = "") -> None:
        self._machine = machine
        self.hooks.launched(machine, console_prefix)

    def cold(self, t0: float) -> None:
        """Boot from scratch; ``t0`` is when the VM's start began (the boot timeout counts from it)."""
        self._launched(self.driver.launch(self.config, self.image, self.workdir, **self._nic_kw()))
        self._open_guest(t0, self.config.boot_timeout)
        self._setup(grow_root=self.grows_root)
        self.mode = "cold"

    def clone(self) -> None:
        """Restore a clone of this config's golden snapshot, building the snapshot first if
        it is missing. Raises SnapshotError (and BootError, GuestDied, ProtocolError) when
        the caller should fall back to :meth:`cold` after :meth:`discard_attempt`."""
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
        machine = driver.launch_clone(self.config, self.image, snap, self.workdir, **self._nic_kw())
        self._launched(machine, f"{boot_log}--- {self.name}: restored from snapshot {key} ---\n")
        self._open_guest(time.monotonic(), min(self.config.boot_timeout, scaled(RESTORE_TIMEOUT)))
        self._setup(grow_root=False)
        self.mode = "snapshot"

    def restore(self, checkpoint: Checkpoint) -> None:
        """Start a clone of ``checkpoint`` (no fallback: a cold boot would lack the prepared
        state), then make it unique like any clone. The prepared VM's NIC address is dropped
        for this VM's own lease."""
        driver = self.driver
        assert isinstance(driver, CheckpointDriver)
        checkpoint.verify()
        boot_log = read_bounded(checkpoint.path / "console.log", BOOT_LOG_LIMIT)
        machine = driver.launch_checkpoint(self.config, self.image, checkpoint.path, self.workdir,
                                           ram=str(checkpoint.shape["ram"]), disk_bytes=checkpoint.disk_bytes,
                                           **self._nic_kw())
        self._launched(machine, f"{boot_log}--- {self.name}: restored from checkpoint {checkpoint.name} ---\n")
        self._open_guest(time.monotonic(), min(self.config.boot_timeout, scaled(RESTORE_TIMEOUT)))
        self._setup(grow_root=False)
        old = checkpoint.guest_address
        if self.net is not None and old and old != self.net.guest_setup()["address"]:
            assert self._guest is not None
            self._guest.exec([BUSYBOX, "sh", "-c", DROP_ADDRESS, BUSYBOX, old], timeout=30, wait=scaled(30) + 10,
                             max_output=4096)
        self.mode = "checkpoint"

    def build_template(self, driver: SnapshotDriver, target: Path) -> None:
        """Cold-boot a template into ``target``, bring it to the state every clone starts
        from (root grown, disk synced, agent idle), and save it."""
        tdir = self.workdir / "template"
        tdir.mkdir()
        machine = driver.launch_template(self.config, self.image, tdir, target, **self._nic_kw())
        try:
            guest = GuestClient(Channel(machine.connect(timeout=10.0), machine.alive, max_body=1 << 20))
            try:
                guest.hello(timeout=self.config.boot_timeout)
                # The files every clone's setup rewrites are written here once too, so their
                # inodes and blocks are in the page cache clones inherit.
                resize = guest.setup(grow_root=self.grows_root, hostname="smolvm-template",
                                     machine_id=secrets.token_hex(16), timeout=120).resize
                if resize and resize.exit_code:
                    raise SnapshotError(f"growing the template's root failed: {resize.output}")
                for argv in PRIME_COMMANDS:
                    guest.exec(argv, timeout=PRIME_TIMEOUT, wait=scaled(PRIME_TIMEOUT) + 30, max_output=4096)
                guest.sync(timeout=60)
            except (ReplyTimeout, ChannelClosed, ProtocolError) as exc:
                raise SnapshotError(f"the snapshot template did not come up ({exc}): "
                                    f"{machine.diagnostics()}") from None
            finally:
                guest.close()
            driver.save_snapshot(machine, target)
            (target / "console.log").write_text(read_bounded(machine.console_path, BOOT_LOG_LIMIT))
        finally:
            machine.kill()
            shutil.rmtree(tdir, ignore_errors=True)

    def discard_attempt(self) -> None:
        """Undo a failed clone attempt, keeping the VM directory for the cold boot."""
        if self._guest is not None:
            self._guest.close()
            self._guest = None
            self.hooks.connected(None)
        if self._machine is not None:
            self._machine.kill()
        self._launched(None)
        for child in self.workdir.iterdir():
            if child.name not in KEEP_ON_DISCARD:
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)

    def _open_guest(self, t0: float, timeout: float) -> None:
        assert self._machine is not None
        sock = self._machine.connect(timeout=10.0)
        self._guest = GuestClient(Channel(sock, self._machine.alive,
                                          max_body=exec_body_limit(self.config.max_output)))
        self.hooks.connected(self._guest)
        self._handshake(self._machine, self._guest, t0, timeout)

    def _handshake(self, machine: Machine, guest: GuestClient, t0: float, timeout: float) -> None:
        remaining = timeout - (time.monotonic() - t0)
        try:
            guest.hello(timeout=max(remaining, 1.0))
        except ReplyTimeout:
            raise BootError(f"{self.name}: the guest agent did not answer within "
                            f"{timeout:.0f}s (accel {machine.accel.name})", self.hooks.console_tail()) from None
        except (ChannelClosed, ProtocolError) as exc:
            # A panic's reboot under -no-reboot: let QEMU exit, so its last console lines are read.
            self.hooks.exit_status()
            raise BootError(f"{self.name}: the VM stopped while booting ({exc}); "
                            f"VMM status {machine.exit_status()}; {machine.diagnostics()}",
                            self.hooks.console_tail()) from None

    def _setup(self, *, grow_root: bool) -> None:
        """Make the guest current and unique: clock, RNG reseed, hostname, machine-id (and
        grow the root filesystem on a cold boot). Clones of one snapshot share RAM up to here."""
        net = self.net.guest_setup() if self.net is not None else None
        reply = self.hooks.call("guest setup", lambda guest: guest.setup(
            time_ns=time.time_ns(), hostname=f"smolvm-{self.name}", machine_id=secrets.token_hex(16),
            grow_root=grow_root, net=net, volumes=guest_mounts(self.config.volumes), entropy=secrets.token_bytes(64),
            timeout=scaled(60.0)))
        if reply.error is not None:
            raise BootError(f"{self.name}: guest setup failed: {reply.error.message}", self.hooks.console_tail())
        nic = reply.net
        if self.net is not None and (not nic or nic.exit_code):
            raise NetworkError(f"{self.name}: configuring the guest's NIC failed: "
                               f"{nic.output if nic else 'the agent did not configure it'}")
        if self.config.volumes:
            check_mounted(reply.volumes, self.config.volumes, self.name)
        resize = reply.resize
        if resize and resize.exit_code:
            raise BootError(f"{self.name}: growing the root filesystem to "
                            f"{self.config.disk_size_mib} MiB failed: {resize.output}")
