"""``VMConfig.cpu``: the TCG guest's CPU model, validated, in the argv and the snapshot key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pytest_smolvm import cpumodel
from pytest_smolvm.config import VMConfig, check_field, config_from_layers
from pytest_smolvm.cpumodel import DEFAULT_TCG_CPU, check_cpu, check_cpu_model
from pytest_smolvm.drivers.accel import accel_args
from pytest_smolvm.drivers.qemu import QemuDriver, qemu_argv
from pytest_smolvm.drivers.spec import MachineSpec
from pytest_smolvm.errors import ConfigError
from pytest_smolvm.images import Image

NESTED = "qemu64,+rdrand,+arat,+svm,+npt"


@pytest.mark.parametrize("value", [None, "", "  ", "default", "DEFAULT"])
def test_unset_means_the_default_model(value: object) -> None:
    assert check_cpu(value) is None
    assert accel_args("tcg", check_cpu(value)) == ["-accel", "tcg", "-cpu", DEFAULT_TCG_CPU]


@pytest.mark.parametrize("value", [NESTED, "max", "Skylake-Client-v4,-hle", "qemu64,model-id=test,+x2apic",
                                   " qemu64,+svm "])
def test_model_strings_are_accepted_and_stripped(value: str) -> None:
    assert check_cpu(value) == value.strip()
    assert check_field("cpu", value) == value.strip()


@pytest.mark.parametrize(("value", "says"), [
    (64, "expected a QEMU CPU model string"),
    ("host", "needs KVM or HVF"),
    ("qemu64,+svm,", "'' is not '+flag'"),
    ("qemu64,svm", "'svm' is not '+flag'"),
    ("qemu64,+svm;reboot", "is not '+flag'"),
    ("qemu64 -device foo", "not a CPU model name"),
    ("-qemu64", "not a CPU model name"),
    ("qemu64," + ",".join(["+svm"] * 200), "longer than 512"),
])
def test_bad_values_name_the_value(value: object, says: str) -> None:
    with pytest.raises(ConfigError, match="invalid cpu=") as info:
        check_cpu(value)
    assert says in str(info.value)


def test_error_says_where_the_value_came_from() -> None:
    with pytest.raises(ConfigError, match=r"invalid cpu='host'.*\(in VMConfig\)"):
        VMConfig(cpu="host")
    with pytest.raises(ConfigError, match=r"invalid cpu='qemu64,svm'.*\(from marker on test_x\)"):
        config_from_layers([("marker on test_x", {"cpu": "qemu64,svm"})])


def test_default_config_keeps_the_default_model() -> None:
    assert VMConfig().cpu is None
    assert VMConfig(cpu=NESTED).replace(vcpus=2).cpu == NESTED


def test_argv_carries_the_model_under_tcg_only(tmp_path: Path) -> None:
    common = {"binary": "qemu", "vcpus": 1, "memory_mib": 256, "kernel": tmp_path / "k", "initrd": tmp_path / "i",
              "cmdline": "quiet", "control": tmp_path / "ctl", "disk": None}
    tcg = qemu_argv(MachineSpec(accel="tcg", cpu=NESTED, **common))  # type: ignore[arg-type]
    assert tcg[tcg.index("-cpu") + 1] == NESTED
    kvm = qemu_argv(MachineSpec(accel="kvm", cpu=NESTED, **common))  # type: ignore[arg-type]
    assert kvm[kvm.index("-cpu") + 1] == "host"


def test_unknown_model_or_flag_is_refused_against_this_qemu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpumodel, "qemu_cpu_catalogue",
                        lambda binary: (frozenset({"qemu64", "max"}), frozenset({"svm", "npt", "rdrand"})))
    check_cpu_model("qemu", None)
    check_cpu_model("qemu", "qemu64,+svm,-npt,model-id=anything")
    with pytest.raises(ConfigError, match=r"invalid cpu='qemu46,\+svm': qemu has no CPU model 'qemu46'"):
        check_cpu_model("qemu", "qemu46,+svm")
    with pytest.raises(ConfigError, match=r"does not know the CPU flag\(s\) \+nosuch, -other"):
        check_cpu_model("qemu", "max,+svm,+nosuch,-other")


def test_a_qemu_that_cannot_list_models_refuses_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpumodel, "qemu_cpu_catalogue", lambda binary: (frozenset(), frozenset()))
    check_cpu_model("qemu", "anything,+at-all")


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")
def test_real_qemu_knows_the_nested_model() -> None:
    binary = shutil.which("qemu-system-x86_64")
    assert binary is not None
    models, flags = cpumodel.qemu_cpu_catalogue(binary)
    assert {"qemu64", "max"} <= models and {"svm", "npt", "rdrand", "arat"} <= flags
    check_cpu_model(binary, NESTED)
    with pytest.raises(ConfigError, match="no CPU model 'qemu46'"):
        check_cpu_model(binary, "qemu46")


def _image(tmp_path: Path) -> Image:
    return Image(name="default", path=tmp_path, kernel=tmp_path / "vmlinux", initrd=tmp_path / "boot-x.cpio",
                 rootfs=tmp_path / "rootfs.ext4", rootfs_mib=1024, digest="d" * 16, kernel_release="6.1",
                 ssh_host_key_pub="")


def test_the_model_is_part_of_the_snapshot_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpumodel, "qemu_cpu_catalogue", lambda binary: (frozenset(), frozenset()))
    driver = QemuDriver(binary=str(tmp_path / "no-such-qemu"))
    image = _image(tmp_path)
    default = driver.snapshot_key(VMConfig(accel="tcg"), image)
    assert driver.snapshot_key(VMConfig(accel="tcg", cpu=DEFAULT_TCG_CPU), image) == default
    assert driver.snapshot_key(VMConfig(accel="tcg", cpu=NESTED), image) != default
    assert driver.snapshot_key(VMConfig(accel="tcg", cpu="max"), image) not in (
        default, driver.snapshot_key(VMConfig(accel="tcg", cpu=NESTED), image))
