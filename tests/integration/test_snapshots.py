"""Snapshot clones and the warm pool, with real microVMs."""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path

import pytest
from helpers import REAL_CACHE

from pytest_smolvm import SmolVM, VMConfig, snapshots
from pytest_smolvm.drivers.qemu import QemuDriver
from pytest_smolvm.images import recipe, resolve, store
from pytest_smolvm.pool import VMPool, capacity_allows


@pytest.fixture
def fresh_store(monkeypatch: pytest.MonkeyPatch) -> snapshots.SnapshotStore:
    """A store object that has verified nothing yet (as in a new process)."""
    monkeypatch.setattr(snapshots, "_default", None)
    return snapshots.default_store()


def test_clones_are_unique_and_current() -> None:
    with SmolVM() as a, SmolVM() as b:
        assert (a.boot_mode, b.boot_mode) == ("snapshot", "snapshot")
        probe = "head -c 16 /dev/urandom | od -An -tx1; hostname; cat /etc/machine-id; date +%s.%N"
        outs = []
        for vm in (a, b):
            before = time.time()
            out = vm.run(probe).stdout.split("\n")
            after = time.time()
            assert before - 1 <= float(out[3]) <= after + 1, "guest clock is off by more than 1 s"
            outs.append(out)
        ra, rb = outs
        assert ra[0] != rb[0], "clones drew the same random bytes"
        assert ra[1] != rb[1] and ra[2] != rb[2]


def test_clone_isolation_files_processes_memory() -> None:
    with SmolVM() as a:
        a.run("echo mine > /root/file; echo ram > /dev/shm/blob; "
              "(sleep 1000 > /dev/null 2>&1 &); python3 -c 'open(\"/dev/shm/py\",\"w\").write(\"x\")'", check=True)
        assert a.run("pgrep -x sleep").ok
    with SmolVM() as b:
        assert b.boot_mode == "snapshot"
        assert b.run("test -e /root/file").exit_code == 1          # file state
        assert b.run("pgrep -x sleep").exit_code == 1              # process state
        assert b.run("ls /dev/shm").stdout == ""                   # memory (tmpfs) state


def test_two_live_clones_do_not_see_each_other() -> None:
    with SmolVM() as a, SmolVM() as b:
        a.run("echo from-a > /root/a && sync", check=True)
        assert b.run("test -e /root/a").exit_code == 1
        b.run("echo from-b > /root/b && sync", check=True)
        assert a.run("test -e /root/b").exit_code == 1


def test_snapshot_key_follows_image_and_shape() -> None:
    driver = QemuDriver()
    image = resolve("default")
    base = driver.snapshot_key(VMConfig(), image)
    assert driver.snapshot_key(VMConfig(), image) == base
    assert driver.snapshot_key(VMConfig(), dataclasses.replace(image, digest="0" * 16)) != base
    assert driver.snapshot_key(VMConfig(memory_mib=384), image) != base
    assert driver.snapshot_key(VMConfig(vcpus=2), image) != base
    assert driver.snapshot_key(VMConfig(disk_size_mib=2048), image) != base
    assert driver.snapshot_key(VMConfig(env={"A": "1"}, timeout=5), image) == base  # not guest state


def test_changed_image_gets_a_new_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    driver = QemuDriver()
    old_key = driver.snapshot_key(VMConfig(), resolve("default"))
    monkeypatch.setattr(recipe, "STAGE2_INIT", recipe.STAGE2_INIT + "# changed boot layer\n")
    store._load_cached.cache_clear()
    changed = resolve("default")
    new_key = driver.snapshot_key(VMConfig(), changed)
    try:
        assert new_key != old_key
        with SmolVM() as vm:
            assert vm.boot_mode == "snapshot"
            assert vm.image is not None and vm.image.id == changed.id
        assert snapshots.default_store().path(new_key).is_dir()
    finally:
        snapshots.default_store().discard(new_key)
        changed.initrd.unlink(missing_ok=True)
        store._load_cached.cache_clear()


@pytest.mark.parametrize("victim", ["state", "mem"])
def test_corrupt_snapshot_falls_back_to_cold_boot_with_warning(
    victim: str, fresh_store: snapshots.SnapshotStore
) -> None:
    with SmolVM() as vm:  # make sure the snapshot exists
        assert vm.boot_mode == "snapshot"
    key = QemuDriver().snapshot_key(VMConfig(), resolve("default"))
    path = fresh_store.path(key) / victim
    with open(path, "r+b") as f:  # same size, different bytes
        f.seek(path.stat().st_size // 2)
        f.write(b"\xde\xad\xbe\xef" * 8)
    with pytest.warns(snapshots.SnapshotWarning, match="sha256"):
        vm = SmolVM().start()
    try:
        assert vm.boot_mode == "cold"
        assert vm.run("echo ok").stdout == "ok\n"
    finally:
        vm.close()
    assert not fresh_store.path(key).exists()  # discarded; the next VM rebuilds it
    with warnings.catch_warnings():
        warnings.simplefilter("error", snapshots.SnapshotWarning)
        with SmolVM() as vm:
            assert vm.boot_mode == "snapshot"


def test_no_snapshot_option_cold_boots(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(REAL_CACHE))
    pytester.makepyfile("""
        def test_mode(smolvm):
            assert smolvm.boot_mode == "cold"
    """)
    pytester.runpytest_subprocess("-p", "no:cacheprovider", "--smolvm-no-snapshot",
                                  "--smolvm-pool=0").assert_outcomes(passed=1)


def test_pool_hands_out_warm_vms_and_closes_idle_ones() -> None:
    cfg = VMConfig()
    pool = VMPool(size=1)
    driver = QemuDriver()
    try:
        first = pool.acquire(cfg, driver)
        first.close()
        assert pool.wait_idle(120)
        t0 = time.monotonic()
        vm = pool.acquire(cfg, driver)
        vm.run("true")
        assert pool.stats["hits"] == 1
        assert vm.transcript[0].command == "true"       # the warm-up is not in the transcript
        assert time.monotonic() - t0 < 2.0
        vm.close()
        assert pool.wait_idle(120)
        idle = [v for q in pool._ready.values() for v in q]
        assert len(idle) == 1 and idle[0].alive
    finally:
        pool.close()
    assert not idle[0].alive and not Path(idle[0].workdir).exists()


def test_capacity_governor_refuses_when_memory_is_short(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_smolvm import pool as pool_mod

    monkeypatch.setattr(pool_mod, "mem_available_mib", lambda: 512)
    assert not capacity_allows(256)
    monkeypatch.setattr(pool_mod, "mem_available_mib", lambda: 64 * 1024)
    assert capacity_allows(256)


@pytest.mark.parametrize("cfg", [VMConfig(disk_mode="shared"), VMConfig(retain_disk_on_delete=True)],
                         ids=["shared-disk", "retained-disk"])
def test_pool_never_prestarts_shared_or_retained_disks(cfg: VMConfig) -> None:
    pool = VMPool(size=1)
    try:
        vm = pool.acquire(cfg, QemuDriver())
        disk = vm.disk_path
        vm.close()
        assert pool.wait_idle(30)
        assert pool.stats["prestarted"] == 0
    finally:
        pool.close()
    if cfg.retain_disk_on_delete:
        assert vm.disk_path is not None and vm.disk_path.exists()
        vm.disk_path.unlink()
    assert disk is not None


def test_pool_keeps_spares_only_for_the_latest_shapes() -> None:
    from pytest_smolvm.pool import MAX_SHAPES

    pool = VMPool(size=1)
    driver = QemuDriver()
    shapes = [VMConfig(env={"SHAPE": str(i)}) for i in range(MAX_SHAPES + 1)]  # one snapshot, 3 shapes
    try:
        for cfg in shapes:
            pool.acquire(cfg, driver).close()
            assert pool.wait_idle(120)
        spares = [vm for q in pool._ready.values() for vm in q]
        assert len(spares) == MAX_SHAPES
        assert {vm.config.env["SHAPE"] for vm in spares} == {"1", "2"}
    finally:
        pool.close()
    assert not any(vm.alive for vm in spares)
