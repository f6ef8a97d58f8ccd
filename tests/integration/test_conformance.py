"""The driver contract: every driver runs through this module, with real VMs.

Parametrized over driver factories: ``qemu-tcg`` runs everywhere QEMU does; ``qemu-kvm``
needs a KVM that boots Linux (canary), ``qemu-hvf`` a Mac with Hypervisor.framework, and
``firecracker`` the binary, a working KVM and a guest that serves the agent over vsock.
Where a backend cannot run, its tests are skipped with a reason naming what is missing
(and marked ``smolvm_optional``, so ``SMOLVM_REQUIRE_VMS=1`` accepts the skip).

Covered per driver: boot, run, timeout (and the VM still answers), put/get, disk isolation,
teardown (no VMM process or file left), VMM crash mid-call (GuestDied, infra).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import processes, qemu_processes

from pytest_smolvm import CommandTimeout, GuestDied, SmolVM, VMConfig, host
from pytest_smolvm.drivers import Driver, firecracker_status
from pytest_smolvm.errors import SmolVMError
from pytest_smolvm.images import resolve


@dataclasses.dataclass
class Backend:
    """A driver under test, the accelerator it must report, and the config every VM uses."""

    id: str
    driver: Driver
    accel: str

    def config(self, **changes: object) -> VMConfig:
        return VMConfig(accel=self.accel, backend=self.driver.name, **changes)  # type: ignore[arg-type]


def _qemu_tcg() -> Backend:
    from pytest_smolvm.drivers.qemu import QemuDriver

    if host.qemu_binary() is None:
        pytest.skip("qemu-tcg: qemu-system-x86_64 is not installed (apt-get install -y qemu-system-x86 qemu-utils)")
    return Backend("qemu-tcg", QemuDriver(), "tcg")


def _qemu_kvm() -> Backend:
    from pytest_smolvm.drivers.accel import kvm_canary
    from pytest_smolvm.drivers.qemu import QemuDriver

    qemu = host.qemu_binary()
    if qemu is None:
        pytest.skip("qemu-kvm: qemu-system-x86_64 is not installed")
    usable, why = host.kvm_device_status()
    if not usable:
        pytest.skip(f"qemu-kvm: {why}")
    ok, reason = kvm_canary(qemu, resolve("default"))
    if not ok:
        pytest.skip(f"qemu-kvm: /dev/kvm present ({host.kvm_module()}) but the canary failed: {reason}")
    return Backend("qemu-kvm", QemuDriver(), "kvm")


def _qemu_hvf() -> Backend:
    if not host.is_macos():
        pytest.skip(f"qemu-hvf: HVF needs a macOS host; this host is {os.uname().sysname}")
    ok, why = host.hvf_status()
    if not ok:
        pytest.skip(f"qemu-hvf: {why}")
    from pytest_smolvm.drivers.hvf import HvfQemuDriver

    return Backend("qemu-hvf", HvfQemuDriver(), "hvf")


def _firecracker() -> Backend:
    from pytest_smolvm.drivers.firecracker import FirecrackerDriver, guest_vsock_support

    if host.firecracker_binary() is None:
        pytest.skip("firecracker: the firecracker binary is not on PATH")
    ok, why = firecracker_status()
    if not ok:
        pytest.skip(f"firecracker: {why}")
    ok, why = guest_vsock_support("default")
    if not ok:
        pytest.skip(f"firecracker: {why}")
    return Backend("firecracker", FirecrackerDriver(), "kvm")


OPTIONAL = pytest.mark.smolvm_optional("needs hardware or a binary this host may lack")
FACTORIES = [
    pytest.param(_qemu_tcg, id="qemu-tcg"),
    pytest.param(_qemu_kvm, id="qemu-kvm", marks=OPTIONAL),
    pytest.param(_qemu_hvf, id="qemu-hvf", marks=OPTIONAL),
    pytest.param(_firecracker, id="firecracker", marks=OPTIONAL),
]


@pytest.fixture(scope="module", params=FACTORIES)
def backend(request: pytest.FixtureRequest) -> Backend:
    factory: Callable[[], Backend] = request.param
    return factory()


@pytest.fixture(scope="module")
def vm(backend: Backend) -> Iterator[SmolVM]:
    """One VM per backend for the calls that do not end it."""
    with SmolVM(backend.config(), driver=backend.driver) as v:
        yield v


def assert_gone(v: SmolVM, pid: int) -> None:
    assert not v.workdir.exists(), f"{v.workdir} left behind"
    assert not processes(str(v.workdir)), "a VMM process of the closed VM still runs"
    assert not [c for c in qemu_processes().values() if str(v.workdir) in c]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped, not a zombie


def test_boot_cold_and_teardown(backend: Backend) -> None:
    v = SmolVM(backend.config(snapshot=False), driver=backend.driver)
    with v:
        assert v.boot_mode == "cold"
        assert v.accel is not None and v.accel.name == backend.accel and v.accel.reason
        assert v.run("echo booted").stdout == "booted\n"
        pid = v.pid
        assert pid is not None and v.alive
        assert processes(str(v.workdir))
    assert_gone(v, pid)
    v.close()  # idempotent
    assert "smolvm-init" in v.console_log


def test_run(vm: SmolVM, backend: Backend) -> None:
    r = vm.run("echo out; echo err >&2; exit 3")
    assert (r.exit_code, r.stdout, r.stderr) == (3, "out\n", "err\n")
    r = vm.run(["python3", "-c", "import sys; print(sys.argv[1:])", "a b", "c"], env={"K": "v"})
    assert r.ok and r.stdout == "['a b', 'c']\n"
    assert vm.run("echo $K", env={"K": "v"}).stdout == "v\n"
    assert vm.run(["nonexistent-command"]).exit_code == 127


def test_timeout_then_the_vm_still_answers(vm: SmolVM) -> None:
    with pytest.raises(CommandTimeout) as info:
        vm.run("echo started; sleep 60", timeout=1.5)
    assert info.value.stdout == "started\n" and not info.value.infra
    assert vm.run("echo alive", timeout=30).stdout == "alive\n"
    assert vm.run("pgrep -x sleep").exit_code == 1  # the timed-out process group is gone


def test_put_get(vm: SmolVM, tmp_path: Path) -> None:
    blob = bytes(range(256)) * 4096 + b"\0end"
    vm.put(blob, "/root/conf/dir/blob.bin", mode=0o600)
    assert vm.get("/root/conf/dir/blob.bin") == blob
    assert vm.run("stat -c %a /root/conf/dir/blob.bin").stdout == "600\n"
    local = tmp_path / "local.txt"
    local.write_text("from a file\n")
    vm.put(local, "/tmp/local.txt")
    assert vm.run("cat /tmp/local.txt").stdout == "from a file\n"
    with pytest.raises(SmolVMError, match="nope"):
        vm.get("/nope/missing")


def test_disk_isolation(vm: SmolVM, backend: Backend) -> None:
    marker = f"/root/conformance-{backend.id}-{os.getpid()}"
    vm.run(f"echo written > {marker} && sync", check=True)
    assert vm.run(f"cat {marker}").stdout == "written\n"
    with SmolVM(backend.config(), driver=backend.driver) as other:
        assert other.run(f"test -e {marker}").exit_code == 1
        other.run("echo other > /root/from-other && sync", check=True)
    assert vm.run("test -e /root/from-other").exit_code == 1
    assert other.disk_path != vm.disk_path


def test_vmm_crash_mid_call_is_guest_died_infra(backend: Backend) -> None:
    v = SmolVM(backend.config(), driver=backend.driver)
    with v:
        pid = v.pid
        assert pid is not None
        v.run("true")
        killer = threading.Timer(1.0, os.kill, (pid, signal.SIGKILL))
        killer.start()
        try:
            with pytest.raises(GuestDied) as info:
                v.run("sleep 30", timeout=60)
        finally:
            killer.cancel()
        assert info.value.infra, "a VMM killed from outside is an infrastructure failure"
        assert "VMM died" in str(info.value)
        with pytest.raises(SmolVMError):
            v.run("true")  # and it stays dead
    assert_gone(v, pid)
