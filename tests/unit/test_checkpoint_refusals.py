"""Backends without checkpoints (Firecracker, the fake driver) refuse them clearly, before
anything is created (the fake driver's agent serves the guest side; no VM)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from pytest_smolvm import ConfigError, SmolVM, VMConfig
from pytest_smolvm.checkpoints import Checkpoint, digest_files
from pytest_smolvm.drivers.base import CheckpointDriver
from pytest_smolvm.images import Image


@pytest.fixture
def fake_driver() -> Iterator[ModuleType]:
    loaded = "fake_driver" in sys.modules
    import fake_driver

    yield fake_driver
    if not loaded:
        del sys.modules["fake_driver"]


def fake_image(tmp_path: Path) -> Image:
    return Image(name="fake", path=tmp_path, kernel=tmp_path / "vmlinuz", initrd=tmp_path / "boot-x.cpio",
                 rootfs=tmp_path / "rootfs.ext4", rootfs_mib=1024, digest="0" * 16, kernel_release="fake",
                 ssh_host_key_pub="")


@pytest.fixture
def runtime(tmp_path: Path) -> Path:
    path = tmp_path / "rt"
    path.mkdir(mode=0o700)
    return path


def test_firecracker_cannot_checkpoint() -> None:
    from pytest_smolvm.drivers.firecracker import FirecrackerDriver

    assert not issubclass(FirecrackerDriver, CheckpointDriver)


def test_a_backend_without_checkpoints_refuses_checkpoint(tmp_path: Path, runtime: Path,
                                                         fake_driver: ModuleType) -> None:
    with SmolVM(VMConfig(snapshot=False), driver=fake_driver.FakeDriver(), runtime_dir=runtime,
                resolve_image=lambda name: fake_image(tmp_path)) as vm:
        with pytest.raises(ConfigError, match="backend 'fake' cannot take checkpoints"):
            vm.checkpoint()
        assert sorted(p.name for p in vm.workdir.parent.iterdir()) == [vm.name]  # no checkpoint directory
        assert vm.run(["true"]).exit_code == 0


def test_a_backend_without_checkpoints_refuses_a_clone(tmp_path: Path, runtime: Path,
                                                       fake_driver: ModuleType) -> None:
    path = tmp_path / "cp"
    path.mkdir()
    for name in ("mem", "state", "disk.qcow2"):
        (path / name).write_bytes(name.encode())
    cp = Checkpoint(name="vm1.cp1", path=path, run_id="r", config=VMConfig(), shape={"backend": "qemu"},
                    files=digest_files(path), disk_bytes=1 << 30)
    vm = SmolVM(driver=fake_driver.FakeDriver(), runtime_dir=runtime, checkpoint=cp,
                resolve_image=lambda name: fake_image(tmp_path))
    with pytest.raises(ConfigError, match=r"backend 'fake' cannot start from checkpoint vm1\.cp1"):
        vm.start()
    assert list(runtime.iterdir()) == []


def test_checkpoint_argument_is_checked() -> None:
    with pytest.raises(ConfigError, match="invalid checkpoint='/tmp/x'"):
        SmolVM(checkpoint="/tmp/x")  # type: ignore[arg-type]
