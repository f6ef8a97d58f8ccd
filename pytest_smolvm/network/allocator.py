"""Slot leases shared by every process of a run (xdist workers), guarded by a file lock.

The table is a JSON file in the run's runtime directory. Each lease is stamped with the run
id, the worker, the owner pid and its start time; a lease whose owner is dead is reclaimed
by the next allocation. The lock is always taken with a timeout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from ..errors import NetworkError
from ..host import owner_stamp, stamp_alive

LOCK_TIMEOUT = 10.0
CURSOR = "cursor"  # the table's one non-slot key: where the next search starts


class SharedLock:
    """The run's table lock for every thread of this process, then for every process.

    A thread lock (re-entrant, so a thread holding it may take it again around several table
    operations) is taken before the file lock. filelock before 3.11 shares one lock object's
    state between threads: a second thread "acquired" a lock the first held, so the warm
    pool's thread and the test's thread both created the run namespace (EEXIST, found with
    Debian's filelock 3.9 in the nested KVM host, issue 11). The thread lock makes exclusion
    between threads independent of the filelock version."""

    def __init__(self, path: Path) -> None:
        self.lock_file = str(path)
        self._thread = threading.RLock()
        self._file = FileLock(self.lock_file, timeout=LOCK_TIMEOUT)

    def acquire(self, timeout: float = LOCK_TIMEOUT) -> None:
        """Take both locks or neither; :class:`filelock.Timeout` after ``timeout`` s."""
        if not self._thread.acquire(timeout=timeout):
            raise Timeout(self.lock_file)
        try:
            self._file.acquire(timeout=timeout)
        except BaseException:
            self._thread.release()
            raise

    def release(self) -> None:
        try:
            self._file.release()
        finally:
            self._thread.release()

    def __enter__(self) -> SharedLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_locks: dict[Path, SharedLock] = {}
_locks_guard = threading.Lock()


def shared_lock(path: Path) -> SharedLock:
    """One :class:`SharedLock` per path in this process."""
    with _locks_guard:
        if path not in _locks:
            _locks[path] = SharedLock(path)
        return _locks[path]


@dataclasses.dataclass(frozen=True)
class Lease:
    slot: int
    run_id: str
    worker: str
    vm: str
    pid: int


class SlotTable:
    """Allocate the lowest free slot; release it; reclaim slots of dead owners."""

    def __init__(self, path: Path, run_id: str, slots: int, lock_path: Path | None = None) -> None:
        self.path = path
        self.run_id = run_id
        self.slots = slots
        self.lock = shared_lock(Path(lock_path or str(path) + ".lock"))

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise NetworkError(f"slot table {self.path} is corrupt ({exc}); remove it when no run uses it") from exc
        return data if isinstance(data, dict) else {}

    def _write(self, table: dict[str, dict[str, Any]]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    def lease(self, vm: str, worker: str | None = None, **extra: str) -> Lease:
        """Lease the next free slot after the last one leased, wrapping around (raises
        NetworkError when none is left). A run's VMs therefore get distinct TAPs and subnets
        until the slots wrap, and no VM inherits addresses (or conntrack state) that a VM
        before it used moments ago. ``extra`` is stored with the lease (e.g. the namespace
        the slot's TAP lives in)."""
        worker = worker or os.environ.get("PYTEST_XDIST_WORKER", "main")
        pid = os.getpid()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self.lock:
                table = self._read()
                raw_cursor: Any = table.pop(CURSOR, 0)
                cursor = int(raw_cursor) if isinstance(raw_cursor, int) else 0
                for key, entry in list(table.items()):
                    if not stamp_alive(entry):
                        del table[key]  # its owner died without releasing it
                order = [(cursor + i) % self.slots for i in range(self.slots)]
                slot = next((s for s in order if str(s) not in table), None)
                if slot is None:
                    raise NetworkError(f"all {self.slots} network slots of run {self.run_id} are in use")
                table[str(slot)] = {"run_id": self.run_id, "worker": worker, "vm": vm, **owner_stamp(pid),
                                    "at": time.time(), **extra}
                table[CURSOR] = (slot + 1) % self.slots  # type: ignore[assignment]
                self._write(table)
        except Timeout as exc:
            raise NetworkError(f"could not lock {exc.lock_file} within {LOCK_TIMEOUT:g}s "
                               f"(another process holds it)") from exc
        return Lease(slot, self.run_id, worker, vm, pid)

    def release(self, lease: Lease) -> None:
        """Give ``lease`` back. Idempotent; never releases another owner's slot."""
        try:
            with self.lock:
                table = self._read()
                entry = table.get(str(lease.slot))
                if entry and entry.get("pid") == lease.pid and entry.get("vm") == lease.vm:
                    del table[str(lease.slot)]
                    self._write(table)
        except Timeout as exc:
            raise NetworkError(f"could not lock {exc.lock_file} within {LOCK_TIMEOUT:g}s") from exc

    def leases(self, *, live_only: bool = False) -> dict[int, dict[str, Any]]:
        """The current table (for diagnostics and reaping); ``live_only`` drops leases whose
        owner is dead."""
        with self.lock:
            return {int(k): v for k, v in self._read().items()
                    if k != CURSOR
                    and (not live_only or stamp_alive(v))}
