"""Prepared state that lasts (smolvm_prepared, prepared.prepare, checkpoint CLI), with real
microVMs: built once across xdist workers and concurrent runs, reused by later runs, moved
by export/import, refused when tampered with, and never removed under a live user."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import REAL_CACHE, qemu_processes

from pytest_smolvm import CheckpointError, SmolVM, VMConfig
from pytest_smolvm.cli import main as cli
from pytest_smolvm.prepared import PreparedStore, default_store, prepare, release_all

REPO = Path(__file__).resolve().parents[2]
#: These tests prune and remove entries of the shared cache (never held ones): under
#: ``--dist loadgroup`` they run in one worker, one after another.
pytestmark = pytest.mark.xdist_group("smolvm-prepared-cache")


@pytest.fixture
def key() -> Iterator[str]:
    """A key of this test alone; its cache entries are removed afterwards."""
    k = f"t-{uuid.uuid4().hex[:12]}"
    yield k
    release_all()
    store = default_store()
    for e in store.match(k):
        assert store.remove(e.digest), f"{e.path} still held after the test"


def _never(vm: SmolVM) -> None:
    raise AssertionError("setup ran although a cached checkpoint was there")


def _setup(vm: SmolVM) -> None:
    vm.run("echo prepared > /root/state && sync", check=True)


def _env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(REAL_CACHE))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


SUITE = """
    import os, pytest

    def install(vm):
        vm.run("echo prepared-$RANDOM > /root/state && sync", check=True)
        with open({marker!r}, "a") as f:  # on the host: one line per setup that ran
            f.write(f"{{os.getpid()}}\\n")

    @pytest.fixture(scope="session")
    def app(smolvm_prepared):
        return smolvm_prepared(os.environ["PREP_KEY"], setup=install)

    @pytest.mark.parametrize("n", range(2))
    def test_clone(app, smolvm_factory, n):
        vm = smolvm_factory(checkpoint=app)
        assert vm.boot_mode == "checkpoint"
        assert vm.run("cat /root/state").stdout.startswith("prepared-")
        vm.run("echo changed > /root/state", check=True)  # a clone's writes stay its own
"""


def test_built_once_across_workers_and_runs_rebuilt_for_a_new_key(pytester: pytest.Pytester,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   key: str) -> None:
    marker = pytester.path / "setups"
    pytester.makepyfile(textwrap.dedent(SUITE.format(marker=str(marker))))
    env = _env(monkeypatch)
    monkeypatch.setenv("PREP_KEY", key)
    args = ("-p", "no:cacheprovider", "--smolvm-network=none", "--smolvm-memory=256")
    run1 = pytester.runpytest_subprocess(*args, "-n", "2")
    run1.assert_outcomes(passed=2)
    assert len(marker.read_text().splitlines()) == 1  # two workers, one setup
    run2 = pytester.runpytest_subprocess(*args, "-n", "0")
    run2.assert_outcomes(passed=2)
    assert len(marker.read_text().splitlines()) == 1  # run 2 reuses: setup never ran
    # A changed key builds anew, once, though two pytest runs ask for it at the same time.
    key2 = f"{key}-b"
    procs = [subprocess.Popen([sys.executable, "-m", "pytest", *args, "-q"], cwd=pytester.path,
                              env={**env, "PREP_KEY": key2}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert len(marker.read_text().splitlines()) == 2
    release_all()
    store = default_store()
    assert [len(store.match(k)) for k in (key, key2)] == [1, 1]
    for e in store.match(key2):
        assert store.remove(e.digest)


def _rewrite(src: Path, dst: Path, change: dict[str, object]) -> None:
    """``src`` with its manifest's shape fields changed (everything else as it was)."""
    with tarfile.open(src, "r:gz") as tin, tarfile.open(dst, "w:gz", compresslevel=1) as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()  # type: ignore[union-attr]
            if m.name == "manifest.json":
                meta = json.loads(data)
                meta["shape"].update(change)
                data = json.dumps(meta).encode()
                m.size = len(data)
            tout.addfile(m, io.BytesIO(data))


def test_export_rm_import_reuse_and_refusals(tmp_path_factory: pytest.TempPathFactory, key: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = Path(REAL_CACHE) / f"export-{key}.tgz"  # our cache: never a path in /tmp we trust
    try:
        cp = prepare(key, _setup, VMConfig(memory_mib=256))
        with pytest.raises(CheckpointError, match=r"belongs to the prepared-state cache.*checkpoint rm"):
            cp.remove()  # the cache owns it, not this run
        assert cli(["checkpoint", "export", key, str(out)]) == 0
        assert out.stat().st_size < 64 << 20  # the sparse RAM file stays small
        release_all()
        assert cli(["checkpoint", "rm", key]) == 0 and not cp.path.exists()
        assert cli(["checkpoint", "import", str(out)]) == 0
        again = prepare(key, _never, VMConfig(memory_mib=256))
        assert again.path == cp.path
        with SmolVM(checkpoint=again) as clone:
            assert clone.run("cat /root/state").stdout == "prepared\n"
        release_all()
        assert cli(["checkpoint", "rm", key]) == 0
        capsys.readouterr()
        bad = out.with_name(f"flipped-{key}.tgz")
        data = bytearray(out.read_bytes())
        data[len(data) // 2] ^= 1
        bad.write_bytes(bytes(data))
        assert cli(["checkpoint", "import", str(bad)]) == 1
        assert "not imported" in capsys.readouterr().err
        for change, field in (({"image": "0123abcd-ffff"}, "image"), ({"qemu": "1.0.0"}, "qemu")):
            bad.unlink()
            _rewrite(out, bad, change)
            assert cli(["checkpoint", "import", str(bad)]) == 1
            assert f"field {field!r}" in capsys.readouterr().err
        assert default_store().match(key) == []  # nothing refused was published
    finally:
        for f in Path(REAL_CACHE).glob(f"*-{key}.tgz"):
            f.unlink()


def test_tampered_entry_is_refused_before_qemu_reads_it(key: str) -> None:
    cp = prepare(key, _setup, VMConfig(memory_mib=256))
    release_all()
    with open(cp.path / "state", "r+b") as f:
        b = f.read(1)
        f.seek(0)
        f.write(bytes([b[0] ^ 1]))
    before = qemu_processes()
    with pytest.raises(CheckpointError, match=r"corrupt or was tampered with.*checkpoint rm"):
        prepare(key, _never, VMConfig(memory_mib=256))
    assert set(qemu_processes()) <= set(before)


def test_kill_during_build_leaves_nothing_used_and_live_users_are_left_alone(
        tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    env = _env(monkeypatch)
    started = Path(REAL_CACHE) / f"started-{key}"
    script = textwrap.dedent(f"""
        import time
        from pytest_smolvm.prepared import prepare
        def setup(vm):
            vm.run("echo half > /root/state", check=True)
            open({str(started)!r}, "w").close()
            time.sleep(300)
        prepare({key!r}, setup)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert started.exists(), "the build never reached its setup"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        started.unlink(missing_ok=True)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    store = default_store()
    assert store.match(key) == []  # nothing published
    fake = store.root / f".build-{'0' * 24}-{2**22 + 7}-1"  # a half-written build of a dead pid
    fake.mkdir()
    (fake / "mem").write_bytes(b"half")
    subprocess.run([sys.executable, "-m", "pytest_smolvm", "reap"], env=env, check=True, capture_output=True)
    assert not fake.exists()
    (store.root / f"{'0' * 24}.lock").unlink(missing_ok=True)  # the reaper's probe of its build lock
    cp = prepare(key, _setup, VMConfig(memory_mib=256))  # the next run builds it afresh
    with SmolVM(checkpoint=cp) as clone:
        assert clone.run("cat /root/state").stdout == "prepared\n"
        for argv in (["checkpoint", "prune"], ["reap"], ["checkpoint", "rm", key]):
            subprocess.run([sys.executable, "-m", "pytest_smolvm", *argv], env=env, capture_output=True)
        assert cp.path.is_dir() and store.match(key)[0].in_use
        assert clone.run("cat /root/state").stdout == "prepared\n"
    release_all()
    res = subprocess.run([sys.executable, "-m", "pytest_smolvm", "checkpoint", "rm", key],
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0 and not cp.path.exists()  # once no one holds it


def test_cache_cap_and_image_prune_leave_the_held_and_take_the_rest(key: str) -> None:
    root = Path(REAL_CACHE) / f"checkpoints-{key}"  # a store of its own: the cap removes all it may
    root.mkdir(mode=0o700)
    try:
        _cap_and_orphans(PreparedStore(root), key)
    finally:
        PreparedStore(root).release_all()
        shutil.rmtree(root)


def _cap_and_orphans(store: PreparedStore, key: str) -> None:
    cp = prepare(key, _setup, VMConfig(memory_mib=256), store=store)
    assert store.enforce_cap(max_bytes=0) == [] and cp.path.is_dir()  # held by this process
    # image prune's part: entries whose image is gone (here: their manifest says it moved away)
    meta = json.loads((cp.path / "manifest.json").read_text())
    (cp.path / "manifest.json").write_text(json.dumps({**meta, "image_rootfs": "/nonexistent/rootfs.img"}))
    assert key not in [e.key for e in store.prune(orphans_only=True)] and cp.path.is_dir()  # held
    store.release_all()
    (cp.path / "manifest.json").write_text(json.dumps(meta))
    assert key not in [e.key for e in store.prune(orphans_only=True)]  # its image is there
    assert [e.key for e in store.enforce_cap(max_bytes=0, keep=None) if e.key == key] == [key]
    assert not cp.path.exists() and isinstance(store, PreparedStore)
    again = prepare(key, _setup, VMConfig(memory_mib=256), store=store)
    (again.path / "manifest.json").write_text(json.dumps({**meta, "image_rootfs": "/nonexistent/rootfs.img"}))
    store.release_all()
    assert [e.key for e in store.prune(orphans_only=True) if e.key == key] == [key]
