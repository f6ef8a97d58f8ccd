"""The run a process belongs to, and the VMs it has running.

Every resource the engine creates (VM directories, TAPs, namespaces, nft tables) carries the
run id, so a crashed run's leftovers can be found and reaped (:mod:`.reaper`). The registry of
live VMs is the last line of defence: at interpreter exit, every VM still open is closed.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import threading
import time
import weakref
from pathlib import Path
from typing import Protocol

from .host import host_name, owner_stamp


class Closable(Protocol):
    def close(self) -> None: ...


_live: weakref.WeakSet[Closable] = weakref.WeakSet()
_run_id_lock = threading.Lock()
_run_id: str | None = None


def current_run_id() -> str:
    """The id stamped on every resource this process creates (``SMOLVM_RUN_ID`` or random)."""
    global _run_id
    with _run_id_lock:
        if _run_id is None:
            _run_id = os.environ.get("SMOLVM_RUN_ID") or secrets.token_hex(4)
        return _run_id


def set_run_id(run_id: str) -> None:
    """Use ``run_id`` for resources created from now on (the pytest plugin shares one per run)."""
    global _run_id
    with _run_id_lock:
        _run_id = run_id


def track(vm: Closable) -> None:
    """``vm`` is started: close it at interpreter exit if nobody else does."""
    _live.add(vm)


def untrack(vm: Closable) -> None:
    """``vm`` is closed or handed over (detached)."""
    _live.discard(vm)


def live_vm_count() -> int:
    """VMs of this process that are started and not yet closed."""
    return len(_live)


@atexit.register
def _close_all() -> None:
    """Last line of defence: no VM outlives the interpreter that started it."""
    for vm in list(_live):
        try:
            vm.close()
        except Exception:
            pass


def write_owner(directory: Path, run_id: str, name: str, **extra: object) -> None:
    """``owner.json`` in a VM's (or checkpoint's) directory: the process, host and run that
    own it, so ``reap`` can tell a dead run's leftovers from a live one's."""
    (directory / "owner.json").write_text(json.dumps(
        {**owner_stamp(os.getpid()), "run_id": run_id, "vm": name, "started": time.time(), "host": host_name(),
         **extra}))
