"""Find and remove what dead runs left behind (VMM processes, run directories, disks).

Every VM directory is ``<runtime>/<run_id>/<vm>/`` with an ``owner.json`` naming the owning
process (pid + start time, so a reused pid is not mistaken for a live owner) and a
``qemu.pid``. A live owner's resources are never touched, so concurrent runs are safe.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time
from pathlib import Path

from .host import process_alive
from .paths import cache_dir, runtime_dir


@dataclasses.dataclass
class Leftover:
    path: Path
    run_id: str
    vmm_pid: int | None
    kept: bool
    reason: str


def _vmm_pid(vm_dir: Path) -> int | None:
    try:
        pid = int((vm_dir / "qemu.pid").read_text())
    except (OSError, ValueError):
        return None
    try:  # only a process that is really this VM's VMM (its argv names this directory)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if f"{vm_dir}/".encode() in cmdline else None


def find_leftovers(*, include_kept: bool = False, root: Path | None = None) -> list[Leftover]:
    """VM directories whose owner is dead (and kept VMs, if asked)."""
    base = root or runtime_dir()
    found: list[Leftover] = []
    if not base.is_dir():
        return found
    for run_dir in sorted(p for p in base.iterdir() if p.is_dir()):
        for vm_dir in sorted(p for p in run_dir.iterdir() if p.is_dir()):
            kept = (vm_dir / "kept").exists()
            try:
                owner = json.loads((vm_dir / "owner.json").read_text())
            except (OSError, ValueError):
                # No owner stamp yet: a VM being created right now, unless it is old.
                if time.time() - vm_dir.stat().st_mtime < 300:
                    continue
                owner = {}
            if kept:
                if include_kept:
                    found.append(Leftover(vm_dir, run_dir.name, _vmm_pid(vm_dir), True, "kept for inspection"))
                continue
            pid = owner.get("pid")
            if isinstance(pid, int) and process_alive(pid, owner.get("pid_start")):
                continue
            found.append(Leftover(vm_dir, run_dir.name, _vmm_pid(vm_dir), False,
                                  f"owner pid {pid} is gone" if pid else "no owner stamp"))
    return found


def find_partial_snapshots(snapshots_root: Path | None = None) -> list[Leftover]:
    """Snapshot builds (``.build-<key>-<pid>-<thread>``) whose builder process is dead."""
    base = snapshots_root or cache_dir() / "snapshots"
    found: list[Leftover] = []
    if not base.is_dir():
        return found
    for d in base.glob(".build-*"):
        try:
            pid = int(d.name.split("-")[2])
        except (IndexError, ValueError):
            continue
        if not process_alive(pid, None):
            found.append(Leftover(d, "-", None, False, f"snapshot build by dead pid {pid}"))
    return found


def reap(*, include_kept: bool = False, dry_run: bool = False, root: Path | None = None,
         snapshots_root: Path | None = None) -> list[Leftover]:
    """Kill and remove leftovers; returns what was (or, with ``dry_run``, would be) removed."""
    items = find_leftovers(include_kept=include_kept, root=root)
    if root is None or snapshots_root is not None:
        items += find_partial_snapshots(snapshots_root)
    if dry_run:
        return items + (_network_leftovers(dry_run=True) if root is None else [])
    for item in items:
        if item.vmm_pid is not None:
            try:
                os.killpg(item.vmm_pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                try:
                    os.kill(item.vmm_pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(item.path, ignore_errors=True)
        try:
            item.path.parent.rmdir()
        except OSError:
            pass
    if root is None:  # after the VMMs are dead, so their TAPs are gone too
        items += _network_leftovers(dry_run=False)
    return items


def _network_leftovers(*, dry_run: bool) -> list[Leftover]:
    """Run namespaces, uplink tables and slot tables of dead runs (network/hub.py)."""
    from .network.hub import reap_networks

    return [Leftover(Path(s.what), s.run_id, None, False, s.reason) for s in reap_networks(dry_run=dry_run)]
