"""Golden snapshots: one booted guest saved per VM shape, restored as copy-on-write clones.

A snapshot directory holds ``mem`` (guest RAM, mapped privately by every clone), ``state``
(device state, ~60 KB), ``disk.qcow2`` (the disk as the snapshot saw it; every clone
overlays it) and ``meta.json`` (sizes and sha256 of each). It is built once under a file
lock, so xdist workers build it once, published by an atomic rename, and never changed
afterwards. Its key comes from the driver and covers everything that shapes guest RAM and
device state (image, QEMU version, argv shape), so a changed image gets a new snapshot.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout

from .digest import sha256_file
from .errors import SmolVMError
from .paths import cache_dir

#: The snapshot's disk: a qcow2 overlay (QEMU) or a raw copy (Firecracker has no qcow2).
DISK_FILES = ("disk.qcow2", "disk.ext4")


def _files(d: Path) -> tuple[str, ...]:
    """The files of snapshot directory ``d``: RAM, device state and whichever disk it has."""
    disk = next((n for n in DISK_FILES if (d / n).exists()), DISK_FILES[0])
    return ("mem", "state", disk)


def build_lock_path(root: Path, key: str) -> Path:
    """The file lock held while the snapshot ``key`` under ``root`` is built: the builder's
    proof of life, which the reaper trusts over a pid (pids differ between PID namespaces)."""
    return root / f"{key}.lock"


class SnapshotError(SmolVMError):
    """A snapshot is missing, corrupt or could not be built (callers fall back to cold boot)."""


class SnapshotWarning(UserWarning):
    """A VM was cold-booted because its snapshot could not be used; the message says why."""


class SnapshotStore:
    """Snapshots under ``<cache>/snapshots/<key>``."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_dir() / "snapshots"
        self._verified: set[tuple[object, ...]] = set()
        self._lock = threading.Lock()

    def path(self, key: str) -> Path:
        return self.root / key

    def lookup(self, key: str) -> Path | None:
        """The snapshot for ``key`` if it exists; raises SnapshotError if it is corrupt.

        Sizes are checked every time; contents (sha256) once per process for each version of
        the files (a file written since it was verified is verified again).
        """
        d = self.path(key)
        try:
            meta = json.loads((d / "meta.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"snapshot {d} has an unreadable meta.json: {exc}") from exc
        names = _files(d)
        for name in names:
            try:
                size = (d / name).stat().st_size
            except OSError:
                raise SnapshotError(f"snapshot {d} is missing {name}") from None
            if size != meta["files"][name]["size"]:
                raise SnapshotError(f"snapshot file {d / name} has {size} bytes, expected "
                                    f"{meta['files'][name]['size']}")
        stamp = (key, *((st.st_size, st.st_mtime_ns) for st in (os.stat(d / n) for n in names)))
        with self._lock:
            if stamp not in self._verified:
                for name in names:
                    try:
                        digest = sha256_file(d / name)
                    except OSError as exc:  # discarded by another process while we read it
                        raise SnapshotError(f"snapshot {d} changed while it was verified: {exc}") from None
                    if digest != meta["files"][name]["sha256"]:
                        raise SnapshotError(f"snapshot file {d / name} does not match its sha256 (corrupt)")
                self._verified.add(stamp)
        return d

    def create(self, key: str, build: Callable[[Path], None]) -> Path:
        """Return the snapshot for ``key``, building it with ``build(target_dir)`` if needed."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(str(build_lock_path(self.root, key)), timeout=600):
                existing = self.lookup(key)
                if existing is not None:
                    return existing
                tmp = self.root / f".build-{key}-{os.getpid()}-{threading.get_ident()}"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                try:
                    build(tmp)
                    files = {n: {"size": (tmp / n).stat().st_size, "sha256": sha256_file(tmp / n)} for n in _files(tmp)}
                    (tmp / "meta.json").write_text(json.dumps({"key": key, "created": time.time(),
                                                               "files": files}, indent=2))
                    os.rename(tmp, self.path(key))
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
        except Timeout as exc:
            raise SnapshotError(f"another process holds {exc.lock_file} for over 10 minutes") from exc
        found = self.lookup(key)
        assert found is not None
        return found

    def discard(self, key: str) -> None:
        """Remove a snapshot (e.g. found corrupt); the next VM rebuilds it."""
        shutil.rmtree(self.path(key), ignore_errors=True)

    def prune(self) -> int:
        """Remove every snapshot; they are rebuilt on demand. Returns how many were removed."""
        if not self.root.is_dir():
            return 0
        n = 0
        for d in self.root.iterdir():
            if d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
                n += 1
        return n


_default: SnapshotStore | None = None


def default_store() -> SnapshotStore:
    global _default
    if _default is None or _default.root != cache_dir() / "snapshots":
        _default = SnapshotStore()
    return _default
