"""Checkpoints: a running VM's prepared state (RAM, devices, disk), cloned by later VMs.

``vm.checkpoint()`` pauses the VM, saves it into ``<runtime>/<run_id>/cp-<vm>-<n>/`` and
lets it run on; ``SmolVM(config, checkpoint=cp)`` starts a clone of that state. The
directory holds:

- ``mem`` and ``state``: the guest's RAM, which clones map copy-on-write, and its device
  state, as in a golden snapshot;
- ``disk.qcow2``: the VM's disk overlay as it was at the pause (a hard link of the layer
  the VM left; the VM and each clone write their own overlay on top, never into it);
- ``owner.json``: the owning process, so ``reap`` removes a dead run's checkpoints like
  its VM directories; ``meta.json`` and ``console.log`` for people.

The sizes and sha256 digests a clone checks come from the :class:`Checkpoint` value held
in memory, never from the directory: a file changed after the checkpoint was taken is
refused. Checkpoints are removed by :meth:`Checkpoint.remove`, by :func:`remove_all` (the
pytest plugin calls it at session end) and when the interpreter exits.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import json
import os
import shutil
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import VMConfig
from .digest import sha256_file
from .drivers import Driver
from .drivers.base import TEMPLATE_MAC, CheckpointDriver, Nic
from .drivers.consolelog import read_bounded
from .errors import ConfigError, SmolVMError
from .images import Image
from .network.hub import VMNetwork
from .paths import check_name, make_private_dirs
from .runs import write_owner
from .session import GuestSession

#: The most of a boot log a snapshot or checkpoint keeps (its clones' consoles start with
#: it; the log is guest-fed).
BOOT_LOG_LIMIT = 256 * 1024

#: The files of a checkpoint a clone reads, each checked against its size and sha256.
FILES = ("mem", "state", "disk.qcow2")
#: Fields of a checkpoint's shape, in the order a mismatch is reported, with what they mean.
SHAPE_FIELDS: Mapping[str, str] = {
    "backend": "backend", "qemu": "QEMU version", "accel": "accelerator", "host_cpu": "host CPU",
    "image": "image id", "vcpus": "vcpus", "memory_mib": "memory_mib", "cpu": "cpu",
    "disk_size_mib": "disk_size_mib", "nic": "network device", "aslr": "aslr", "volumes": "volumes",
    "ram": "RAM layout",
}


class CheckpointError(SmolVMError):
    """A checkpoint is gone, changed on disk, or could not be taken or restored."""


@dataclasses.dataclass(frozen=True)
class FileDigest:
    name: str
    size: int
    sha256: str


@dataclasses.dataclass(frozen=True, eq=False)
class Checkpoint:
    """The saved state of a prepared VM. Start clones with ``SmolVM(config, checkpoint=cp)``
    or ``smolvm_factory(checkpoint=cp)``; ``config`` defaults to the prepared VM's.

    ``shape`` is everything a clone's RAM and devices must match (backend, accelerator,
    image, vcpus, memory, CPU model, NIC or not, ...); ``network`` the prepared VM's policy;
    ``guest_address`` its NIC's address (a clone drops it for its own lease)."""

    name: str
    path: Path
    run_id: str
    config: VMConfig
    shape: Mapping[str, Any]
    files: tuple[FileDigest, ...]
    disk_bytes: int
    guest_address: str | None = None
    #: Seconds the VM was paused for, and the whole checkpoint() call took.
    paused_s: float = 0.0
    taken_s: float = 0.0
    #: The checkpoint whose disk layer this one's sits on (its layer names that file), if any.
    parent: Checkpoint | None = dataclasses.field(default=None, repr=False)
    #: The prepared-state cache owns it (``smolvm_prepared``): no run removes it.
    cached: bool = False

    def __repr__(self) -> str:
        return f"<Checkpoint {self.name} {self.config.describe()}{'' if self.exists else ' (removed)'}>"

    @property
    def exists(self) -> bool:
        """False once :meth:`remove` was called (its files may stay while others need them)."""
        return not _registry.is_removed(self) and self.path.is_dir()

    @property
    def size(self) -> int:
        """Apparent bytes of its files (the RAM file's size is the guest's RAM; it is sparse)."""
        return sum(f.size for f in self.files)

    @property
    def disk_usage(self) -> int:
        """Bytes its files take on disk now (0 once they are gone)."""
        used = 0
        for f in self.files:
            try:
                used += os.stat(self.path / f.name).st_blocks * 512
            except OSError:
                pass
        return used

    def remove(self) -> None:
        """Remove the checkpoint: no clone can start from it any more. Idempotent. Its files
        go now, or, while a running VM or a later checkpoint sits on its disk layer, when the
        last of those goes. Clones already running are unaffected. A cached checkpoint
        (``smolvm_prepared``) belongs to the cache, not to a run: remove it with
        ``python -m pytest_smolvm checkpoint rm KEY``."""
        if self.cached:
            raise CheckpointError(f"checkpoint {self.name} belongs to the prepared-state cache ({self.path}), "
                                  f"not to this run; remove it with: python -m pytest_smolvm checkpoint rm "
                                  f"{self.name.removeprefix('prepared-')}")
        _registry.remove(self)

    def _delete(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        try:
            self.path.parent.rmdir()  # the run directory, once nothing of the run is left
        except OSError:
            pass

    def verify(self) -> None:
        """Raise CheckpointError unless every file still has the size and sha256 recorded
        when the checkpoint was taken (contents once per process per file version)."""
        if not self.exists:
            raise CheckpointError(f"checkpoint {self.name} was removed ({self.path}); take a new one")
        if self.parent is not None and not self.parent.path.is_dir():
            raise CheckpointError(f"checkpoint {self.name} sits on the disk layer of checkpoint {self.parent.name}, "
                                  f"whose files are gone ({self.parent.path}); take a new one")
        for f in self.files:
            p = self.path / f.name
            try:
                st = os.stat(p, follow_symlinks=False)
            except OSError:
                raise CheckpointError(f"checkpoint {self.name} is missing {p}") from None
            if st.st_size != f.size:
                raise CheckpointError(f"checkpoint file {p} has {st.st_size} bytes, expected {f.size}: "
                                      f"it changed after the checkpoint was taken")
            stamp = (str(p), st.st_ino, st.st_size, st.st_mtime_ns, f.sha256)
            if _registry.verified(stamp):
                continue
            if sha256_file(p) != f.sha256:
                raise CheckpointError(f"checkpoint file {p} does not match its sha256: it changed after "
                                      f"the checkpoint was taken")
            _registry.mark_verified(stamp)


def shape_mismatch(taken: Mapping[str, Any], wanted: Mapping[str, Any]) -> str | None:
    """The first field where a clone's shape differs from its checkpoint's, described with
    both values, or None when they match (pure)."""
    for key in [*SHAPE_FIELDS, *sorted(set(taken) | set(wanted))]:
        if taken.get(key) != wanted.get(key):
            what = SHAPE_FIELDS.get(key, key)
            return f"{what} is {wanted.get(key)!r} for this VM but {taken.get(key)!r} in the checkpoint"
    return None


def check_network(checkpoint: Checkpoint, config: VMConfig) -> None:
    """A clone's network policy against its checkpoint's (pure). Among the NIC policies
    (``isolated``, ``nat`` with ``allow``, ``nat``) any is fine: the policy is enforced on the
    host, and the pytest layer holds it under the run's ceiling. But the NIC is a device in
    the saved state, so ``none`` (no device at all) and the others never mix."""
    had_nic = checkpoint.config.network != "none"
    if had_nic and config.network == "none":
        raise ConfigError(f"invalid network='none' for a clone of checkpoint {checkpoint.name}: the VM it was "
                          f"taken from had network={checkpoint.config.network!r}, so its saved state holds a "
                          f"network device, and 'none' means no device at all; take the checkpoint from a VM "
                          f"with network='none', or give the clone network='isolated' (which reaches the "
                          f"host only)")
    if not had_nic and config.network != "none":
        raise ConfigError(f"invalid network={config.network!r} for a clone of checkpoint {checkpoint.name}: the "
                          f"VM it was taken from had network='none', so its saved state has no network device "
                          f"to attach; take the checkpoint from a VM with a network")


def clone_config(config: VMConfig | None, checkpoint: Checkpoint | None) -> VMConfig:
    """A VM's config: ``config``, else the checkpoint's, else the default; checked against
    what a clone of ``checkpoint`` needs."""
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


def write_meta(cp: Checkpoint) -> None:
    """``meta.json``, for people and tools (clones trust the in-memory value, not this)."""
    meta = {"name": cp.name, "run_id": cp.run_id, "created": time.time(), "shape": dict(cp.shape),
            "config": cp.config.describe(), "disk_bytes": cp.disk_bytes,
            "files": {f.name: {"size": f.size, "sha256": f.sha256} for f in cp.files}}
    (cp.path / "meta.json").write_text(json.dumps(meta, indent=2, default=str))


def digest_files(path: Path) -> tuple[FileDigest, ...]:
    """Size and sha256 of each of a checkpoint's :data:`FILES`, marked verified for this process."""
    found = []
    for name in FILES:
        p = path / name
        digest = sha256_file(p)
        st = os.stat(p)
        found.append(FileDigest(name, st.st_size, digest))
        _registry.mark_verified((str(p), st.st_ino, st.st_size, st.st_mtime_ns, digest))
    return tuple(found)


class _Registry:
    """Checkpoints this process took and has not deleted, what depends on each (running VMs
    and later checkpoints on its disk layer: the layers name their backing file by path), and
    the file versions this process verified."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._owned: dict[Path, Checkpoint] = {}
        self._holds: dict[Path, int] = {}
        self._removed: set[Path] = set()
        self._verified: set[tuple[object, ...]] = set()

    def add(self, cp: Checkpoint) -> None:
        with self._lock:
            self._owned[cp.path] = cp
            if cp.parent is not None:
                self.hold(cp.parent)

    def hold(self, cp: Checkpoint) -> None:
        with self._lock:
            self._holds[cp.path] = self._holds.get(cp.path, 0) + 1

    def release(self, cp: Checkpoint) -> None:
        with self._lock:
            left = self._holds.get(cp.path, 0) - 1
            if left > 0:
                self._holds[cp.path] = left
                return
            self._holds.pop(cp.path, None)
            if cp.path in self._removed:
                self._delete(cp)

    def remove(self, cp: Checkpoint) -> None:
        with self._lock:
            if cp.path in self._removed:
                return
            self._removed.add(cp.path)
            if not self._holds.get(cp.path):
                self._delete(cp)

    def _delete(self, cp: Checkpoint) -> None:
        self._owned.pop(cp.path, None)
        cp._delete()
        if cp.parent is not None:
            self.release(cp.parent)

    def is_removed(self, cp: Checkpoint) -> bool:
        with self._lock:
            return cp.path in self._removed

    def owned(self) -> list[Checkpoint]:
        with self._lock:
            return list(self._owned.values())

    def delete_all(self) -> int:
        with self._lock:
            found = list(self._owned.values())
            for cp in found:
                self._removed.add(cp.path)
                cp._delete()
            self._owned.clear()
            self._holds.clear()
            return len(found)

    def verified(self, stamp: tuple[object, ...]) -> bool:
        with self._lock:
            return stamp in self._verified

    def mark_verified(self, stamp: tuple[object, ...]) -> None:
        with self._lock:
            self._verified.add(stamp)


_registry = _Registry()


def register(cp: Checkpoint) -> None:
    """Own ``cp`` (removed with :func:`remove_all`); it holds its parent's files."""
    _registry.add(cp)


def hold(cp: Checkpoint) -> None:
    """A VM now sits on ``cp``'s disk layer: its files stay until :func:`release`."""
    _registry.hold(cp)


def release(cp: Checkpoint) -> None:
    """Undo one :func:`hold`; a removed checkpoint's files go with its last holder."""
    _registry.release(cp)


def live_checkpoints() -> list[Checkpoint]:
    """Checkpoints this process took whose files are still there (removed or not)."""
    return _registry.owned()


@atexit.register
def remove_all() -> int:
    """Delete every checkpoint this process took, needed or not (session end, interpreter
    exit); returns how many there were."""
    return _registry.delete_all()


class VMCheckpoints:
    """The checkpoints of one VM (``name``): the one it was cloned from (``start_from``), the
    ones it takes, and the one its disk sits on now, which must outlive it (held, released
    at :meth:`release`)."""

    def __init__(self, name: str, start_from: Checkpoint | None) -> None:
        self.name = name
        self.start_from = start_from
        #: The checkpoint whose disk layer this VM's disk sits on (its files must stay).
        self._disk_parent: Checkpoint | None = None
        self._refused: str | None = None  # why take() is refused from now on
        self._numbers = itertools.count(1)

    def check_clone(self, driver: Driver, config: VMConfig, image: Image) -> None:
        """ConfigError unless this VM can start from ``start_from`` (before anything is
        created); then hold it: the clone's disk sits on its layer."""
        cp = self.start_from
        assert cp is not None
        if not isinstance(driver, CheckpointDriver):
            raise ConfigError(f"{self.name}: backend {driver.name!r} cannot start from checkpoint {cp.name}")
        mismatch = shape_mismatch(cp.shape, driver.checkpoint_shape(config, image, str(cp.shape["ram"])))
        if mismatch:
            raise ConfigError(f"{self.name}: cannot start from checkpoint {cp.name}: {mismatch}; a clone "
                              f"needs the same VM shape (start it with the checkpoint's config, cp.config)")
        cp.verify()
        hold(cp)
        self._disk_parent = cp

    def driver_for(self, driver: Driver, config: VMConfig, timeout: object) -> CheckpointDriver:
        """``driver``, once a checkpoint of this VM is known to be possible (else the error saying why)."""
        if self._refused:
            raise SmolVMError(f"{self.name}: cannot take another checkpoint: {self._refused}")
        if config.disk_mode != "isolated":
            raise ConfigError(f"{self.name}: cannot take a checkpoint of a VM with disk_mode="
                              f"{config.disk_mode!r}: its disk is the image's shared one, which later "
                              f"VMs keep changing; use disk_mode='isolated'")
        if not isinstance(driver, CheckpointDriver):
            raise ConfigError(f"{self.name}: backend {driver.name!r} cannot take checkpoints (QEMU can)")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ConfigError(f"invalid timeout={timeout!r} for checkpoint(): expected seconds > 0")
        return driver

    def take(self, session: GuestSession, driver: CheckpointDriver, config: VMConfig, image: Image, *,
             root: Path, run_id: str, net: VMNetwork | None, timeout: float) -> Checkpoint:
        """:meth:`SmolVM.checkpoint <pytest_smolvm.vm.SmolVM.checkpoint>` of the running guest
        ``session``: saved into ``<root>/<run_id>/<vm>.cpN/``."""
        machine = session.machine
        assert machine is not None
        name = check_name(f"{self.name[:52]}.cp{next(self._numbers)}", "checkpoint name")
        path = root / run_id / name
        t0 = time.monotonic()
        old_disk = machine.disk_path
        ram = driver.ram_layout(machine)
        make_private_dirs(path, root)
        try:
            write_owner(path, run_id, name, checkpoint_of=self.name)
            with session.quiesced(self._busy):  # nothing in flight while the state is saved
                disk_bytes, paused = driver.save_checkpoint(
                    machine, config, image, path, ram=ram, timeout=float(timeout),
                    **({"nic": Nic(net.tap_fd, net.addr.tap, TEMPLATE_MAC)} if net else {}))
            (path / "console.log").write_text(read_bounded(machine.console_path, BOOT_LOG_LIMIT))
            cp = Checkpoint(name=name, path=path, run_id=run_id, config=config,
                            shape=driver.checkpoint_shape(config, image, ram), files=digest_files(path),
                            disk_bytes=disk_bytes, guest_address=str(net.guest_setup()["address"]) if net else None,
                            paused_s=paused, taken_s=time.monotonic() - t0, parent=self._disk_parent)
            write_meta(cp)
        except BaseException as exc:
            shutil.rmtree(path, ignore_errors=True)
            if machine.disk_path != old_disk:  # it runs on, on a layer whose name is gone
                self._refused = f"an earlier checkpoint() failed after its disk moved ({exc})"
            raise
        # This VM's disk now sits on cp's layer, which sits on the old parent's: cp takes over
        # the VM's hold on the parent (register), and the VM holds cp.
        register(cp)
        hold(cp)
        if self._disk_parent is not None:
            release(self._disk_parent)
        self._disk_parent = cp
        return cp

    def _busy(self, why: str) -> CheckpointError:
        return CheckpointError(
            f"checkpoint() of {self.name} needs its agent idle, but {why}: a spawn()ed process still "
            f"running or a run() in another thread. Wait for or kill them first; start services "
            f"meant to outlive the checkpoint with run('cmd >/dev/null 2>&1 &') instead")

    def release(self) -> None:
        """The VM is gone: the checkpoint its disk sat on may go when nothing else needs it."""
        if self._disk_parent is not None:
            parent, self._disk_parent = self._disk_parent, None
            release(parent)
