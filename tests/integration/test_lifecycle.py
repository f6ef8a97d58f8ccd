"""Booting, resources, disks, failures and cleanup with real microVMs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REAL_CACHE, qemu_processes

from pytest_smolvm import BootError, GuestDied, ImageError, SmolVM, VMConfig
from pytest_smolvm.drivers.qemu import QemuDriver
from pytest_smolvm.images import resolve
from pytest_smolvm.paths import runtime_dir


def _qemu_procs_with(text: str) -> list[str]:
    return [cmd for cmd in qemu_processes().values() if text in cmd]


@pytest.mark.smolvm(vcpus=2, memory_mib=384)
def test_marker_sets_vcpus_and_memory(smolvm: SmolVM) -> None:
    assert smolvm.run("nproc").stdout.strip() == "2"
    mem_kib = int(smolvm.run("awk '/MemTotal/ {print $2}' /proc/meminfo").stdout)
    assert 300 * 1024 < mem_kib <= 384 * 1024


def test_engine_without_pytest_context_manager_leaves_nothing() -> None:
    with SmolVM(VMConfig()) as vm:
        workdir = vm.workdir
        assert vm.run("echo hi").stdout == "hi\n"
        assert workdir.is_dir() and _qemu_procs_with(str(workdir))
    assert not workdir.exists()
    assert not _qemu_procs_with(str(workdir))
    vm.close()  # idempotent


def test_isolated_disk_changes_never_reach_base_or_next_vm() -> None:
    image = resolve("default")
    before = image.rootfs.stat()
    with SmolVM() as vm:
        vm.run("head -c 20000000 /dev/urandom > /root/big && sync", check=True)
    with SmolVM() as vm:
        assert vm.run("test -e /root/big").exit_code == 1
    after = image.rootfs.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


@pytest.mark.smolvm(disk_size_mib=2048)
def test_disk_size_grows_overlay_and_filesystem(smolvm: SmolVM) -> None:
    size_mib = int(smolvm.run("df -m --output=size / | tail -1").stdout)
    assert size_mib > 1900


def test_disk_size_smaller_than_image_is_refused_before_boot() -> None:
    with pytest.raises(Exception, match="disk_size_mib=100"):
        SmolVM(VMConfig(disk_size_mib=100)).start()


def test_shared_disk_persists_across_vms() -> None:
    marker = f"/root/shared-{os.getpid()}"
    with SmolVM(VMConfig(disk_mode="shared")) as vm:
        vm.run(f"echo kept > {marker} && sync", check=True)
    with SmolVM(VMConfig(disk_mode="shared")) as vm:
        assert vm.run(f"cat {marker}").stdout == "kept\n"
        vm.run(f"rm {marker} && sync", check=True)


def test_retain_disk_on_delete_keeps_the_overlay() -> None:
    with SmolVM(VMConfig(retain_disk_on_delete=True)) as vm:
        vm.run("echo keep > /root/kept && sync", check=True)
    assert vm.disk_path is not None and vm.disk_path.exists()
    assert vm.disk_path.is_relative_to(REAL_CACHE / "retained")
    header = vm.disk_path.read_bytes()[:4]
    vm.disk_path.unlink()
    assert header == b"QFI\xfb"  # a qcow2 overlay


def test_boot_failure_is_boot_error_with_console_tail_and_no_leftovers() -> None:
    vm = SmolVM(VMConfig(boot_timeout=60, snapshot=False), driver=QemuDriver(extra_cmdline=["rdinit=/nonexistent"]))
    with pytest.raises(BootError) as info:
        vm.start()
    assert "Kernel panic" in info.value.console_tail
    assert "guest console" in str(info.value)
    assert not vm.workdir.exists() and not _qemu_procs_with(str(vm.workdir))


def test_missing_image_is_image_error_with_fix() -> None:
    with pytest.raises(ImageError, match="image build"):
        SmolVM(VMConfig(image="no-such-image")).start()


def test_guest_poweroff_mid_command_is_guest_died(smolvm: SmolVM) -> None:
    with pytest.raises(GuestDied) as info:
        smolvm.run("sleep 0.2; echo o > /proc/sysrq-trigger; sleep 30")
    assert "stopped during run" in str(info.value)
    assert not smolvm.alive


def test_guest_kernel_panic_is_guest_died_with_console(smolvm: SmolVM) -> None:
    with pytest.raises(GuestDied) as info:
        smolvm.run("echo c > /proc/sysrq-trigger")
    assert "sysrq" in info.value.console_tail.lower()


def test_two_tests_in_a_row_are_isolated_and_leave_nothing(pytester: pytest.Pytester,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    run_id = f"it{os.getpid():x}"
    monkeypatch.setenv("SMOLVM_RUN_ID", run_id)
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(REAL_CACHE))
    pytester.makepyfile("""
        def test_first(smolvm):
            smolvm.run("echo secret > /root/left-behind", check=True)

        def test_second(smolvm):
            assert smolvm.run("test -e /root/left-behind").exit_code == 1
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    assert not (runtime_dir() / run_id).exists()
    assert not _qemu_procs_with(run_id)


def test_failure_report_and_keep_failed_then_reap(pytester: pytest.Pytester,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    run_id = f"kf{os.getpid():x}"
    monkeypatch.setenv("SMOLVM_RUN_ID", run_id)
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(REAL_CACHE))
    pytester.makepyfile("""
        def test_fails(smolvm):
            smolvm.run("echo evidence")
            assert False
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--smolvm-keep-failed")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*smolvm transcript*", "$ echo evidence*", "*smolvm console*",
                                 "*smolvm-agent: ready*", "*still running. Shell: python -m pytest_smolvm shell*"])
    kept = list((runtime_dir() / run_id).iterdir())
    assert len(kept) == 1 and _qemu_procs_with(run_id)       # alive after pytest exited
    shell = subprocess.run([sys.executable, "-m", "pytest_smolvm", "shell", str(kept[0])],
                           input="echo inside-$((6*7))\n", capture_output=True, text=True, timeout=60)
    assert "inside-42" in shell.stdout
    reap = subprocess.run([sys.executable, "-m", "pytest_smolvm", "reap", "--kept"],
                          capture_output=True, text=True, timeout=60)
    assert run_id in reap.stdout
    assert not (runtime_dir() / run_id).exists() and not _qemu_procs_with(run_id)


def test_header_reports_accelerator_and_why(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(REAL_CACHE))
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    line = next(ln for ln in result.stdout.lines if ln.startswith("smolvm: image"))
    from pytest_smolvm import host

    usable, _ = host.kvm_device_status()
    if "accel kvm" in line:
        assert usable and "canary boot succeeded" in line
    else:
        # An image of another architecture than the host's (scripts/run-arm64) runs under TCG only.
        assert "accel tcg" in line and ("KVM unusable" in line or "requested" in line or " guest on an " in line)


def test_concurrent_runs_never_reap_each_other(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "test_a.py").write_text(
        "def test_long(smolvm):\n"
        "    assert smolvm.run('sleep 12; echo survived', timeout=60).stdout == 'survived\\n'\n")
    (tmp_path / "b" / "test_b.py").write_text("def test_short(smolvm):\n    assert smolvm.run('true').ok\n")
    run_a, run_b = f"ca{os.getpid():x}", f"cb{os.getpid():x}"
    base_env = {**os.environ, "SMOLVM_CACHE_DIR": str(REAL_CACHE)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    a = subprocess.Popen([*cmd, str(tmp_path / "a")], env={**base_env, "SMOLVM_RUN_ID": run_a},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not _qemu_procs_with(run_a):       # A's VM is up
            assert time.monotonic() < deadline and a.poll() is None, "run A never started a VM"
            time.sleep(0.2)
        b = subprocess.run([*cmd, str(tmp_path / "b")], env={**base_env, "SMOLVM_RUN_ID": run_b},
                           capture_output=True, text=True, timeout=300)
        assert b.returncode == 0, b.stdout[-2000:]
        reap = subprocess.run([sys.executable, "-m", "pytest_smolvm", "reap"], env=base_env,
                              capture_output=True, text=True, timeout=60)
        assert run_a not in reap.stdout
        out, _ = a.communicate(timeout=300)
        assert a.returncode == 0, out[-2000:]
    finally:
        if a.poll() is None:
            a.kill()
    assert not _qemu_procs_with(run_a) and not _qemu_procs_with(run_b)


def test_vmm_crash_is_an_infra_error_but_guest_poweroff_is_a_failure(pytester: pytest.Pytester,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(REAL_CACHE))
    pytester.makepyfile("""
        import os, signal

        def test_vmm_crashes(smolvm):
            os.kill(smolvm.pid, signal.SIGSEGV)     # as if QEMU itself crashed
            smolvm.run("true")

        def test_guest_powers_off(smolvm):
            smolvm.run("echo o > /proc/sysrq-trigger; sleep 30")
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(failed=1, errors=1)
    result.stdout.fnmatch_lines(["ERROR (infrastructure)*test_vmm_crashes*",
                                 "FAILED*test_guest_powers_off*"])
    out = result.stdout.str()
    assert "the VMM died (exit status -11): an infrastructure failure" in out
    assert "the guest powered off or panicked" in out
