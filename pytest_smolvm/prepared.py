"""Prepared state that lasts: checkpoints cached across runs and shared by processes.

``prepare(key, setup)`` returns a :class:`~pytest_smolvm.checkpoints.Checkpoint` of a VM on
which ``setup(vm)`` ran, from ``<cache>/checkpoints/<digest>/`` when one is there, else
built once: under a file lock, so xdist workers and concurrent runs wait for whichever
process got there first and then use its result. ``<digest>`` hashes the user's ``key``
with everything the saved state depends on (:func:`cache_key`): the driver's checkpoint
shape (backend, QEMU version, accelerator, host CPU under KVM/HVF, image id, vcpus, memory,
CPU model, disk size, NIC, ASLR) and :data:`FORMAT`. ``setup``'s source is *not* hashed:
what it installs depends on files and helpers a hash of its text would miss, so the key is
the user's to change (``"app-v3"`` -> ``"app-v4"``), like a CI cache key.

A cache entry (one directory) holds ``mem``, ``state``, ``disk.qcow2`` (rebased onto the
image's root disk, so it needs nothing but the image) and ``manifest.json`` (key, shape,
sizes and sha256 of each file). It is built in ``.build-<digest>-<pid>-<tid>`` and
published by ``rename``: a build killed half-way leaves a directory no lookup reads (the
reaper removes it). Every file's size and sha256 are checked against the manifest before
QEMU reads a byte; a file that differs is refused (:class:`CheckpointError`).

The owner is the cache, never a run: a process using an entry holds a shared ``flock`` on
``<digest>.use`` until its session ends (:func:`release_all`), and ``prune`` and ``rm``
skip entries someone holds. Least-recently-used entries go when the cache passes
:data:`DEFAULT_MAX_MIB` (``SMOLVM_CHECKPOINT_CACHE_MIB``).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from . import images
from .checkpoints import FILES, Checkpoint, CheckpointError, FileDigest
from .config import VMConfig
from .drivers import Driver, default_driver
from .drivers.base import CheckpointDriver
from .errors import ConfigError
from .paths import NAME_RE, cache_dir

#: Bumped when what a cache entry holds or how it is keyed changes: old entries stop matching.
FORMAT = 1
#: Size cap of the cache (disk usage of its entries, MiB); least recently used go first.
DEFAULT_MAX_MIB = 10 * 1024
#: How long a process waits for another's build of the same entry.
BUILD_TIMEOUT = 1800.0
#: Config fields a cache entry records (the rest are per run: env, timeouts, limits).
CONFIG_FIELDS = ("image", "backend", "accel", "vcpus", "memory_mib", "cpu", "disk_size_mib", "network",
                 "aslr", "snapshot")
_DIGEST_RE = re.compile(r"[0-9a-f]{24}")
_CHUNK = 1 << 20


def cache_root() -> Path:
    """``<cache>/checkpoints`` (the cache directory is held to the safe-path rule)."""
    root = cache_dir() / "checkpoints"
    root.mkdir(mode=0o700, exist_ok=True)
    return root


def check_key(key: object) -> str:
    """The user's key, checked: 1-64 of ``A-Za-z0-9_.-`` (it names files and CLI arguments)."""
    if not isinstance(key, str) or not NAME_RE.fullmatch(key):
        raise ConfigError(f"invalid prepared-state key {key!r}: expected 1-64 characters of A-Za-z0-9_.- "
                          f"starting with a letter or digit (e.g. 'app-v3')")
    return key


def cache_key(key: str, shape: Mapping[str, Any]) -> str:
    """The entry's digest (pure): the user's key, the checkpoint shape but its RAM naming
    (which depends on how the build VM booted, not on what clones need) and :data:`FORMAT`."""
    fields = {k: v for k, v in shape.items() if k != "ram"}
    blob = json.dumps({"key": key, "shape": fields, "format": FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def config_record(config: VMConfig) -> dict[str, Any]:
    """What a manifest keeps of the build VM's config (JSON-safe)."""
    return {f: getattr(config, f) for f in CONFIG_FIELDS}


def config_from_record(record: Mapping[str, Any]) -> VMConfig:
    """The config a manifest recorded (ConfigError naming the field when it is not valid)."""
    unknown = set(record) - set(CONFIG_FIELDS)
    if unknown:
        raise ConfigError(f"checkpoint manifest has unknown config field(s) {sorted(unknown)}")
    from .config import config_from_layers

    return config_from_layers([("checkpoint manifest", dict(record))])


def local_shape(config: VMConfig, image: images.Image, driver: Driver, ram: str = "") -> dict[str, Any]:
    """This host's checkpoint shape for ``config`` (ConfigError if the backend cannot checkpoint)."""
    if not isinstance(driver, CheckpointDriver):
        raise ConfigError(f"backend {driver.name!r} cannot take checkpoints, so it has no prepared state "
                          f"(use backend='qemu')")
    return dict(driver.checkpoint_shape(config, image, ram))


@dataclasses.dataclass(frozen=True)
class Entry:
    """One cache entry, for ``checkpoint list`` and pruning."""

    digest: str
    path: Path
    manifest: Mapping[str, Any]
    disk_usage: int
    last_used: float
    in_use: bool

    @property
    def key(self) -> str:
        return str(self.manifest.get("key", "?"))


class PreparedStore:
    """The cache of prepared checkpoints under ``root`` (default ``<cache>/checkpoints``)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_root()
        self._held: dict[str, int] = {}  # digest -> fd holding a shared flock on <digest>.use
        self._lock = threading.RLock()

    def path(self, digest: str) -> Path:
        return self.root / digest

    def use_path(self, digest: str) -> Path:
        return self.root / f"{digest}.use"

    # ------------------------------------------------------------- holding

    def hold(self, digest: str) -> None:
        """Hold entry ``digest`` (a shared flock) until :meth:`release_all`: ``prune``/``rm``
        leave it alone. Marks it used now (the LRU stamp)."""
        with self._lock:
            if digest in self._held:
                os.utime(self.use_path(digest))
                return
            while True:
                fd = os.open(self.use_path(digest), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
                fcntl.flock(fd, fcntl.LOCK_SH)  # waits while an rm/prune of it holds LOCK_EX
                try:  # an rm that held it unlinks the file: hold the one now there
                    if os.stat(self.use_path(digest), follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                        break
                except FileNotFoundError:
                    pass
                os.close(fd)
            os.utime(fd)
            self._held[digest] = fd

    def release(self, digest: str) -> None:
        with self._lock:
            fd = self._held.pop(digest, None)
            if fd is not None:
                os.close(fd)

    def release_all(self) -> None:
        with self._lock:
            for digest in list(self._held):
                self.release(digest)

    def in_use(self, digest: str) -> bool:
        """Whether any process (this one included) holds ``digest``."""
        with self._lock:
            if digest in self._held:
                return True
        try:
            fd = os.open(self.use_path(digest), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    # ------------------------------------------------------------- lookup

    def manifest(self, digest: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self.path(digest) / "manifest.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cached checkpoint {self.path(digest)} has an unreadable manifest.json "
                                  f"({exc}); remove it: python -m pytest_smolvm checkpoint rm {digest}") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"cached checkpoint {self.path(digest)} has a malformed manifest.json")
        return data

    def lookup(self, digest: str, config: VMConfig | None = None) -> Checkpoint | None:
        """The entry ``digest``, held and verified (sizes and sha256 of every file against
        its manifest), or None when there is none. A file that differs raises CheckpointError."""
        self.hold(digest)
        try:
            meta = self.manifest(digest)
            if meta is None:
                self.release(digest)
                return None
            cp = checkpoint_from_manifest(self.path(digest), meta, config)
            try:
                cp.verify()
            except CheckpointError as exc:
                raise CheckpointError(f"cached checkpoint {meta.get('key')!r} ({cp.path}) is corrupt or was "
                                      f"tampered with: {exc}; nothing of it was loaded. Remove it with: "
                                      f"python -m pytest_smolvm checkpoint rm {digest}") from None
        except BaseException:
            self.release(digest)
            raise
        return cp

    # ------------------------------------------------------------- build

    def get(self, key: str, setup: Callable[[Any], object], config: VMConfig, *, driver: Driver,
            image: images.Image, start: Callable[[VMConfig], Any]) -> Checkpoint:
        """The entry for ``key`` and ``config``, built with ``setup`` under the entry's
        build lock when there is none. ``start(config)`` returns a started VM."""
        digest = cache_key(key, local_shape(config, image, driver))
        found = self.lookup(digest, config)
        if found is not None:
            return found
        try:
            with FileLock(str(self.root / f"{digest}.lock"), timeout=BUILD_TIMEOUT):
                found = self.lookup(digest, config)  # built while we waited
                if found is None:
                    self._clean_partial(digest)
                    self._build(key, digest, setup, config, image=image, start=start)
                    found = self.lookup(digest, config)
        except Timeout as exc:
            raise CheckpointError(f"another process holds {exc.lock_file} for over {BUILD_TIMEOUT:.0f} s "
                                  f"(building prepared state {key!r})") from exc
        assert found is not None
        self.enforce_cap(keep=digest)
        return found

    def _clean_partial(self, digest: str) -> None:
        """Earlier builds of ``digest`` that died (we hold its build lock: none is running)."""
        for d in self.root.glob(f".build-{digest}-*"):
            shutil.rmtree(d, ignore_errors=True)

    def build_dir(self, digest: str) -> Path:
        tmp = self.root / f".build-{digest}-{os.getpid()}-{threading.get_ident()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        return tmp

    def _build(self, key: str, digest: str, setup: Callable[[Any], object], config: VMConfig, *,
               image: images.Image, start: Callable[[VMConfig], Any]) -> None:
        vm = start(config)
        try:
            setup(vm)
            cp = vm.checkpoint()
            try:
                tmp = self.build_dir(digest)
                try:
                    copy_entry(cp, tmp, image)
                    files = {n: file_record(tmp / n) for n in FILES}
                    manifest = {"format": FORMAT, "key": key, "digest": digest, "created": time.time(),
                                "image_name": config.image, "image_rootfs": str(image.rootfs),
                                "config": config_record(config), "shape": dict(cp.shape),
                                "disk_bytes": cp.disk_bytes, "guest_address": cp.guest_address, "files": files}
                    self.publish(tmp, digest, manifest)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
            finally:
                cp.remove()
        finally:
            vm.close()

    def publish(self, tmp: Path, digest: str, manifest: Mapping[str, Any]) -> None:
        """Write ``manifest.json`` into the complete build ``tmp`` and rename it into place
        (a lost race keeps the entry already there)."""
        with open(tmp / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(tmp, self.path(digest))
        except OSError:
            if not (self.path(digest) / "manifest.json").is_file():
                raise

    # ------------------------------------------------------------- lifecycle

    def entries(self) -> list[Entry]:
        """Every published entry, least recently used first."""
        found: list[Entry] = []
        if not self.root.is_dir():
            return found
        for d in self.root.iterdir():
            if not _DIGEST_RE.fullmatch(d.name) or not d.is_dir() or d.is_symlink():
                continue
            try:
                meta = self.manifest(d.name) or {}
            except CheckpointError:
                meta = {}
            usage = sum(p.stat().st_blocks * 512 for p in d.iterdir() if p.is_file())
            try:
                used = self.use_path(d.name).stat().st_mtime
            except OSError:
                used = d.stat().st_mtime
            found.append(Entry(d.name, d, meta, usage, used, self.in_use(d.name)))
        return sorted(found, key=lambda e: e.last_used)

    def remove(self, digest: str) -> bool:
        """Remove entry ``digest`` unless a process holds it (False then)."""
        use = self.use_path(digest)
        fd = os.open(use, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            trash = self.root / f".trash-{digest}-{os.getpid()}"
            try:
                os.rename(self.path(digest), trash)
            except FileNotFoundError:
                pass
            shutil.rmtree(trash, ignore_errors=True)
            use.unlink(missing_ok=True)
            (self.root / f"{digest}.lock").unlink(missing_ok=True)
            return True
        finally:
            os.close(fd)

    def match(self, key_or_digest: str) -> list[Entry]:
        """Entries whose user key is ``key_or_digest``, or whose digest starts with it."""
        return [e for e in self.entries()
                if e.key == key_or_digest or (len(key_or_digest) >= 6 and e.digest.startswith(key_or_digest))]

    def prune(self, *, older_than_days: float | None = None, orphans_only: bool = False) -> list[Entry]:
        """Remove entries not used for ``older_than_days`` (all if None), or only those whose
        image is gone (``orphans_only``); entries in use stay. Returns the removed ones."""
        cutoff = time.time() - older_than_days * 86400 if older_than_days is not None else None
        removed = []
        for e in self.entries():
            if orphans_only and Path(str(e.manifest.get("image_rootfs", ""))).is_file():
                continue
            if cutoff is not None and e.last_used > cutoff:
                continue
            if self.remove(e.digest):
                removed.append(e)
        self._drop_stale_locks()
        return removed

    def _drop_stale_locks(self) -> None:
        """``<digest>.lock``/``.use`` files of entries that are gone, when no one holds them
        (a waiter on an unlinked lock at worst builds beside another: publish keeps one)."""
        for f in [*self.root.glob("*.lock"), *self.root.glob("*.use")]:
            digest = f.name.rpartition(".")[0]
            if not _DIGEST_RE.fullmatch(digest) or self.path(digest).exists() or self.in_use(digest):
                continue
            try:
                with FileLock(str(self.root / f"{digest}.lock"), timeout=0):
                    f.unlink(missing_ok=True)
                    (self.root / f"{digest}.use").unlink(missing_ok=True)
            except (Timeout, OSError):
                continue

    def enforce_cap(self, keep: str | None = None, max_bytes: int | None = None) -> list[Entry]:
        """Remove least recently used entries (never ``keep`` or one in use) while the cache
        is over ``max_bytes`` (default :func:`max_cache_bytes`)."""
        cap = max_cache_bytes() if max_bytes is None else max_bytes
        entries = self.entries()
        total = sum(e.disk_usage for e in entries)
        removed = []
        for e in entries:
            if total <= cap:
                break
            if e.digest != keep and self.remove(e.digest):
                total -= e.disk_usage
                removed.append(e)
        return removed


def max_cache_bytes() -> int:
    """The cache's size cap: ``SMOLVM_CHECKPOINT_CACHE_MIB`` or :data:`DEFAULT_MAX_MIB`."""
    raw = os.environ.get("SMOLVM_CHECKPOINT_CACHE_MIB", "")
    try:
        mib = int(raw) if raw else DEFAULT_MAX_MIB
    except ValueError:
        raise ConfigError(f"invalid SMOLVM_CHECKPOINT_CACHE_MIB={raw!r}: expected MiB") from None
    return max(mib, 0) * 1024 * 1024


def file_record(path: Path) -> dict[str, Any]:
    from .digest import sha256_file

    return {"size": os.stat(path).st_size, "sha256": sha256_file(path)}


def checkpoint_from_manifest(path: Path, meta: Mapping[str, Any], config: VMConfig | None) -> Checkpoint:
    """The Checkpoint value of a cache entry (``config``: the caller's, else the recorded one)."""
    try:
        files = tuple(FileDigest(n, int(meta["files"][n]["size"]), str(meta["files"][n]["sha256"])) for n in FILES)
        return Checkpoint(name=f"prepared-{meta['key']}", path=path, run_id="cache",
                          config=config or config_from_record(meta["config"]), shape=dict(meta["shape"]),
                          files=files, disk_bytes=int(meta["disk_bytes"]),
                          guest_address=meta.get("guest_address"), cached=True)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"cached checkpoint {path} has a malformed manifest.json "
                              f"(missing or bad {exc})") from None


def copy_entry(cp: Checkpoint, target: Path, image: images.Image) -> None:
    """Copy checkpoint ``cp``'s files into ``target``: RAM sparse, disk rebased onto the
    image's root disk alone (it sat on the run's golden snapshot, which may go)."""
    cp.verify()
    copy_sparse(cp.path / "mem", target / "mem")
    shutil.copyfile(cp.path / "state", target / "state")
    shutil.copyfile(cp.path / "disk.qcow2", target / "disk.qcow2")
    res = subprocess.run(["qemu-img", "rebase", "-q", "-f", "qcow2", "-b", str(image.rootfs), "-F", "raw",
                          str(target / "disk.qcow2")], capture_output=True, text=True)
    if res.returncode != 0:
        raise CheckpointError(f"qemu-img could not rebase the prepared disk onto {image.rootfs}: "
                              f"{res.stderr.strip()}")


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` leaving holes where ``src`` has them or reads zeros."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        write_sparse(iter(lambda: fin.read(_CHUNK), b""), fout)


def write_sparse(chunks: Any, fout: Any) -> int:
    """Write ``chunks`` to ``fout``, seeking over all-zero ones; returns the bytes written."""
    size = 0
    for chunk in chunks:
        if chunk.count(0) == len(chunk):
            fout.seek(len(chunk), os.SEEK_CUR)
        else:
            fout.write(chunk)
        size += len(chunk)
    fout.truncate(size)
    return size


_default: PreparedStore | None = None


def default_store() -> PreparedStore:
    global _default
    if _default is None or _default.root != cache_dir() / "checkpoints":
        _default = PreparedStore()
    return _default


def release_all() -> None:
    """Let go of every entry this process used (session end): ``prune`` may remove them."""
    if _default is not None:
        _default.release_all()


def prepare(key: str, setup: Callable[[Any], object], config: VMConfig | None = None, *,
            driver: Driver | None = None, store: PreparedStore | None = None) -> Checkpoint:
    """A checkpoint of a VM (``config``, default ``VMConfig()``) on which ``setup(vm)`` ran,
    from the cache when a valid one is there (``setup`` does not run then), else built once
    for every process sharing the cache. Start clones with ``SmolVM(checkpoint=cp)``."""
    from .vm import SmolVM

    key = check_key(key)
    config = config or VMConfig()
    if config.volumes:
        raise ConfigError(f"invalid volumes for prepared state {key!r}: a cached checkpoint outlives the run, "
                          f"and volumes are host paths of this run; mount them in the clones instead")
    if not callable(setup):
        raise ConfigError(f"invalid setup={setup!r} for prepared state {key!r}: expected a function of the VM")
    driver = driver or default_driver(config)
    image = images.resolve(config.image)

    def start(cfg: VMConfig) -> SmolVM:
        # A name of its own each build: a run's checkpoint paths are named after the VM.
        return SmolVM(cfg, driver=driver, name=f"prep-{key[:40]}-{secrets.token_hex(3)}").start()

    return (store or default_store()).get(key, setup, config, driver=driver, image=image, start=start)
