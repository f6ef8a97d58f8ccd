"""Unit tests of the HVF (macOS) argv per host platform, and of the arm64 image recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pytest_smolvm import host
from pytest_smolvm.config import VMConfig
from pytest_smolvm.drivers import hvf
from pytest_smolvm.drivers.base import Accel, Nic
from pytest_smolvm.drivers.qemu import CONTROL_PORT
from pytest_smolvm.drivers.spec import MachineSpec, RamFile
from pytest_smolvm.errors import ConfigError
from pytest_smolvm.images import Image
from pytest_smolvm.images import recipe as recipe_mod
from pytest_smolvm.images.recipe import KERNEL_PACKAGES, Recipe, arm64_recipe, stage1_init

#: Recipe().digest() before the ``arch`` field existed (computed from the previous recipe.py),
#: with the builder version of then (1).
DEFAULT_DIGEST_BEFORE_ARCH = "9b043e654da5590b"


def spec(tmp_path: Path, **over: Any) -> MachineSpec:
    kw: dict[str, Any] = {"binary": "/opt/homebrew/bin/qemu-system-aarch64", "accel": "hvf", "vcpus": 2,
                          "memory_mib": 512,
                          "kernel": tmp_path / "vmlinux", "initrd": tmp_path / "boot.cpio", "cmdline": "console=x",
                          "control": tmp_path / "ctl.sock",
                          "disk": tmp_path / "disk.qcow2"}
    kw.update(over)
    return MachineSpec(**kw)


def one(argv: list[str], flag: str) -> str:
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]
    assert len(values) == 1, (flag, values)
    return values[0]


@pytest.mark.parametrize("arch", ["arm64", "aarch64"])
def test_apple_silicon_is_aarch64_virt_with_hvf(tmp_path: Path, arch: str) -> None:
    argv = hvf.hvf_argv(arch, spec(tmp_path))
    assert argv[0] == "/opt/homebrew/bin/qemu-system-aarch64"
    assert one(argv, "-M") == "virt"
    i = argv.index("-accel")
    assert argv[i:i + 4] == ["-accel", "hvf", "-cpu", "host"]
    assert one(argv, "-smp") == "2" and one(argv, "-m") == "512"
    # the same control channel as on Linux: virtio-serial port smolvm.ctl on virtio-mmio
    assert "virtio-serial-device" in argv
    assert f"virtserialport,chardev=ctl,name={CONTROL_PORT}" in argv
    assert one(argv, "-serial") == "chardev:con"
    assert "virtio-blk-device,drive=root" in argv
    assert "-sandbox" not in argv  # macOS QEMU has no seccomp


def test_intel_mac_is_microvm_with_hvf(tmp_path: Path) -> None:
    argv = hvf.hvf_argv("x86_64", spec(tmp_path, binary="/usr/local/bin/qemu-system-x86_64"))
    assert argv[0] == "/usr/local/bin/qemu-system-x86_64"
    assert one(argv, "-M") == "microvm"
    assert one(argv, "-accel") == "hvf" and one(argv, "-cpu") == "host"
    assert "-sandbox" not in argv and "virtio-serial-device" in argv


def test_unknown_host_arch_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="host architecture 'riscv64'"):
        hvf.hvf_argv("riscv64", spec(tmp_path))


def test_virt_snapshot_clone_and_nic(tmp_path: Path) -> None:
    argv = hvf.virt_argv(spec(tmp_path, ram=RamFile(tmp_path / "mem", incoming=True), qmp=tmp_path / "qmp.sock",
                              nic=Nic(5, "tap0", "02:00:00:00:00:01")))
    assert one(argv, "-M") == "virt,memory-backend=mem"
    assert one(argv, "-object").endswith(f"mem-path={tmp_path / 'mem'},share=off")
    assert one(argv, "-incoming") == "defer"
    assert one(argv, "-netdev") == "tap,id=net0,fd=5"
    assert "virtio-net-device,netdev=net0,mac=02:00:00:00:00:01" in argv


def test_virt_tcg_and_kvm_variants(tmp_path: Path) -> None:
    tcg = hvf.virt_argv(spec(tmp_path, accel="tcg"))
    assert one(tcg, "-M") == "virt,gic-version=max" and one(tcg, "-cpu") == "max,pauth-impdef=on"
    assert one(hvf.virt_argv(spec(tmp_path, accel="tcg", cpu="cortex-a72")), "-cpu") == "cortex-a72"
    assert one(hvf.virt_argv(spec(tmp_path, accel="kvm")), "-cpu") == "host"
    with pytest.raises(ConfigError, match="accel='whpx'"):
        hvf.virt_argv(spec(tmp_path, accel="whpx"))


def test_aarch64_cmdline_uses_the_pl011_console_and_no_tsc_flags() -> None:
    line = hvf.aarch64_kernel_cmdline(["smolvm.aslr=0"], vcpus=1).split()
    assert "console=ttyAMA0" in line and "console=ttyS0" not in line
    assert not [p for p in line if p.startswith("tsc")]
    assert line[-2:] == ["possible_cpus=2", "smolvm.aslr=0"]
    assert "console=ttyS0" in hvf.hvf_cmdline("x86_64").split()
    assert "console=ttyAMA0" in hvf.hvf_cmdline("arm64").split()


def fake_image(tmp_path: Path, arch: str = "arm64") -> Image:
    return Image(name=f"test-{arch}", path=tmp_path, kernel=tmp_path / "vmlinux", initrd=tmp_path / "boot.cpio",
                 rootfs=tmp_path / "rootfs.ext4", rootfs_mib=1024, digest="d" * 16, kernel_release="6.1",
                 ssh_host_key_pub="", arch=arch)


@pytest.mark.parametrize(("arch", "machine", "binary", "image_arch"), [
    ("arm64", "virt", "qemu-system-aarch64", "arm64"), ("x86_64", "microvm", "qemu-system-x86_64", "amd64")])
def test_hvf_driver_argv_per_platform(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str, machine: str,
                                      binary: str, image_arch: str) -> None:
    monkeypatch.setattr(host, "host_tsc_khz", lambda: None)
    driver = hvf.HvfQemuDriver(f"/opt/homebrew/bin/{binary}", host_arch=arch)
    argv = driver._argv(driver._spec(VMConfig(vcpus=2), fake_image(tmp_path, image_arch), tmp_path,
                                     Accel("hvf", "test"),
                                     tmp_path / "disk.qcow2", nic=None))
    assert argv[0].endswith(binary) and one(argv, "-M") == machine and one(argv, "-accel") == "hvf"
    assert "-sandbox" not in argv


def test_hvf_driver_explains_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "hvf_status", lambda qemu=None: (False, "kern.hv_support=0"))
    driver = hvf.HvfQemuDriver("/q", host_arch="arm64")
    with pytest.raises(ConfigError, match=r"HVF does not work here: kern\.hv_support=0"):
        driver.select_accel("auto", fake_image(tmp_path))
    assert driver.select_accel("tcg", fake_image(tmp_path)).name == "tcg"
    with pytest.raises(ConfigError, match="accel='kvm' on macOS"):
        driver.select_accel("kvm", fake_image(tmp_path))


def test_hvf_status_is_not_applicable_off_macos(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "is_macos", lambda: False)
    assert host.hvf_status() == (False, "not applicable (macOS only)")


# ---------------------------------------------------------------- arm64 recipe


def test_default_recipe_digest_is_unchanged_by_the_arch_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recipe_mod, "BUILDER_VERSION", 1)
    assert Recipe().arch == "amd64"
    assert Recipe().digest() == DEFAULT_DIGEST_BEFORE_ARCH
    assert Recipe(arch="amd64").digest() == DEFAULT_DIGEST_BEFORE_ARCH


def test_arm64_recipe() -> None:
    r = arm64_recipe()
    assert (r.name, r.arch, r.kernel_package) == ("default-arm64", "arm64", KERNEL_PACKAGES["arm64"])
    assert r.packages == Recipe().packages
    assert r.digest() != Recipe().digest()
    assert arm64_recipe(packages=("python3",)).digest() != r.digest()
    assert Recipe.from_json(r.to_json()) == r
    assert Recipe.from_json({k: v for k, v in Recipe().to_json().items() if k != "arch"}) == Recipe()
    with pytest.raises(ValueError, match="arch='mips'"):
        Recipe(arch="mips")


def test_stage1_loads_vsock_modules_only_under_firecracker() -> None:
    script = stage1_init().decode()
    assert '*" smolvm.vsock=1 "*)' in script
    assert "vmw_vsock_virtio_transport" in script


def test_default_driver_on_macos_is_the_hvf_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_smolvm.drivers import default_driver

    monkeypatch.setattr(host, "is_macos", lambda: True)
    monkeypatch.setattr(host, "qemu_binary", lambda: "/opt/homebrew/bin/qemu-system-aarch64")
    monkeypatch.setattr("shutil.which", lambda name: None)
    driver = default_driver(VMConfig())
    assert isinstance(driver, hvf.HvfQemuDriver) and driver.name == "qemu"


# ---------------------------------------------------------------- full argv, pinned
# (as when the argv builders were refactored onto one spec object, issue 13)

ARM = "/opt/homebrew/bin/qemu-system-aarch64"
X86 = "/usr/local/bin/qemu-system-x86_64"


def guest_part(kernel: str, initrd: str, cmdline: str, ctl: str) -> list[str]:
    return ["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", kernel, "-initrd", initrd, "-append", cmdline,
            "-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con",
            "-device", "virtio-serial-device",
            "-chardev", f"socket,id=ctl,path={ctl},server=on,wait=off",
            "-device", "virtserialport,chardev=ctl,name=smolvm.ctl"]


FIXED: dict[str, Any] = {"vcpus": 2, "memory_mib": 512, "kernel": Path("/i/Image"), "initrd": Path("/i/boot.cpio"),
         "cmdline": "console=x", "control": Path("/r/vm/ctl.sock"), "disk": Path("/r/vm/disk.qcow2")}
GUEST = guest_part("/i/Image", "/i/boot.cpio", "console=x", "/r/vm/ctl.sock")
DRIVE = ["-drive", "id=root,file=/r/vm/disk.qcow2,format=qcow2,if=none,cache=unsafe,discard=unmap,file.locking=off",
         "-device", "virtio-blk-device,drive=root"]


def test_virt_argv_is_pinned() -> None:
    assert hvf.virt_argv(MachineSpec(binary=ARM, accel="tcg", **FIXED)) == [
        ARM, "-M", "virt,gic-version=max", "-accel", "tcg", "-cpu", "max,pauth-impdef=on", "-smp", "2", "-m", "512",
        *GUEST, *DRIVE]
    clone = hvf.virt_argv(MachineSpec(binary=ARM, accel="hvf", **FIXED, qmp=Path("/r/vm/qmp.sock"),
                                      ram=RamFile(Path("/s/mem"), incoming=True),
                                      nic=Nic(5, "tap0", "02:00:00:00:00:01")))
    assert clone == [
        ARM, "-M", "virt,memory-backend=mem", "-accel", "hvf", "-cpu", "host", "-smp", "2", "-m", "512",
        *GUEST, *DRIVE,
        "-netdev", "tap,id=net0,fd=5", "-device", "virtio-net-device,netdev=net0,mac=02:00:00:00:00:01",
        "-object", "memory-backend-file,id=mem,size=512M,mem-path=/s/mem,share=off",
        "-qmp", "unix:/r/vm/qmp.sock,server=on,wait=off", "-incoming", "defer"]
    template = hvf.virt_argv(MachineSpec(binary=ARM, accel="kvm", **FIXED, ram=RamFile(Path("/s/mem"), shared=True),
                                         sandbox=True))
    assert template == [
        ARM, "-M", "virt,memory-backend=mem", "-accel", "kvm", "-cpu", "host", "-smp", "2", "-m", "512",
        *GUEST, *DRIVE,
        "-object", "memory-backend-file,id=mem,size=512M,mem-path=/s/mem,share=on",
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]


def test_hvf_argv_is_pinned() -> None:
    assert hvf.hvf_argv("arm64", MachineSpec(binary=ARM, accel="tcg", sandbox=True, **FIXED)) == [
        ARM, "-M", "virt", "-accel", "hvf", "-cpu", "host", "-smp", "2", "-m", "512", *GUEST, *DRIVE]
    assert hvf.hvf_argv("x86_64", MachineSpec(binary=X86, accel="tcg", sandbox=True, **FIXED)) == [
        X86, "-M", "microvm", "-accel", "hvf", "-cpu", "host", "-smp", "2", "-m", "512", *GUEST, *DRIVE]


class _Proc:
    pid = 4242

    def poll(self) -> int | None:
        return None


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The argv the HVF driver would start, with QEMU, qemu-img and the host out of the way."""
    from pytest_smolvm.drivers import qemu
    from pytest_smolvm.drivers.base import Spawned

    argvs: list[list[str]] = []

    def spawn(argv: list[str], workdir: Path, **kw: Any) -> Spawned:
        argvs.append(list(argv))
        return Spawned(_Proc(), (), False)  # type: ignore[arg-type]

    def overlay(backing: Path, backing_format: str, path: Path, size_mib: int | None = None) -> Path:
        path.write_bytes(b"QFI\xfb")
        return path

    monkeypatch.setattr(qemu, "spawn_vmm", spawn)
    monkeypatch.setattr(qemu, "create_overlay", overlay)
    monkeypatch.setattr(host, "host_tsc_khz", lambda: 2_400_000)
    monkeypatch.setattr(qemu, "vmm_user", lambda: ("smolvm", 990, 991))
    return argvs


CMDLINE = ("quiet panic=-1 cryptomgr.notests lsm= ftrace=none mitigations=off audit=0 no_timer_check "
           "random.trust_cpu=on initcall_blacklist=init_kprobe_trace,crypto_kdf108_init,"
           "load_system_certificate_list,init_ima")


def hvf_driver(arch: str, binary: str) -> hvf.HvfQemuDriver:
    driver = hvf.HvfQemuDriver(binary, host_arch=arch)
    driver.select_accel = lambda requested, image: Accel("hvf", "test")  # type: ignore[method-assign]
    return driver


def test_hvf_driver_launch_is_pinned(tmp_path: Path, spawned: list[list[str]]) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "x").mkdir()
    image = fake_image(tmp_path)
    hvf_driver("arm64", ARM).launch(VMConfig(vcpus=2), image, tmp_path / "a")
    hvf_driver("x86_64", X86).launch(VMConfig(network="isolated"), fake_image(tmp_path, "amd64"), tmp_path / "x",
                                     Nic(5, "tap0", "02:00:00:00:00:01"))
    t = str(tmp_path)
    assert spawned == [
        [ARM, "-M", "virt", "-accel", "hvf", "-cpu", "host", "-smp", "2", "-m", "256",
         *guest_part(f"{t}/vmlinux", f"{t}/boot.cpio", f"console=ttyAMA0 {CMDLINE} possible_cpus=2",
                     f"{t}/a/ctl.sock"),
         "-drive", f"id=root,file={t}/a/disk.qcow2,format=qcow2,if=none,cache=unsafe,discard=unmap,file.locking=off",
         "-device", "virtio-blk-device,drive=root", "-qmp", f"unix:{t}/a/qmp.sock,server=on,wait=off"],
        [X86, "-M", "microvm", "-accel", "hvf", "-cpu", "host", "-smp", "1", "-m", "256",
         *guest_part(f"{t}/vmlinux", f"{t}/boot.cpio",
                     f"console=ttyS0 {CMDLINE.replace('lsm= ', 'lsm= tsc=reliable ')} reboot=t possible_cpus=2"
                     " smolvm.net=1",
                     f"{t}/x/ctl.sock"),
         "-drive", f"id=root,file={t}/x/disk.qcow2,format=qcow2,if=none,cache=unsafe,discard=unmap,file.locking=off",
         "-device", "virtio-blk-device,drive=root",
         "-netdev", "tap,id=net0,fd=5", "-device", "virtio-net-device,netdev=net0,mac=02:00:00:00:00:01",
         "-qmp", f"unix:{t}/x/qmp.sock,server=on,wait=off"],
    ]


def test_hvf_driver_template_is_pinned(tmp_path: Path, spawned: list[list[str]]) -> None:
    for d in ("vm", "snap"):
        (tmp_path / d).mkdir()
    hvf_driver("arm64", ARM).launch_template(VMConfig(), fake_image(tmp_path), tmp_path / "vm", tmp_path / "snap")
    t = str(tmp_path)
    assert spawned == [
        [ARM, "-M", "virt,memory-backend=mem", "-accel", "hvf", "-cpu", "host", "-smp", "1", "-m", "256",
         *guest_part(f"{t}/vmlinux", f"{t}/boot.cpio", f"console=ttyAMA0 {CMDLINE} possible_cpus=2",
                     f"{t}/vm/ctl.sock"),
         "-drive", f"id=root,file={t}/snap/disk.qcow2,format=qcow2,if=none,cache=unsafe,discard=unmap,file.locking=off",
         "-device", "virtio-blk-device,drive=root",
         "-object", f"memory-backend-file,id=mem,size=256M,mem-path={t}/snap/mem,share=on",
         "-qmp", f"unix:{t}/vm/qmp.sock,server=on,wait=off"],
    ]
