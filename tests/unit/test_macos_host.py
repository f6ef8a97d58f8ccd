"""The host layer on macOS, simulated here (issue 22): the package imports and a VM runs with
``network="none"``; other policies fail with a clear error and leave nothing; socket paths
stay within macOS's 104-byte ``sun_path``; QEMU never gets ``-runas``/``-chroot``/``-sandbox``.
What only a Mac can show (HVF itself) is scripts/verify-macos's job."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pytest_smolvm import SmolVM, VMConfig, paths
from pytest_smolvm.drivers import base, default_driver, hvf, qemu, virt
from pytest_smolvm.drivers.base import Accel
from pytest_smolvm.errors import ConfigError, NetworkError
from pytest_smolvm.images import Image
from pytest_smolvm.network import hub

BREW = "/opt/homebrew/bin"


@pytest.fixture
def mac(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An Apple-silicon Mac: Darwin, arm64, Homebrew's QEMU on PATH."""
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    monkeypatch.setattr(virt.shutil, "which", lambda name: f"{BREW}/{name}" if name.startswith("qemu-") else None)
    monkeypatch.setattr("pytest_smolvm.host.shutil.which",
                        lambda name, path=None: f"{BREW}/{name}" if name.startswith("qemu-") else None)
    return monkeypatch


def image(tmp_path: Path, arch: str = "arm64") -> Image:
    return Image(name=f"test-{arch}", path=tmp_path, kernel=tmp_path / "vmlinux", initrd=tmp_path / "boot-x.cpio",
                 rootfs=tmp_path / "rootfs.ext4", rootfs_mib=1024, digest="0" * 16, kernel_release="6.1",
                 ssh_host_key_pub="", arch=arch)


def test_the_package_imports_on_macos() -> None:
    """In a fresh interpreter that believes it is on a Mac: nothing Linux-only at import time.
    (Third-party packages are imported first, for real: psutil would load its macOS backend.)"""
    code = ("import psutil, filelock, pytest\n"
            "import sys, platform; sys.platform = 'darwin'; platform.system = lambda: 'Darwin'; "
            "platform.machine = lambda: 'arm64'\n"
            "import pytest_smolvm, pytest_smolvm.plugin, pytest_smolvm.fixtures, pytest_smolvm.cli, "
            "pytest_smolvm.reaper, pytest_smolvm.network.hub, pytest_smolvm.drivers.hvf\n"
            "from pytest_smolvm import host; assert host.is_macos()\n"
            "assert 'pyroute2' not in sys.modules, 'pyroute2 (Linux netlink) imported at import time'\n"
            "print('imported')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert res.returncode == 0 and res.stdout.strip() == "imported", res.stderr


def test_the_default_driver_is_hvf_with_virt_for_arm64(tmp_path: Path, mac: pytest.MonkeyPatch) -> None:
    driver = default_driver(VMConfig())
    assert isinstance(driver, hvf.HvfQemuDriver)
    assert driver.binary == f"{BREW}/qemu-system-aarch64"
    assert driver.binary_for(image(tmp_path, "amd64")) == f"{BREW}/qemu-system-x86_64"  # TCG, slowly


def test_qemu_never_drops_privileges_or_gets_seccomp_on_macos(tmp_path: Path, mac: pytest.MonkeyPatch) -> None:
    mac.setattr(os, "geteuid", lambda: 0)  # even as root
    mac.setattr(base, "vmm_user", lambda: ("smolvm", 990, 990))
    mac.setattr(qemu, "vmm_user", lambda: ("smolvm", 990, 990))
    driver = default_driver(VMConfig())
    assert isinstance(driver, hvf.HvfQemuDriver)
    spec = driver._spec(VMConfig(), image(tmp_path), tmp_path, Accel("hvf", "test"), tmp_path / "disk.qcow2",
                        nic=None)
    assert spec.runas is None and spec.chroot is None and spec.sandbox is False and spec.disk_fds is None
    argv = driver._argv(spec)
    assert not {"-runas", "-chroot", "-sandbox"} & set(argv)
    assert argv[:7] == [f"{BREW}/qemu-system-aarch64", "-M", "virt", "-accel", "hvf", "-cpu", "host"]


def test_socket_paths_stay_within_macos_limit(tmp_path: Path, mac: pytest.MonkeyPatch) -> None:
    assert paths.sun_path_max() == 104
    fits = Path("/private/tmp/smolvm-501/0123abcd") / ("v" * 60)
    assert paths.check_socket_path(fits / "qmp.sock", "VM's QMP")
    long = Path("/private/tmp/smolvm-501/0123abcd") / ("v" * 64) / "template"
    with pytest.raises(ConfigError, match=r"is 115 bytes, over the 103 .* on darwin; set SMOLVM_RUNTIME_DIR"):
        paths.check_socket_path(long / "qmp.sock", "VM's QMP")
    driver = default_driver(VMConfig())
    assert isinstance(driver, hvf.HvfQemuDriver)
    deep = tmp_path / ("d" * max(1, 100 - len(str(tmp_path))))
    with pytest.raises(ConfigError, match="VM's control socket path"):
        driver._spec(VMConfig(), image(tmp_path), deep, Accel("hvf", "test"), deep / "disk.qcow2", nic=None)


def test_linux_allows_the_longer_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    path = Path("/") / ("x" * 105)
    assert paths.sun_path_max() == 108 and paths.check_socket_path(path, "test") == path


def test_networked_policies_are_refused_clearly_and_leave_nothing(tmp_path: Path, mac: pytest.MonkeyPatch) -> None:
    runtime = tmp_path / "rt"
    mac.setenv("SMOLVM_RUNTIME_DIR", str(runtime))
    for policy in ("isolated", "nat"):
        with pytest.raises(NetworkError, match=f"vm1: network='{policy}' needs Linux .* this host is darwin; "
                                               f"use network='none'"):
            hub.attach("vm1", "0123abcd", policy, (), None)
    assert not runtime.exists() or not any(runtime.iterdir())


def test_a_vm_with_no_network_runs_and_a_networked_one_is_refused(tmp_path: Path, mac: pytest.MonkeyPatch) -> None:
    """The engine on a simulated Mac, with the fake driver (the host's agent process) for QEMU."""
    import fake_driver

    runtime = tmp_path / "rt"
    runtime.mkdir(mode=0o700)
    img = image(tmp_path)

    class Driver(fake_driver.FakeDriver):
        def select_accel(self, requested: str, image: Image) -> Accel:
            return Accel("hvf", "simulated")

    kw: dict[str, Any] = {"driver": Driver(), "resolve_image": lambda _name: img, "runtime_dir": runtime}
    with SmolVM(VMConfig(network="none", snapshot=False), **kw) as vm:
        assert vm.run(["echo", "hi"]).stdout == "hi\n"
    refused = SmolVM(VMConfig(network="isolated", snapshot=False), **kw)
    with pytest.raises(NetworkError, match="needs Linux"):
        refused.start()
    assert [p for p in runtime.rglob("*") if p.is_dir() and p.name.startswith("vm")] == []
