"""Checkpoints of a prepared VM (vm.checkpoint(), SmolVM(checkpoint=cp)), with real microVMs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import REAL_CACHE, qemu_processes
from nettopo import ALLOWED_HOST, ALLOWED_NET, Internet

from pytest_smolvm import Checkpoint, CheckpointError, ConfigError, SmolVM, VMConfig
from pytest_smolvm.paths import runtime_dir

#: Prepares a guest: files, and a server started in the background that must survive.
PREPARE = ("mkdir -p /srv/www && echo prepared > /srv/www/index.txt && "
           "cd /srv/www && (python3 -m http.server 8000 >/dev/null 2>&1 &) && "
           "for i in $(seq 100); do python3 -c \"import socket; socket.create_connection(('127.0.0.1', 8000))\" "
           "2>/dev/null && exit 0; sleep 0.1; done; exit 1")
FETCH = "python3 -c \"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8000/index.txt').read().decode())\""


@pytest.fixture(scope="module")
def prepared() -> Iterator[tuple[SmolVM, Checkpoint]]:
    with SmolVM(VMConfig(memory_mib=256)) as vm:
        vm.run(PREPARE, check=True, timeout=60)
        cp = vm.checkpoint()
        yield vm, cp
        cp.remove()


def test_clone_sees_prepared_files_and_the_server_still_answers(prepared: tuple[SmolVM, Checkpoint]) -> None:
    vm, cp = prepared
    with SmolVM(checkpoint=cp) as clone:
        assert clone.boot_mode == "checkpoint"
        assert clone.run("cat /srv/www/index.txt").stdout == "prepared\n"
        assert clone.run(FETCH, check=True).stdout == "prepared\n\n"
        ids = [m.run("hostname; cat /etc/machine-id").stdout for m in (vm, clone)]
        assert ids[0] != ids[1] and clone.name in ids[1]
        assert "restored from checkpoint" in clone.console_log


def test_two_clones_writes_never_meet(prepared: tuple[SmolVM, Checkpoint]) -> None:
    _, cp = prepared
    with SmolVM(checkpoint=cp) as a, SmolVM(checkpoint=cp) as b:
        a.run("echo from-a > /srv/www/index.txt && echo a > /root/only-a && sync", check=True)
        b.run("echo b > /root/only-b && sync", check=True)
        assert b.run("cat /srv/www/index.txt").stdout == "prepared\n"
        assert b.run("test -e /root/only-a").exit_code == 1
        assert a.run("test -e /root/only-b").exit_code == 1
        assert a.run(FETCH).stdout == "from-a\n\n" and b.run(FETCH).stdout == "prepared\n\n"
    cp.verify()  # the clones wrote their own overlays, never the checkpoint's layer
    with SmolVM(checkpoint=cp) as c:
        assert c.run("cat /srv/www/index.txt; ls /root").stdout == "prepared\n"


def test_prepared_vm_runs_on_and_its_later_writes_stay_its_own(prepared: tuple[SmolVM, Checkpoint]) -> None:
    vm, cp = prepared
    assert vm.alive and vm.run(FETCH, check=True).stdout == "prepared\n\n"
    vm.run("echo after > /root/after-checkpoint && sync", check=True)
    assert cp.paused_s < cp.taken_s
    with SmolVM(checkpoint=cp) as clone:
        assert clone.run("test -e /root/after-checkpoint").exit_code == 1
    assert vm.run("cat /root/after-checkpoint").stdout == "after\n"


def test_a_second_checkpoint_and_a_changed_file_is_refused(prepared: tuple[SmolVM, Checkpoint]) -> None:
    vm, _ = prepared
    vm.run("echo second > /root/second", check=True)
    cp2 = vm.checkpoint()
    try:
        with SmolVM(checkpoint=cp2) as clone:
            assert clone.run("cat /root/second").stdout == "second\n"
            cp3 = clone.checkpoint()  # a clone of a checkpoint can be checkpointed too
        with SmolVM(checkpoint=cp3) as grandchild:
            assert grandchild.run("cat /root/second /srv/www/index.txt").stdout == "second\nprepared\n"
        cp3.remove()
        with open(cp2.path / "state", "r+b") as f:  # same size, one byte different
            f.seek(4096)
            byte = f.read(1)
            f.seek(4096)
            f.write(bytes([byte[0] ^ 1]))
        before = set(os.listdir(cp2.path.parent))
        with pytest.raises(CheckpointError, match="sha256"):
            SmolVM(checkpoint=cp2).start()
        assert set(os.listdir(cp2.path.parent)) == before  # the refused VM left nothing
    finally:
        cp2.remove()
    assert not cp2.exists and cp2.path.is_dir()  # the prepared VM's disk sits on its layer until it closes
    with pytest.raises(CheckpointError, match="removed"):
        SmolVM(checkpoint=cp2).start()


def test_removing_a_checkpoint_others_sit_on_keeps_what_they_need() -> None:
    vm = SmolVM().start()
    try:
        vm.run("echo 1 > /root/gen", check=True)
        cp1 = vm.checkpoint()
        cp1.remove()  # refused from now on, but the VM's disk sits on its layer
        assert not cp1.exists and cp1.path.is_dir()
        with pytest.raises(CheckpointError, match="was removed"):
            SmolVM(checkpoint=cp1).start()
        vm.run("echo 2 > /root/gen", check=True)
        cp2 = vm.checkpoint()  # its layer names cp1's
        vm.close()
        assert cp1.path.is_dir()  # cp2 still needs it
        with SmolVM(checkpoint=cp2) as clone:
            clone.run("echo 3 > /root/gen", check=True)
            cp3 = clone.checkpoint()
        cp2.remove()
        with SmolVM(checkpoint=cp3) as grandchild:
            assert grandchild.run("cat /root/gen").stdout == "3\n"
        assert cp1.path.is_dir() and cp2.path.is_dir()
        cp3.remove()  # the last one: the whole chain goes
        assert not any(p.path.exists() for p in (cp1, cp2, cp3))
    finally:
        vm.close()


def test_the_warm_pool_prestarts_clones_of_a_checkpoint() -> None:
    from pytest_smolvm.drivers import default_driver
    from pytest_smolvm.pool import VMPool

    with SmolVM() as vm:
        vm.run("echo pooled > /root/p", check=True)
        cp = vm.checkpoint()
    driver = default_driver(cp.config)
    pool = VMPool(size=1)
    try:
        with pool.acquire(cp.config, driver, checkpoint=cp) as first:  # a miss: started now
            assert first.boot_mode == "checkpoint"
        assert pool.wait_idle(120), f"no spare within 120 s: {pool.stats}, errors {list(pool.errors)}"
        with pool.acquire(cp.config, driver, checkpoint=cp) as second:  # the spare
            assert second.run("cat /root/p").stdout == "pooled\n"
        assert pool.stats["hits"] == 1 and not pool.errors
        assert pool.wait_idle(120)
        cp.remove()
        with pytest.raises(CheckpointError, match="was removed"):
            pool.acquire(cp.config, driver, checkpoint=cp)  # the spare is closed, not handed out
        assert not cp.path.exists()  # nothing holds it any more
    finally:
        pool.close()
        cp.remove()


def test_a_running_spawn_refuses_the_checkpoint_until_it_ends() -> None:
    """A spawn()ed process keeps a request open and its output frames may be half-written
    when the guest is paused: a clone's host would read a frame's tail. So checkpoint() wants
    the agent idle, says why, and works once the process is gone."""
    with SmolVM(VMConfig(memory_mib=256)) as vm:
        p = vm.spawn("while true; do echo tick; sleep 0.05; done")
        with pytest.raises(CheckpointError, match=r"needs its agent idle.*spawn"):
            vm.checkpoint()
        assert p.poll() is None  # refused before anything was paused or moved
        p.kill()
        p.wait(timeout=30)
        cp = vm.checkpoint()
        try:
            with SmolVM(checkpoint=cp) as clone:
                assert clone.run("echo ok").stdout == "ok\n"
        finally:
            cp.remove()


def test_shapes_that_cannot_be_restored_are_refused(prepared: tuple[SmolVM, Checkpoint]) -> None:
    _, cp = prepared
    before = set(os.listdir(cp.path.parent))
    with pytest.raises(ConfigError, match=r"memory_mib is 512 for this VM but 256 in the checkpoint"):
        SmolVM(cp.config.replace(memory_mib=512), checkpoint=cp).start()
    with pytest.raises(ConfigError, match="vcpus is 2 for this VM but 1"):
        SmolVM(cp.config.replace(vcpus=2), checkpoint=cp).start()
    with pytest.raises(ConfigError, match="disk_mode='shared'"):
        SmolVM(cp.config.replace(disk_mode="shared"), checkpoint=cp)
    with pytest.raises(ConfigError, match="no network device"):
        SmolVM(cp.config.replace(network="isolated"), checkpoint=cp)
    assert set(os.listdir(cp.path.parent)) == before  # refused before anything was made


def test_cold_booted_vm_checkpoint_keeps_the_machine_ram_name() -> None:
    with SmolVM(VMConfig(snapshot=False)) as vm:
        assert vm.boot_mode == "cold"
        vm.run("echo cold > /root/cold", check=True)
        cp = vm.checkpoint()
        try:
            assert cp.shape["ram"] == "builtin"
            with SmolVM(checkpoint=cp) as clone:
                assert clone.run("cat /root/cold").stdout == "cold\n"
        finally:
            cp.remove()


def test_shared_disk_vm_cannot_be_checkpointed() -> None:
    with SmolVM(VMConfig(disk_mode="shared")) as vm:
        with pytest.raises(ConfigError, match="disk_mode='shared'"):
            vm.checkpoint()
        assert vm.run("true").ok


@pytest.fixture(scope="module")
def internet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Internet]:
    net = Internet.create(tmp_path_factory.mktemp("internet"))
    yield net
    net.destroy()


def test_networked_clone_gets_its_own_lease_and_may_get_another_policy(internet: Internet) -> None:
    fetch_allowed = ["python3", "-c", "import socket, sys; s = socket.socket(); s.settimeout(3); "
                     "print(s.connect_ex((sys.argv[1], 80)))", ALLOWED_HOST]
    with SmolVM(VMConfig(network="isolated", uplink=internet.uplink)) as vm:
        vm.run(PREPARE, check=True, timeout=60)
        cp = vm.checkpoint()
        try:
            with pytest.raises(ConfigError, match="network='none'"):
                SmolVM(cp.config.replace(network="none"), checkpoint=cp)
            with SmolVM(checkpoint=cp) as clone:
                assert clone.network.guest_ip != vm.network.guest_ip
                addrs = clone.run("ip -4 -o addr show | grep -v ' lo '").stdout
                assert clone.network.guest_ip in addrs and str(vm.network.guest_ip) not in addrs
                port = clone.forward(8000)
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.txt", timeout=30) as resp:
                    assert resp.read() == b"prepared\n"
                assert clone.run(fetch_allowed).stdout.strip() != "0"  # isolated: dropped
                assert (ALLOWED_HOST, 80, "tcp") in clone.network.denied
            # Another policy with a NIC is fine (the pytest layer holds it under the ceiling).
            nat_cfg = cp.config.replace(network="nat", allow=(ALLOWED_NET,))
            with SmolVM(nat_cfg, checkpoint=cp) as nat:
                assert nat.run(fetch_allowed).stdout.strip() == "0"  # the allowed network answers
                assert nat.run(FETCH, check=True).stdout == "prepared\n\n"
            assert vm.run(FETCH, check=True).stdout == "prepared\n\n"
        finally:
            cp.remove()


def _procs_of(run_id: str) -> list[str]:
    return [cmd for cmd in qemu_processes().values() if f"/{run_id}/" in cmd]


def test_checkpoints_end_with_the_process_and_reap_removes_a_killed_runs(tmp_path: Path) -> None:
    script = tmp_path / "prep.py"
    script.write_text(textwrap.dedent("""
        from pytest_smolvm import SmolVM, VMConfig
        vm = SmolVM(VMConfig()).start()
        vm.run("echo x > /root/x", check=True)
        cp = vm.checkpoint()
        clone = SmolVM(checkpoint=cp).start()
        print(cp.path, flush=True)
    """))
    suite = tmp_path / "test_killed.py"
    suite.write_text(textwrap.dedent("""
        import time
        import pytest

        @pytest.fixture(scope="session")
        def prepared(smolvm_session):
            smolvm_session.run("echo x > /root/x", check=True)
            return smolvm_session.checkpoint()

        def test_first(prepared, smolvm_factory):
            smolvm_factory(checkpoint=prepared).run("true", check=True)

        def test_killed_here(prepared, smolvm_factory):
            smolvm_factory(checkpoint=prepared)
            print("CHECKPOINT", prepared.path, flush=True)
            time.sleep(600)
    """))
    # The project first, and whatever PYTHONPATH the run had after it (where pytest and the
    # plugin's metadata may live: the nested KVM harness puts them there).
    pythonpath = os.pathsep.join(p for p in (str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "SMOLVM_CACHE_DIR": str(REAL_CACHE), "PYTHONPATH": pythonpath}
    # A normal exit removes the checkpoint (and the VMs).
    run_id = f"cpx{os.getpid():x}"
    done = subprocess.run([sys.executable, str(script)], env={**env, "SMOLVM_RUN_ID": run_id},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not Path(done.stdout.strip()).exists() and not (runtime_dir() / run_id).exists()
    # kill -9 mid-suite leaves it; reap removes it.
    run_id = f"cpk{os.getpid():x}"
    # No warm pool: a spare being created at the instant of the kill has no owner stamp yet,
    # and reap leaves such a young directory alone (it cannot tell it from one being made).
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                             "--smolvm-pool=0", str(suite)], env={**env, "SMOLVM_RUN_ID": run_id},
                            stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert proc.stdout is not None
        line = ""
        while not line.startswith("CHECKPOINT"):
            line = proc.stdout.readline()
            assert line, "the suite ended before it reached the test that is killed"
            line = line[line.find("CHECKPOINT"):] if "CHECKPOINT" in line else line
        path = Path(line.split()[1])
        assert (path / "mem").is_file() and (path / "disk.qcow2").is_file()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert path.exists()
    reap = subprocess.run([sys.executable, "-m", "pytest_smolvm", "reap"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert reap.returncode == 0, reap.stderr[-2000:]
    deadline = time.monotonic() + 10
    while _procs_of(run_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (runtime_dir() / run_id).exists() and not _procs_of(run_id)


def test_a_checkpoint_failing_half_way_leaves_the_vm_running(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_smolvm import BootError, SmolVMError
    from pytest_smolvm.drivers import qemu

    def too_big(path: Path, limit: int, what: str) -> None:
        raise BootError(f"{what} is too big (made to fail by the test)")

    with SmolVM() as vm:
        vm.run("echo x > /root/x", check=True)
        before = set(os.listdir(vm.workdir.parent))
        monkeypatch.setattr(qemu, "_check_size", too_big)
        with pytest.raises(BootError, match="too big"):
            vm.checkpoint()
        assert set(os.listdir(vm.workdir.parent)) == before  # no checkpoint directory left
        assert vm.run("cat /root/x; echo y > /root/y").stdout == "x\n"  # runs on, and writes
        with pytest.raises(SmolVMError, match="cannot take another checkpoint"):
            vm.checkpoint()


def test_factory_clones_a_session_checkpoint_under_the_ceiling(pytester: pytest.Pytester,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    run_id = f"cpf{os.getpid():x}"
    monkeypatch.setenv("SMOLVM_RUN_ID", run_id)
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(REAL_CACHE))
    record = pytester.path / "checkpoint-path"
    pytester.makepyfile(f"""
        import pytest

        @pytest.fixture(scope="session")
        def prepared(smolvm_session):
            smolvm_session.run("echo ready > /root/state", check=True)
            cp = smolvm_session.checkpoint()
            open({str(record)!r}, "w").write(str(cp.path))
            return cp  # not removed here: the plugin removes it at session end

        @pytest.mark.smolvm(memory_mib=512)  # markers do not reshape a clone
        def test_clone(prepared, smolvm_factory):
            vm = smolvm_factory(checkpoint=prepared)
            assert vm.boot_mode == "checkpoint" and vm.config.memory_mib == 256
            assert vm.run("cat /root/state").stdout == "ready\\n"

        def test_over_the_ceiling_is_skipped(prepared, smolvm_factory):
            smolvm_factory(checkpoint=prepared, network="isolated")

        def test_not_a_checkpoint(smolvm_factory):
            smolvm_factory(checkpoint="/tmp/cp")
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs", "--smolvm-network=none",
                                           "--smolvm-memory=256")
    result.assert_outcomes(passed=1, skipped=1, failed=1)
    result.stdout.fnmatch_lines(["*invalid checkpoint='/tmp/cp' for smolvm_factory()*",
                                 "*network='isolated'*caps network policy at 'none'*"])
    path = Path(record.read_text())
    assert path.name.startswith("vm") and not path.exists()
    assert not (runtime_dir() / run_id).exists() and not _procs_of(run_id)
