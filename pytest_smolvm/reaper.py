"""Find and remove what dead runs left behind (VMM processes, run directories, disks).

Checkpoints (``<runtime>/<run_id>/<vm>.cpN/``, :mod:`~pytest_smolvm.checkpoints`) carry an
``owner.json`` like VM directories and are found and removed the same way.

Every VM directory is ``<runtime>/<run_id>/<vm>/`` with an ``owner.json`` naming the owning
process (pid + start time, so a reused pid is not mistaken for a live owner) and a
``vmm.json`` naming its VMM the same way (older versions: ``qemu.pid`` / ``firecracker.pid``).
A live owner's resources are never touched, so concurrent runs are safe.

The runtime directory sits in ``/tmp``, so nothing in it is taken on trust:

- only real directories (never a symlink) owned by this user and named as the engine names
  runs and VMs (:data:`~pytest_smolvm.paths.NAME_RE`) are looked at, and nothing outside
  the runtime directory is removed;
- a process is signalled only once it is known to be the VM's VMM: by the pid *and* start
  time recorded at spawn, or by its argv (a VMM binary naming the VM's directory) and its
  owner (us, or the user VMMs drop to); psutil re-checks the start time before the signal;
- a VM directory is removed only after its VMMs are verified gone. A VMM killed before its
  pid file was written, or one that outlived its directory, is found by its argv.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import stat
import time
from pathlib import Path
from typing import Any

import psutil

from .drivers.base import vmm_uid
from .drivers.watchdog import VMM_NAMES, owner_uids
from .host import START_TOLERANCE, host_name, process_alive, stamp_alive
from .paths import NAME_RE, cache_dir, runtime_dir

#: Pid files of older versions (pid only, no start time): trusted only with a matching argv.
LEGACY_PID_FILES = ("qemu.pid", "firecracker.pid")
#: A VM directory without ``owner.json`` younger than this is being created right now.
YOUNG_S = 300.0
#: How long a SIGKILLed VMM may take to go before its directory is left in place.
KILL_WAIT = 10.0
_SNAPSHOT_BUILD = re.compile(r"\.build-([0-9a-f]+)-(\d+)-\d+")


@dataclasses.dataclass
class Leftover:
    path: Path
    run_id: str
    vmm_pid: int | None
    kept: bool
    reason: str
    vmms: list[psutil.Process] = dataclasses.field(default_factory=list, repr=False, compare=False)
    #: Set by :func:`reap`: False when a VMM would not die and the directory was kept.
    removed: bool = False


def _vmm_uids() -> set[int]:
    """Whose processes may be our VMMs: ours, and the user VMMs drop to when run as root."""
    return owner_uids(vmm_uid())


def _own_dirs(parent: Path) -> list[Path]:
    """Entries of ``parent`` the reaper may touch: real directories (a symlink never counts),
    owned by this user, named as the engine names runs and VMs."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    found = []
    for entry in entries:
        if not NAME_RE.fullmatch(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
            found.append(Path(entry.path))
    return sorted(found)


def _read_json(path: Path) -> dict[str, Any] | None:
    if path.is_symlink():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _scan_vmms(base: Path, uids: set[int]) -> dict[tuple[str, str], list[psutil.Process]]:
    """Running VMMs of ours whose argv names a VM directory under ``base``: (run, vm) -> processes."""
    name = NAME_RE.pattern
    pattern = re.compile(re.escape(f"{base}/") + f"({name})/({name})/")
    found: dict[tuple[str, str], list[psutil.Process]] = {}
    for proc in psutil.process_iter(["cmdline", "uids"]):
        argv, ids = proc.info.get("cmdline"), proc.info.get("uids")
        if not argv or ids is None or ids.real not in uids or not os.path.basename(argv[0]).startswith(VMM_NAMES):
            continue
        match = next((m for m in map(pattern.search, argv) if m), None)
        if match:
            found.setdefault((match[1], match[2]), []).append(proc)
    return found


def _verified(pid: object, started: object, uids: set[int]) -> psutil.Process | None:
    """The process ``pid`` if it started at ``started`` (a recorded create_time) and is ours."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or not isinstance(started, int | float):
        return None
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - started) > START_TOLERANCE or proc.uids().real not in uids:
            return None
    except psutil.Error:
        return None
    return proc


def _recorded_vmms(vm_dir: Path, uids: set[int]) -> list[psutil.Process]:
    """VMMs the VM directory (and its snapshot template's) names in ``vmm.json`` or a legacy
    pid file, each verified."""
    found = []
    for d in (vm_dir, vm_dir / "template"):
        rec = _read_json(d / "vmm.json")
        if rec is not None and (proc := _verified(rec.get("pid"), rec.get("create_time"), uids)):
            found.append(proc)
        for name in LEGACY_PID_FILES:
            if (d / name).is_symlink():
                continue
            try:
                pid = int((d / name).read_text())
                proc = psutil.Process(pid)
                argv = proc.cmdline()
                ours = proc.uids().real in uids
            except (OSError, ValueError, psutil.Error):
                continue
            if ours and any(f"{vm_dir}/" in a for a in argv):
                found.append(proc)
    return found


def _verdict(vm_dir: Path, include_kept: bool) -> tuple[bool, str] | None:
    """(kept, reason) if ``vm_dir`` is a leftover, None if it must be left alone."""
    kept = (vm_dir / "kept").exists()
    owner = _read_json(vm_dir / "owner.json")
    if owner is None:
        try:
            young = time.time() - vm_dir.lstat().st_mtime < YOUNG_S
        except OSError:
            return None
        if young:  # no owner stamp yet: a VM being created right now
            return None
        owner = {}
    host = owner.get("host")
    if isinstance(host, str) and host != host_name():
        # A runtime directory shared between hosts (which it should never be): another
        # host's pid means nothing here, so its VMs are that host's to judge, never ours.
        return None
    if kept:
        return (True, "kept for inspection") if include_kept else None
    pid = owner.get("pid")
    if stamp_alive(owner):
        return None
    return False, f"owner pid {pid} is gone" if pid else "no owner stamp"


def _dedup(procs: list[psutil.Process]) -> list[psutil.Process]:
    return list({p.pid: p for p in procs}.values())


def find_leftovers(*, include_kept: bool = False, root: Path | None = None) -> list[Leftover]:
    """VM directories whose owner is dead (and kept VMs, if asked), with their VMMs; and VMMs
    of ours that outlived their VM directory."""
    base = root or runtime_dir()
    if not base.is_dir() or base.is_symlink():
        return []
    uids = _vmm_uids()
    running = _scan_vmms(base, uids)
    found: list[Leftover] = []
    for run_dir in _own_dirs(base):
        for vm_dir in _own_dirs(run_dir):
            verdict = _verdict(vm_dir, include_kept)
            if verdict is None:
                continue
            vmms = _dedup(_recorded_vmms(vm_dir, uids) + running.get((run_dir.name, vm_dir.name), []))
            found.append(Leftover(vm_dir, run_dir.name, vmms[0].pid if vmms else None, *verdict, vmms))
    for (run, vm), procs in sorted(running.items()):
        path = base / run / vm
        alive = [p for p in procs if p.is_running()]
        if alive and not os.path.lexists(path):  # its directory was created before it, so it is orphaned
            found.append(Leftover(path, run, alive[0].pid, False,
                                  f"VMM pid {alive[0].pid} outlived its VM directory", alive))
    return found


def find_partial_snapshots(snapshots_root: Path | None = None) -> list[Leftover]:
    """Snapshot builds (``.build-<key>-<pid>-<thread>``) whose builder process is dead and
    whose key's build lock nobody holds. The pid alone is not proof: a builder in another PID
    namespace (a container or simulated host sharing the cache) has a pid that looks dead here.
    """
    base = snapshots_root or cache_dir() / "snapshots"
    found: list[Leftover] = []
    if not base.is_dir():
        return found
    for d in sorted(base.iterdir()):
        m = _SNAPSHOT_BUILD.fullmatch(d.name)
        if (m and d.is_dir() and not d.is_symlink() and not process_alive(int(m[2]), None)
                and not _build_in_progress(base, m[1])):
            what = "checkpoint" if base.name == "checkpoints" else "snapshot"
            found.append(Leftover(d, "-", None, False, f"{what} build by dead pid {m[2]}"))
    return found


def _build_in_progress(base: Path, key: str) -> bool:
    """Whether someone holds the build lock of snapshot ``key`` (or it cannot be checked)."""
    from filelock import FileLock, Timeout

    from .snapshots import build_lock_path

    lock = FileLock(str(build_lock_path(base, key)), timeout=0)
    try:
        with lock:
            return False
    except (Timeout, OSError):
        return True


def _kill(procs: list[psutil.Process]) -> list[psutil.Process]:
    """SIGKILL ``procs`` (and their children) and wait until they are gone; returns those
    still running after :data:`KILL_WAIT`. psutil refuses to signal a reused pid."""
    targets = list(procs)
    for proc in procs:
        try:
            targets += proc.children(recursive=True)
        except psutil.Error:
            pass
    for proc in targets:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    deadline = time.monotonic() + KILL_WAIT
    while True:
        alive = [p for p in targets if _running(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _remove(item: Leftover, base: Path, depth: int) -> None:
    """Kill the leftover's VMMs, then remove its directory (``depth`` levels below ``base``,
    never anywhere else) once they are verified gone."""
    survivors = _kill(item.vmms)
    if survivors:
        item.reason += (f"; VMM pid(s) {', '.join(str(p.pid) for p in survivors)} still running after "
                        f"SIGKILL, directory kept")
        return
    inside = len(item.path.parents) > depth and item.path.parents[depth - 1] == base
    if inside and not item.path.is_symlink() and item.path.is_dir():
        shutil.rmtree(item.path, ignore_errors=True)  # fd-based: never follows a symlink inside
    item.removed = not os.path.lexists(item.path)
    if inside and depth == 2:
        try:
            item.path.parent.rmdir()  # the run directory, once its last VM is gone
        except OSError:
            pass


def reap(*, include_kept: bool = False, dry_run: bool = False, root: Path | None = None,
         snapshots_root: Path | None = None) -> list[Leftover]:
    """Kill and remove leftovers; returns what was (or, with ``dry_run``, would be) removed
    (an item whose VMM would not die says so in ``reason`` and has ``removed`` False)."""
    base = root or runtime_dir()
    items = find_leftovers(include_kept=include_kept, root=base)
    snapshots = find_partial_snapshots(snapshots_root) if root is None or snapshots_root is not None else []
    if root is None and snapshots_root is None:
        # Half-built prepared checkpoints (same naming and build lock as snapshots). Published
        # ones belong to the cache, not to a run: never reaped (checkpoint prune/rm remove them).
        snapshots += find_partial_snapshots(cache_dir() / "checkpoints")
    if dry_run:
        return items + snapshots + (_network_leftovers(dry_run=True) if root is None else [])
    for item in items:
        _remove(item, base, 2)
    for item in snapshots:
        _remove(item, item.path.parent, 1)
    items += snapshots
    if root is None:  # after the VMMs are dead, so their TAPs are gone too
        items += _network_leftovers(dry_run=False)
    return items


def _network_leftovers(*, dry_run: bool) -> list[Leftover]:
    """Run namespaces, uplink tables and slot tables of dead runs (network/hub.py)."""
    from .network.hub import reap_networks

    return [Leftover(Path(s.what), s.run_id, None, False, s.reason, removed=not dry_run)
            for s in reap_networks(dry_run=dry_run)]
