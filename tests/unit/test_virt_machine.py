"""The guest's architecture follows the image (issue 22): an arm64 image boots
``qemu-system-aarch64 -M virt`` from the same QEMU driver (TCG on another architecture's host,
KVM on arm64 Linux), and a checkpoint of it names virt's own RAM block (bug 6), with QEMU's
error text reaching the caller on every restore failure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pytest_smolvm.config import VMConfig
from pytest_smolvm.drivers import accel as accel_probe
from pytest_smolvm.drivers import qemu, virt
from pytest_smolvm.drivers.accel import canary_argv, choose_accel
from pytest_smolvm.drivers.base import Accel
from pytest_smolvm.errors import BootError, ConfigError
from pytest_smolvm.images import Image

X86, ARM = "/usr/bin/qemu-system-x86_64", "/usr/bin/qemu-system-aarch64"


def image(tmp_path: Path, arch: str) -> Image:
    return Image(name=f"test-{arch}", path=tmp_path, kernel=tmp_path / "vmlinux", initrd=tmp_path / "boot-x.cpio",
                 rootfs=tmp_path / "rootfs.ext4", rootfs_mib=1024, digest="d" * 16, kernel_release="6.1",
                 ssh_host_key_pub="", arch=arch)


@pytest.fixture
def x86_host(monkeypatch: pytest.MonkeyPatch) -> qemu.QemuDriver:
    monkeypatch.setattr(virt.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(virt.shutil, "which", lambda name: {"qemu-system-aarch64": ARM}.get(name))
    monkeypatch.setattr(qemu, "sandbox_supported", lambda binary: True)
    monkeypatch.setattr(qemu, "check_cpu_model", lambda binary, cpu: None)
    driver = qemu.QemuDriver(X86)
    driver.drop_privileges = False
    return driver


def one(argv: list[str], flag: str) -> str:
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]
    assert len(values) == 1, (flag, values)
    return values[0]


def argv_for(driver: qemu.QemuDriver, img: Image, tmp_path: Path, accel: str = "tcg", **config: Any) -> list[str]:
    spec = driver._spec(VMConfig(**config), img, tmp_path, Accel(accel, "test"), tmp_path / "disk.qcow2", nic=None)
    return driver._argv(spec)


def test_an_arm64_image_boots_aarch64_virt(tmp_path: Path, x86_host: qemu.QemuDriver) -> None:
    argv = argv_for(x86_host, image(tmp_path, "arm64"), tmp_path)
    assert argv[0] == ARM
    assert one(argv, "-M") == "virt,gic-version=max" and one(argv, "-cpu") == virt.ARM64_TCG_CPU
    cmdline = one(argv, "-append").split()
    assert "console=ttyAMA0" in cmdline and not [p for p in cmdline if p.startswith("tsc")]
    assert "-sandbox" in argv and "virtio-serial-device" in argv
    assert one(argv_for(x86_host, image(tmp_path, "arm64"), tmp_path, cpu="cortex-a72"), "-cpu") == "cortex-a72"


def test_an_amd64_image_stays_on_microvm(tmp_path: Path, x86_host: qemu.QemuDriver) -> None:
    argv = argv_for(x86_host, image(tmp_path, "amd64"), tmp_path)
    assert argv[0] == X86 and one(argv, "-M") == "microvm"
    assert "console=ttyS0" in one(argv, "-append").split()


def test_missing_aarch64_qemu_names_the_package(tmp_path: Path, x86_host: qemu.QemuDriver,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(virt.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match=r"an arm64 guest needs qemu-system-aarch64.*apt-get install qemu-system-arm"):
        x86_host.binary_for(image(tmp_path, "arm64"))
    with pytest.raises(ConfigError, match="invalid image architecture 'riscv64'"):
        virt.machine_type("riscv64")


def test_another_architecture_runs_under_tcg_only(tmp_path: Path, x86_host: qemu.QemuDriver,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def no_probe() -> tuple[bool, str]:
        raise AssertionError("probed /dev/kvm for a guest KVM cannot run")

    monkeypatch.setattr(accel_probe.host, "kvm_device_status", no_probe)
    monkeypatch.setattr(accel_probe.host, "is_macos", lambda: False)
    arm = image(tmp_path, "arm64")
    chosen = x86_host.select_accel("auto", arm)
    assert chosen.name == "tcg" and "arm64 guest on an amd64 host" in chosen.reason
    for requested in ("kvm", "hvf"):
        with pytest.raises(ConfigError, match=f"invalid accel='{requested}' for image 'test-arm64': it is an arm64 "
                                              f"image and this host is amd64"):
            choose_accel(requested, ARM, arm)


def test_arm64_linux_runs_its_own_images_under_kvm_after_a_virt_canary(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(virt.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(accel_probe.host, "is_macos", lambda: False)
    monkeypatch.setattr(accel_probe.host, "kvm_device_status", lambda: (True, "/dev/kvm is available"))
    seen: list[list[str]] = []

    def canary(binary: str, img: Image) -> tuple[bool, str]:
        seen.append(canary_argv(binary, img, "kvm"))
        return True, "KVM canary boot succeeded in 0.40s"

    monkeypatch.setattr(accel_probe, "kvm_canary", canary)
    assert choose_accel("auto", ARM, image(tmp_path, "arm64")) == Accel("kvm", "KVM canary boot succeeded in 0.40s")
    argv = seen[0]
    assert one(argv, "-M") == "virt" and one(argv, "-accel") == "kvm" and one(argv, "-cpu") == "host"
    assert "console=ttyAMA0" in one(argv, "-append") and "smolvm.canary=1" in one(argv, "-append")


def test_checkpoint_ram_block_follows_the_machine(tmp_path: Path, x86_host: qemu.QemuDriver) -> None:
    """Bug 6: a cold-booted virt VM's checkpoint named its RAM ``microvm.ram``; the helper QEMU
    said ``Unknown ramblock "mach-virt.ram", cannot accept migration``."""
    assert x86_host._ram_id("builtin", image(tmp_path, "arm64")) == "mach-virt.ram"
    assert x86_host._ram_id("builtin", image(tmp_path, "amd64")) == "microvm.ram"
    assert x86_host._ram_id("mem", image(tmp_path, "arm64")) == "mem"


class FailedMachine:
    """A helper QEMU that refused the stream: it hung up on QMP, its reason on stderr."""

    def __init__(self, qmp_path: Path, said: str) -> None:
        self.qmp_path, self.said, self.killed = qmp_path, said, False

    def diagnostics(self) -> str:
        return self.said

    def kill(self) -> None:
        self.killed = True


def test_restore_failure_carries_qemus_words(tmp_path: Path) -> None:
    """Bug 6: the caller saw only ``ConnectionResetError`` (QEMU's message went to BootError only)."""
    said = 'qemu-system-aarch64: Unknown ramblock "mach-virt.ram", cannot accept migration'
    machine = FailedMachine(tmp_path / "qmp.sock", said)

    class ResetQMP:
        def __init__(self, qmp_path: Path, timeout: float = 10.0) -> None:
            raise ConnectionResetError(104, "Connection reset by peer")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qemu, "QMP", ResetQMP)
        with pytest.raises(BootError) as info:
            qemu._restore(machine, tmp_path / "state", ignore_shared=False, what="checkpoint",  # type: ignore[arg-type]
                          run=False)
    assert "checkpoint restore failed (ConnectionResetError" in str(info.value)
    assert said in str(info.value)
    assert isinstance(info.value.__cause__, ConnectionResetError)
    assert machine.killed


def test_firecracker_is_never_picked_for_another_architecture(tmp_path: Path, x86_host: qemu.QemuDriver) -> None:
    from pytest_smolvm.drivers.firecracker import guest_vsock_support

    ok, why = guest_vsock_support(image(tmp_path, "arm64"))
    assert not ok and why == "image 'test-arm64' is arm64: Firecracker runs only this host's architecture"
