"""A SmolVM given its image store, snapshot store, runtime directory and network hub uses
those and never the process-wide defaults (the fake driver's agent serves the guest side)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import pytest

from pytest_smolvm import SmolVM, VMConfig
from pytest_smolvm import boot as boot_mod
from pytest_smolvm import images as images_mod
from pytest_smolvm import paths as paths_mod
from pytest_smolvm.drivers.base import Nic
from pytest_smolvm.errors import NetworkError
from pytest_smolvm.images import Image
from pytest_smolvm.snapshots import SnapshotStore


@pytest.fixture
def fake_driver() -> Iterator[ModuleType]:
    """tests/fake_driver.py, imported for this test only: the plugin tests' pytester runs in
    this process import it afresh, so they count its launches from zero."""
    loaded = "fake_driver" in sys.modules
    import fake_driver

    yield fake_driver
    if not loaded:
        del sys.modules["fake_driver"]


def snapshot_driver(fake_driver: ModuleType) -> Any:
    """The fake driver with snapshots (a "snapshot" is three small files)."""

    class FakeSnapshotDriver(fake_driver.FakeDriver):
        key = "fake-snapshot"

        def __init__(self) -> None:
            self.cloned_from: list[Path] = []

        def snapshot_key(self, config: VMConfig, image: Image) -> str:
            return self.key

        def launch_template(self, config: VMConfig, image: Image, workdir: Path, target: Path,
                            nic: Nic | None = None) -> Any:
            return fake_driver.FakeMachine(workdir)

        def save_snapshot(self, machine: Any, target: Path) -> None:
            for name in ("mem", "state", "disk.qcow2"):
                (target / name).write_bytes(name.encode())
            machine.kill()

        def launch_clone(self, config: VMConfig, image: Image, snapshot: Path, workdir: Path,
                         nic: Nic | None = None) -> Any:
            self.cloned_from.append(snapshot)
            return fake_driver.FakeMachine(workdir)

    return FakeSnapshotDriver()


@pytest.fixture
def no_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(what: str) -> Any:
        def call(*args: object, **kwargs: object) -> NoReturn:
            raise AssertionError(f"the default {what} was used")

        return call

    monkeypatch.setattr(images_mod, "resolve", refuse("image store"))
    monkeypatch.setattr(boot_mod, "default_store", refuse("snapshot store"))
    monkeypatch.setattr(paths_mod, "runtime_dir", refuse("runtime directory"))


@pytest.fixture
def runtime(tmp_path: Path) -> Path:
    path = tmp_path / "rt"
    path.mkdir(mode=0o700)
    return path


def fake_image(tmp_path: Path) -> Image:
    return Image(name="fake", path=tmp_path, kernel=tmp_path / "vmlinuz", initrd=tmp_path / "boot-x.cpio",
                 rootfs=tmp_path / "rootfs.ext4", rootfs_mib=1024, digest="0" * 16, kernel_release="fake",
                 ssh_host_key_pub="")


@pytest.mark.usefixtures("no_defaults")
def test_passed_in_stores_and_runtime_dir_are_used(tmp_path: Path, runtime: Path, fake_driver: ModuleType) -> None:
    store = SnapshotStore(tmp_path / "snapshots")
    resolved: list[str] = []

    def resolve(name: str) -> Image:
        resolved.append(name)
        return fake_image(tmp_path)

    driver = snapshot_driver(fake_driver)
    vm = SmolVM(VMConfig(image="myimage"), driver=driver, resolve_image=resolve, snapshot_store=store,
                runtime_dir=runtime)
    assert vm.workdir == runtime / vm.run_id / vm.name
    with vm:
        assert vm.workdir.is_dir() and (vm.workdir / "owner.json").is_file()
        assert vm.boot_mode == "snapshot"
        assert driver.cloned_from == [store.path(driver.key)]
        assert (store.path(driver.key) / "meta.json").is_file()
        assert vm.run(["true"]).exit_code == 0
    assert resolved == ["myimage"]
    assert not vm.workdir.exists() and list(runtime.iterdir()) == []


@pytest.mark.usefixtures("no_defaults")
def test_passed_in_network_hub_is_used(tmp_path: Path, runtime: Path, fake_driver: ModuleType) -> None:
    calls: list[tuple[object, ...]] = []

    def attach(*args: object) -> NoReturn:
        calls.append(args)
        raise NetworkError("the fake hub has no slots")

    vm = SmolVM(VMConfig(network="isolated"), driver=fake_driver.FakeDriver(), runtime_dir=runtime,
                resolve_image=lambda name: fake_image(tmp_path), attach_network=attach)
    with pytest.raises(NetworkError, match="fake hub"):
        vm.start()
    assert [c[:4] for c in calls] == [(vm.name, vm.run_id, "isolated", ())]
    assert list(runtime.iterdir()) == []  # the failed start left nothing behind
