"""Unit tests of pytest_smolvm.reaper on a fake runtime directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from pytest_smolvm.host import process_alive, process_start_ticks
from pytest_smolvm.reaper import find_leftovers, reap


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "runtime"
    r.mkdir()
    return r


@pytest.fixture(scope="module")
def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    if process_start_ticks(proc.pid) is not None:  # pragma: no cover - reused at once
        pytest.skip("pid of the exited process was reused immediately")
    return proc.pid


def me() -> dict[str, object]:
    return {"pid": os.getpid(), "pid_start": process_start_ticks(os.getpid())}


def make_vm(root: Path, run: str, vm: str, owner: dict[str, object] | str | None = None, *,
            kept: bool = False, qemu_pid: int | None = None) -> Path:
    d = root / run / vm
    d.mkdir(parents=True)
    (d / "console.log").write_text("boot log\n")
    (d / "disk.qcow2").write_bytes(b"QFI\xfb" + bytes(100))
    if isinstance(owner, dict):
        (d / "owner.json").write_text(json.dumps(owner))
    elif isinstance(owner, str):
        (d / "owner.json").write_text(owner)
    if kept:
        (d / "kept").write_text(json.dumps({"pid": 1, "at": time.time()}))
    if qemu_pid is not None:
        (d / "qemu.pid").write_text(str(qemu_pid))
    return d


def make_old(path: Path) -> None:
    old = time.time() - 3600
    os.utime(path, (old, old))


@pytest.fixture
def sleeper() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(5)


def spawn_sleep(procs: list[subprocess.Popen[bytes]], argv0: str | None = None) -> subprocess.Popen[bytes]:
    argv = [argv0 or "sleep", "30"]
    p = subprocess.Popen(argv, executable="/bin/sleep" if argv0 else None, start_new_session=True)
    procs.append(p)
    # Wait until the child has exec'd, so /proc/<pid>/cmdline shows the final argv.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{p.pid}/cmdline").read_bytes().startswith(argv[0].encode()):
                break
        except OSError:
            pass
        time.sleep(0.01)
    return p


# ---------------------------------------------------------------- find_leftovers


def test_missing_root_is_empty(tmp_path: Path) -> None:
    assert find_leftovers(root=tmp_path / "nope") == []
    assert reap(root=tmp_path / "nope") == []


def test_live_owner_not_listed(root: Path) -> None:
    d = make_vm(root, "run1", "vm1", me())
    assert find_leftovers(root=root) == []
    assert reap(root=root) == []
    assert d.is_dir()


def test_live_owner_without_start_time_not_listed(root: Path) -> None:
    make_vm(root, "run1", "vm1", {"pid": os.getpid()})
    assert find_leftovers(root=root) == []


def test_dead_owner_listed_and_reaped(root: Path, dead_pid: int) -> None:
    d = make_vm(root, "run1", "vm1", {"pid": dead_pid, "pid_start": 12345})
    (found,) = find_leftovers(root=root)
    assert found.path == d
    assert found.run_id == "run1"
    assert found.kept is False
    assert found.vmm_pid is None
    assert str(dead_pid) in found.reason
    removed = reap(root=root)
    assert [x.path for x in removed] == [d]
    assert not d.exists()
    assert not (root / "run1").exists()  # the emptied run directory goes too
    assert root.is_dir()
    assert find_leftovers(root=root) == []


def test_reused_pid_is_listed(root: Path) -> None:
    start = process_start_ticks(os.getpid())
    assert start is not None
    d = make_vm(root, "run1", "vm1", {"pid": os.getpid(), "pid_start": start + 1})
    assert [x.path for x in find_leftovers(root=root)] == [d]
    assert not process_alive(os.getpid(), start + 1)


def test_dead_sibling_removed_live_one_kept(root: Path, dead_pid: int) -> None:
    live = make_vm(root, "run1", "vm-live", me())
    dead = make_vm(root, "run1", "vm-dead", {"pid": dead_pid, "pid_start": 1})
    other_run = make_vm(root, "run2", "vm1", {"pid": dead_pid, "pid_start": 1})
    removed = reap(root=root)
    assert sorted(x.path for x in removed) == sorted([dead, other_run])
    assert live.is_dir()
    assert (live / "console.log").read_text() == "boot log\n"
    assert not dead.exists()
    assert (root / "run1").is_dir()
    assert not (root / "run2").exists()


def test_kept_only_with_include_kept(root: Path, dead_pid: int) -> None:
    kept = make_vm(root, "run1", "vm1", {"pid": dead_pid, "pid_start": 1}, kept=True)
    assert find_leftovers(root=root) == []
    assert reap(root=root) == []
    assert kept.is_dir()
    (found,) = find_leftovers(root=root, include_kept=True)
    assert found.path == kept
    assert found.kept is True
    assert "kept" in found.reason
    reap(root=root, include_kept=True)
    assert not kept.exists()


def test_dry_run_removes_nothing(root: Path, dead_pid: int) -> None:
    d = make_vm(root, "run1", "vm1", {"pid": dead_pid, "pid_start": 1})
    k = make_vm(root, "run1", "vm2", {"pid": dead_pid, "pid_start": 1}, kept=True)
    items = reap(root=root, dry_run=True, include_kept=True)
    assert sorted(x.path for x in items) == [d, k]
    assert d.is_dir()
    assert k.is_dir()
    assert (d / "disk.qcow2").exists()


def test_young_dir_without_owner_is_left_alone(root: Path) -> None:
    d = make_vm(root, "run1", "vm1", None)
    assert find_leftovers(root=root) == []
    make_old(d)
    (found,) = find_leftovers(root=root)
    assert found.path == d
    assert "no owner" in found.reason


def test_corrupt_owner_treated_as_missing(root: Path) -> None:
    d = make_vm(root, "run1", "vm1", '{"pid": 12')
    assert find_leftovers(root=root) == []
    make_old(d)
    assert [x.path for x in find_leftovers(root=root)] == [d]


def test_stray_files_ignored(root: Path) -> None:
    (root / "not-a-run").write_text("x")
    (root / "run1").mkdir()
    (root / "run1" / "stray.txt").write_text("x")
    assert find_leftovers(root=root) == []


# ---------------------------------------------------------------- the VMM process


def test_unrelated_qemu_pid_is_never_killed(root: Path, dead_pid: int,
                                            sleeper: list[subprocess.Popen[bytes]]) -> None:
    victim = spawn_sleep(sleeper)
    d = make_vm(root, "run1", "vm1", {"pid": dead_pid, "pid_start": 1}, qemu_pid=victim.pid)
    (found,) = find_leftovers(root=root)
    assert found.vmm_pid is None  # its cmdline does not name the VM directory
    reap(root=root)
    assert not d.exists()
    time.sleep(0.1)
    assert victim.poll() is None, "reap killed a process that is not this VM's VMM"
    victim.kill()
    assert victim.wait(5) == -signal.SIGKILL


def test_own_vmm_is_killed(root: Path, dead_pid: int, sleeper: list[subprocess.Popen[bytes]]) -> None:
    d = root / "run1" / "vm1"
    # A stand-in VMM whose argv names the VM directory, as QEMU's does.
    vmm = spawn_sleep(sleeper, argv0=f"{d}/qemu-system-x86_64")
    make_vm(root, "run1", "vm1", {"pid": dead_pid, "pid_start": 1}, qemu_pid=vmm.pid)
    (found,) = find_leftovers(root=root)
    assert found.vmm_pid == vmm.pid
    reap(root=root)
    assert vmm.wait(5) == -signal.SIGKILL
    assert not d.exists()


def test_vmm_of_live_owner_is_not_killed(root: Path, sleeper: list[subprocess.Popen[bytes]]) -> None:
    d = root / "run1" / "vm1"
    vmm = spawn_sleep(sleeper, argv0=f"{d}/qemu-system-x86_64")
    make_vm(root, "run1", "vm1", me(), qemu_pid=vmm.pid)
    assert reap(root=root) == []
    time.sleep(0.1)
    assert vmm.poll() is None
    assert d.is_dir()


@pytest.mark.parametrize("content", ["", "not a pid", "999999999"])
def test_bad_qemu_pid_file(root: Path, dead_pid: int, content: str) -> None:
    d = make_vm(root, "run1", "vm1", {"pid": dead_pid, "pid_start": 1})
    (d / "qemu.pid").write_text(content)
    (found,) = find_leftovers(root=root)
    assert found.vmm_pid is None
    reap(root=root)
    assert not d.exists()


def test_partial_snapshot_builds_of_dead_processes_are_reaped(tmp_path: Path) -> None:
    import subprocess as sp

    from pytest_smolvm.reaper import find_partial_snapshots, reap

    dead = sp.Popen(["true"])
    dead.wait()
    snaps = tmp_path / "snapshots"
    stale = snaps / f".build-abc123-{dead.pid}-77"
    live = snaps / f".build-abc123-{os.getpid()}-77"
    for d in (stale, live):
        d.mkdir(parents=True)
        (d / "mem").write_bytes(b"x")
    assert [x.path for x in find_partial_snapshots(snaps)] == [stale]
    reap(root=tmp_path / "runtime", snapshots_root=snaps)
    assert not stale.exists() and live.exists()


def test_a_partial_snapshot_build_whose_lock_is_held_is_left_alone(tmp_path: Path) -> None:
    """A builder in another PID namespace (a container or simulated host sharing the cache)
    has a pid that looks dead here; its build lock says it is alive. Reaping by pid alone
    deleted another run's snapshot build mid-way (FileNotFoundError on its state file)."""
    import subprocess as sp

    from filelock import FileLock

    from pytest_smolvm.reaper import find_partial_snapshots, reap
    from pytest_smolvm.snapshots import build_lock_path

    dead = sp.Popen(["true"])
    dead.wait()
    snaps = tmp_path / "snapshots"
    building = snaps / f".build-beef01-{dead.pid}-5"
    building.mkdir(parents=True)
    lock = sp.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                     "l = FileLock(sys.argv[1]); l.acquire(); print('held', flush=True); time.sleep(60)",
                     str(build_lock_path(snaps, "beef01"))], stdout=sp.PIPE, text=True)
    try:
        assert lock.stdout is not None and lock.stdout.readline() == "held\n"
        assert find_partial_snapshots(snaps) == []
        reap(root=tmp_path / "runtime", snapshots_root=snaps)
        assert building.exists()
    finally:
        lock.kill()
        lock.wait()
    assert [x.path for x in find_partial_snapshots(snaps)] == [building]
    assert FileLock(str(build_lock_path(snaps, "beef01")), timeout=0).acquire()


# ---------------------------------------------------------------- issue 10: never follow, never guess


def make_tree(base: Path, n: int = 3) -> list[Path]:
    """Dummy directories that look exactly like dead runs' VMs, with old mtimes."""
    dirs = []
    for name in ("etc", "home", "usr")[:n]:   # like the entries of / (old, no owner.json)
        d = base / name / "sub"
        d.mkdir(parents=True)
        (d / "precious.txt").write_text("do not delete")
        make_old(d)
        make_old(d.parent)
        dirs.append(d)
    return dirs


def test_symlinked_run_dir_is_never_followed(root: Path, tmp_path: Path) -> None:
    # The attack: /tmp/smolvm-0/x -> /  (here: a scratch tree standing in for /).
    scratch = tmp_path / "scratch"
    victims = make_tree(scratch)
    (root / "x").symlink_to(scratch)
    assert find_leftovers(root=root) == []
    reap(root=root)
    assert all((d / "precious.txt").read_text() == "do not delete" for d in victims)


def test_symlinked_vm_dir_is_never_followed(root: Path, tmp_path: Path, dead_pid: int) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "owner.json").write_text(json.dumps({"pid": dead_pid, "pid_start": 1}))
    (scratch / "precious.txt").write_text("keep")
    (root / "run1").mkdir()
    (root / "run1" / "vm1").symlink_to(scratch)
    assert find_leftovers(root=root) == []
    reap(root=root)
    assert (scratch / "precious.txt").read_text() == "keep"
    assert (root / "run1" / "vm1").is_symlink()


@pytest.mark.parametrize(("run", "vm"), [("lost+found", "vm1"), ("run1", ".hidden"), ("run1", "a b"),
                                         (".snapshots", "vm1"), ("run1", "x" * 65)])
def test_entries_not_named_like_ours_are_left_alone(root: Path, dead_pid: int, run: str, vm: str) -> None:
    d = make_vm(root, run, vm, {"pid": dead_pid, "pid_start": 1})
    make_old(d)
    assert find_leftovers(root=root) == []
    reap(root=root)
    assert (d / "disk.qcow2").exists()


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another user needs root")
def test_dirs_of_another_user_are_left_alone(root: Path, dead_pid: int) -> None:
    d = make_vm(root, "run1", "vm1", {"pid": dead_pid, "pid_start": 1})
    os.chown(d, 65534, 65534)
    assert find_leftovers(root=root) == []
    reap(root=root)
    assert (d / "disk.qcow2").exists()


def write_vmm_json(d: Path, pid: int, create_time: float, driver: str = "qemu") -> None:
    (d / "vmm.json").write_text(json.dumps({"pid": pid, "create_time": create_time, "uid": os.getuid(),
                                            "driver": driver}))


def test_vmm_recorded_with_its_start_time_is_killed(root: Path, dead_pid: int,
                                                    sleeper: list[subprocess.Popen[bytes]]) -> None:
    vmm = spawn_sleep(sleeper)   # argv does not name the directory: the record alone identifies it
    d = make_vm(root, "run1", "vm1", {"pid": dead_pid, "pid_start": 1})
    write_vmm_json(d, vmm.pid, psutil.Process(vmm.pid).create_time())
    (found,) = find_leftovers(root=root)
    assert found.vmm_pid == vmm.pid
    reap(root=root)
    assert vmm.wait(5) == -signal.SIGKILL
    assert not d.exists()


def test_recorded_pid_with_another_start_time_is_not_signalled(root: Path, dead_pid: int,
                                                               sleeper: list[subprocess.Popen[bytes]]) -> None:
    other = spawn_sleep(sleeper)   # as if the VMM died and its pid went to this process
    d = make_vm(root, "run1", "vm1", {"pid": dead_pid, "pid_start": 1}, qemu_pid=other.pid)
    write_vmm_json(d, other.pid, psutil.Process(other.pid).create_time() - 30)
    (found,) = find_leftovers(root=root)
    assert found.vmm_pid is None
    reap(root=root)
    time.sleep(0.1)
    assert other.poll() is None
    assert not d.exists()


def test_kept_firecracker_vmm_is_killed_by_reap_kept(root: Path, dead_pid: int,
                                                     sleeper: list[subprocess.Popen[bytes]]) -> None:
    d = root / "run1" / "vm1"
    fc = spawn_sleep(sleeper, argv0=f"{d}/firecracker")
    make_vm(root, "run1", "vm1", {"pid": dead_pid, "pid_start": 1}, kept=True)
    (d / "firecracker.pid").write_text(str(fc.pid))
    assert reap(root=root) == []          # kept VMs only with include_kept
    time.sleep(0.1)
    assert fc.poll() is None
    (found,) = reap(root=root, include_kept=True)
    assert found.vmm_pid == fc.pid
    assert fc.wait(5) == -signal.SIGKILL
    assert not d.exists()


def test_vmm_without_pid_file_is_found_by_its_argv(root: Path, dead_pid: int,
                                                   sleeper: list[subprocess.Popen[bytes]]) -> None:
    # Killed before its pid file existed: only its argv (naming the VM directory) marks it ours.
    d = root / "run1" / "vm1"
    vmm = spawn_sleep(sleeper, argv0=f"{d}/qemu-system-x86_64")
    make_vm(root, "run1", "vm1", {"pid": dead_pid, "pid_start": 1})
    (found,) = find_leftovers(root=root)
    assert found.vmm_pid == vmm.pid
    reap(root=root)
    assert vmm.wait(5) == -signal.SIGKILL
    assert not d.exists()


def test_vmm_that_outlived_its_directory_is_killed(root: Path, sleeper: list[subprocess.Popen[bytes]]) -> None:
    gone = root / "run1" / "vm1"
    vmm = spawn_sleep(sleeper, argv0=f"{gone}/qemu-system-x86_64")
    (found,) = reap(root=root)
    assert (found.path, found.run_id, found.vmm_pid) == (gone, "run1", vmm.pid)
    assert vmm.wait(5) == -signal.SIGKILL


def test_unrelated_process_naming_a_vm_dir_is_not_killed(root: Path, dead_pid: int,
                                                         sleeper: list[subprocess.Popen[bytes]]) -> None:
    d = make_vm(root, "run1", "vm1", {"pid": dead_pid, "pid_start": 1})
    viewer = spawn_sleep(sleeper, argv0=f"{d}/less")   # someone reading a log, not a VMM
    reap(root=root)
    time.sleep(0.1)
    assert viewer.poll() is None


def test_dir_stays_while_its_vmm_survives(root: Path, dead_pid: int, monkeypatch: pytest.MonkeyPatch,
                                          sleeper: list[subprocess.Popen[bytes]]) -> None:
    d = root / "run1" / "vm1"
    vmm = spawn_sleep(sleeper, argv0=f"{d}/qemu-system-x86_64")
    make_vm(root, "run1", "vm1", {"pid": dead_pid, "pid_start": 1})
    monkeypatch.setattr(psutil.Process, "send_signal", lambda self, sig: None)   # as if stuck in D state
    monkeypatch.setattr("pytest_smolvm.reaper.KILL_WAIT", 0.2)
    (item,) = reap(root=root)
    assert "still running" in item.reason
    assert (d / "disk.qcow2").exists()
    assert vmm.poll() is None


# ---------------------------------------------------------------- liveness without /proc


@pytest.fixture
def no_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every /proc read through pathlib fails, as on macOS (psutil still works there)."""
    for method in ("read_text", "read_bytes"):
        real = getattr(Path, method)

        def fake(self: Path, *a: object, _real: object = real, **kw: object) -> object:
            if str(self).startswith("/proc"):
                raise FileNotFoundError(str(self))
            return _real(self, *a, **kw)  # type: ignore[operator]

        monkeypatch.setattr(Path, method, fake)


@pytest.mark.usefixtures("no_proc")
def test_live_owner_is_alive_without_proc(root: Path) -> None:
    assert process_alive(os.getpid(), None)
    d = make_vm(root, "run1", "vm1", {"pid": os.getpid(), "pid_start": psutil.Process().create_time()})
    assert find_leftovers(root=root) == []
    assert reap(root=root) == []
    assert d.is_dir()


@pytest.mark.usefixtures("no_proc")
def test_dead_owner_is_dead_without_proc(root: Path, dead_pid: int) -> None:
    d = make_vm(root, "run1", "vm1", {"pid": os.getpid(), "pid_start": psutil.Process().create_time() - 5})
    e = make_vm(root, "run1", "vm2", {"pid": dead_pid, "pid_start": 1.5})
    assert sorted(x.path for x in find_leftovers(root=root)) == [d, e]


def test_vm_of_another_host_is_never_judged(root: Path, dead_pid: int) -> None:
    """A runtime directory shared between hosts (NFS, a mistake) must not let one host reap
    another's live VMs: a pid recorded elsewhere means nothing here."""
    from pytest_smolvm.host import host_name

    elsewhere = make_vm(root, "run1", "vm-a", {"pid": dead_pid, "pid_start": 1, "host": host_name() + "-other"})
    here = make_vm(root, "run1", "vm-b", {"pid": dead_pid, "pid_start": 1, "host": host_name()})
    found = {item.path for item in find_leftovers(root=root)}
    assert found == {here}
    reap(root=root)
    assert elsewhere.is_dir() and not here.exists()
