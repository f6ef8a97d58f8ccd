"""Snapshot keys of hardware-accelerated guests name the host CPU (finding, issue 11).

A ``-cpu host`` guest's saved state carries the CPU's features: restored on another CPU type
(a cache dir shared by CI runners of different types), the guest would use instructions the
CPU lacks. Under TCG the CPU is emulated and the key must not depend on the host's.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_smolvm import host
from pytest_smolvm.config import VMConfig
from pytest_smolvm.drivers.base import Accel
from pytest_smolvm.drivers.qemu import QemuDriver
from pytest_smolvm.images import Image


def _image(tmp_path: Path) -> Image:
    return Image(name="default", path=tmp_path, kernel=tmp_path / "vmlinux", initrd=tmp_path / "boot-x.cpio",
                 rootfs=tmp_path / "rootfs.ext4", rootfs_mib=1024, digest="d" * 16, kernel_release="6.1",
                 ssh_host_key_pub="")


def _keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, accel: str, cpu: str) -> str:
    driver = QemuDriver(binary=str(tmp_path / "no-such-qemu"))
    monkeypatch.setattr(driver, "select_accel", lambda requested, image: Accel(accel, "test"))
    monkeypatch.setattr(host, "cpu_identity", lambda: cpu)
    return driver.snapshot_key(VMConfig(), _image(tmp_path))


def test_kvm_keys_differ_per_host_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _keys(tmp_path, monkeypatch, "kvm", "epyc") != _keys(tmp_path, monkeypatch, "kvm", "xeon")
    assert _keys(tmp_path, monkeypatch, "kvm", "epyc") == _keys(tmp_path, monkeypatch, "kvm", "epyc")


def test_tcg_keys_ignore_the_host_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _keys(tmp_path, monkeypatch, "tcg", "epyc") == _keys(tmp_path, monkeypatch, "tcg", "xeon")


def test_cpu_identity_follows_model_and_flags_not_clock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def identity(cpuinfo: str) -> str:
        fake = tmp_path / "cpuinfo"
        fake.write_text(cpuinfo)
        real_path = host.Path
        monkeypatch.setattr(host, "Path", lambda p: fake if p == "/proc/cpuinfo" else real_path(p))
        host.cpu_identity.cache_clear()
        try:
            return host.cpu_identity()
        finally:
            monkeypatch.setattr(host, "Path", real_path)
            host.cpu_identity.cache_clear()

    base = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\ncpu MHz\t\t: 2445.406\n"
            "flags\t\t: fpu sse2\n")
    assert identity(base) == identity(base.replace("2445.406", "2600.000"))
    assert identity(base) != identity(base.replace("sse2", "sse2 avx512f"))
    assert identity(base) != identity(base.replace("AMD EPYC", "Intel Xeon"))
    assert identity(base) == identity(base + "\nprocessor\t: 1\nflags\t\t: something else\n")
