"""Unit tests of the pure parts of the QEMU driver: argv, kernel command line, accel choice."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from pytest_smolvm.config import VMConfig
from pytest_smolvm.drivers import accel as accel_probe
from pytest_smolvm.drivers import qemu
from pytest_smolvm.drivers.accel import accel_args, choose_accel
from pytest_smolvm.drivers.base import TEMPLATE_MAC, Accel, Nic, Spawned, guest_flags
from pytest_smolvm.drivers.qemu import kernel_cmdline, qemu_argv
from pytest_smolvm.drivers.spec import MachineSpec, RamFile
from pytest_smolvm.drivers.virt import host_arch
from pytest_smolvm.errors import ConfigError
from pytest_smolvm.images import Image


def argv_for(tmp_path: Path, **overrides: Any) -> list[str]:
    kwargs: dict[str, Any] = {
        "binary": "/opt/qemu/bin/qemu-system-x86_64",
        "accel": "tcg",
        "vcpus": 2,
        "memory_mib": 384,
        "kernel": tmp_path / "img" / "vmlinux",
        "initrd": tmp_path / "img" / "boot-abc.cpio",
        "cmdline": "console=ttyS0 quiet smolvm.aslr=0",
        "control": tmp_path / "vm" / "ctl.sock",
        "disk": tmp_path / "vm" / "disk.qcow2",
    }
    kwargs.update(overrides)
    return qemu_argv(MachineSpec(**kwargs))


def option(argv: list[str], flag: str) -> list[str]:
    """Every value given to ``flag`` (options may repeat, e.g. -chardev/-device)."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def one(argv: list[str], flag: str) -> str:
    values = option(argv, flag)
    assert len(values) == 1, (flag, values)
    return values[0]


# ---------------------------------------------------------------- qemu_argv


def test_argv_basics(tmp_path: Path) -> None:
    argv = argv_for(tmp_path)
    assert argv[0] == "/opt/qemu/bin/qemu-system-x86_64"
    assert one(argv, "-M") == "microvm"
    assert one(argv, "-smp") == "2"
    assert one(argv, "-m") == "384"
    assert one(argv, "-kernel") == str(tmp_path / "img" / "vmlinux")
    assert one(argv, "-initrd") == str(tmp_path / "img" / "boot-abc.cpio")
    assert one(argv, "-append") == "console=ttyS0 quiet smolvm.aslr=0"
    for flag in ("-no-reboot", "-nodefaults", "-no-user-config"):
        assert flag in argv
    assert one(argv, "-display") == "none"


def test_argv_tcg_cpu(tmp_path: Path) -> None:
    argv = argv_for(tmp_path, accel="tcg")
    assert one(argv, "-accel") == "tcg"
    assert one(argv, "-cpu") == "qemu64,+rdrand,+arat"
    i = argv.index("-accel")
    assert argv[i:i + 4] == ["-accel", "tcg", "-cpu", "qemu64,+rdrand,+arat"]


@pytest.mark.parametrize("accel", ["kvm", "hvf"])
def test_argv_hw_accel_uses_host_cpu(tmp_path: Path, accel: str) -> None:
    argv = argv_for(tmp_path, accel=accel)
    assert one(argv, "-accel") == accel
    assert one(argv, "-cpu") == "host"


def test_argv_sizes_follow_arguments(tmp_path: Path) -> None:
    argv = argv_for(tmp_path, vcpus=7, memory_mib=4096)
    assert one(argv, "-smp") == "7"
    assert one(argv, "-m") == "4096"


def test_argv_console_and_control(tmp_path: Path) -> None:
    argv = argv_for(tmp_path)
    chardevs = option(argv, "-chardev")
    # The console is QEMU's stdout (a pipe the engine caps), never a file QEMU grows itself.
    console = next(c for c in chardevs if c.startswith("stdio,"))
    assert not any(c.startswith("file,") for c in chardevs)
    assert "signal=off" in console.split(",")
    con_id = next(p.split("=", 1)[1] for p in console.split(",") if p.startswith("id="))
    assert one(argv, "-serial") == f"chardev:{con_id}"

    ctl = next(c for c in chardevs if c.startswith("socket,"))
    parts = ctl.split(",")
    assert f"path={tmp_path / 'vm' / 'ctl.sock'}" in parts
    assert "server=on" in parts
    assert "wait=off" in parts  # QEMU must not block waiting for the host to connect
    ctl_id = next(p.split("=", 1)[1] for p in parts if p.startswith("id="))
    devices = option(argv, "-device")
    assert "virtio-serial-device" in devices
    port = next(d for d in devices if d.startswith("virtserialport,"))
    assert f"chardev={ctl_id}" in port.split(",")
    assert "name=smolvm.ctl" in port.split(",")
    assert qemu.CONTROL_PORT == "smolvm.ctl"


def test_argv_qcow2_drive(tmp_path: Path) -> None:
    argv = argv_for(tmp_path, disk=tmp_path / "vm" / "disk.qcow2", disk_format="qcow2")
    drive = one(argv, "-drive").split(",")
    assert f"file={tmp_path / 'vm' / 'disk.qcow2'}" in drive
    assert "format=qcow2" in drive
    assert "cache=unsafe" in drive  # a throwaway overlay: no flushes needed
    assert "if=none" in drive
    drive_id = next(p.split("=", 1)[1] for p in drive if p.startswith("id="))
    assert f"virtio-blk-device,drive={drive_id}" in option(argv, "-device")


def test_argv_raw_drive_is_not_unsafe(tmp_path: Path) -> None:
    argv = argv_for(tmp_path, disk=tmp_path / "shared.ext4", disk_format="raw")
    drive = one(argv, "-drive").split(",")
    assert "format=raw" in drive
    assert "cache=unsafe" not in drive  # a shared disk outlives the VM: its writes must land


def test_argv_without_disk(tmp_path: Path) -> None:
    argv = argv_for(tmp_path, disk=None)
    assert "-drive" not in argv
    assert not any(d.startswith("virtio-blk-device") for d in option(argv, "-device"))


def test_argv_are_all_strings(tmp_path: Path) -> None:
    assert all(isinstance(a, str) for a in argv_for(tmp_path))


def test_argv_escapes_commas_in_paths(tmp_path: Path) -> None:
    odd = tmp_path / "run,id=1"
    argv = argv_for(tmp_path, control=odd / "ctl.sock", disk=odd / "disk.qcow2")
    drive = one(argv, "-drive")
    # QEMU's option syntax escapes a literal comma in a value as ",,".
    assert f"file={str(odd).replace(',', ',,')}/disk.qcow2," in drive
    ctl = next(c for c in option(argv, "-chardev") if c.startswith("socket,"))
    assert f"path={str(odd).replace(',', ',,')}/ctl.sock," in ctl


# ---------------------------------------------------------------- accel_args


def test_accel_args_bogus() -> None:
    with pytest.raises(ConfigError, match="bogus"):
        accel_args("bogus")


def test_accel_args_auto_is_not_an_accelerator() -> None:
    # "auto" must be resolved by choose_accel before building argv.
    with pytest.raises(ConfigError):
        accel_args("auto")


# ---------------------------------------------------------------- kernel_cmdline


def test_cmdline_tcg_with_khz() -> None:
    line = kernel_cmdline("tcg", 2_400_000)
    assert "tsc_early_khz=2400000" in line.split()


@pytest.mark.parametrize(("accel", "khz"), [("tcg", None), ("tcg", 0), ("kvm", 2_400_000), ("hvf", 1000)])
def test_cmdline_no_tsc_khz(accel: str, khz: int | None) -> None:
    assert "tsc_early_khz" not in kernel_cmdline(accel, khz)


@pytest.mark.parametrize(("vcpus", "expected"), [(1, 2), (2, 2), (4, 4), (16, 16)])
def test_cmdline_possible_cpus(vcpus: int, expected: int) -> None:
    parts = kernel_cmdline("kvm", None, vcpus=vcpus).split()
    assert [p for p in parts if p.startswith("possible_cpus=")] == [f"possible_cpus={expected}"]


def test_cmdline_appends_extra_flags_last() -> None:
    parts = kernel_cmdline("tcg", 1000, ["smolvm.aslr=0", "smolvm.net=1"]).split()
    assert parts[-2:] == ["smolvm.aslr=0", "smolvm.net=1"]
    assert "console=ttyS0" in parts  # the serial console the driver logs


def test_cmdline_is_single_line() -> None:
    line = kernel_cmdline("tcg", 1000, ["a=1"], vcpus=3)
    assert "\n" not in line
    assert "  " not in line


# ---------------------------------------------------------------- guest_flags


TCG = Accel("tcg", "test")
KVM = Accel("kvm", "test")


def test_aslr_off_by_default_under_tcg() -> None:
    assert "smolvm.aslr=0" in guest_flags(VMConfig(), TCG)


@pytest.mark.parametrize("accel", [KVM, Accel("hvf", "test")])
def test_aslr_on_by_default_with_hw_accel(accel: Accel) -> None:
    assert "smolvm.aslr=0" not in guest_flags(VMConfig(), accel)


def test_explicit_aslr_true_under_tcg() -> None:
    assert "smolvm.aslr=0" not in guest_flags(VMConfig(aslr=True), TCG)


def test_explicit_aslr_false_under_kvm() -> None:
    assert "smolvm.aslr=0" in guest_flags(VMConfig(aslr=False), KVM)


def test_net_flag_only_with_network() -> None:
    assert "smolvm.net=1" not in guest_flags(VMConfig(), KVM)
    assert "smolvm.net=1" in guest_flags(VMConfig(network="isolated"), KVM)
    assert "smolvm.net=1" in guest_flags(VMConfig(network="nat"), TCG)


def test_guest_flags_in_cmdline_are_matched_by_stage1() -> None:
    # stage 1 init matches flags as " smolvm.net=1 " inside " $(cat /proc/cmdline) ".
    from pytest_smolvm.images.recipe import stage1_init

    flags = guest_flags(VMConfig(network="isolated"), TCG)
    line = f" {kernel_cmdline('tcg', 1000, flags)} "
    script = stage1_init().decode()
    for flag in flags:
        assert f'*" {flag} "*)' in script
        assert f" {flag} " in line


# ---------------------------------------------------------------- choose_accel


class Dummy:
    """Stands in for the binary / image: choose_accel must not look inside for these paths
    (but for the image's architecture: the host's, here)."""

    arch = host_arch()

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"choose_accel touched image.{name}")


@pytest.fixture
def linux(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setattr(accel_probe.host, "is_macos", lambda: False)

    def no_canary(*args: Any, **kwargs: Any) -> tuple[bool, str]:
        raise AssertionError("kvm_canary must not run here")

    monkeypatch.setattr(accel_probe, "kvm_canary", no_canary)
    return monkeypatch


def test_choose_tcg_never_probes(linux: pytest.MonkeyPatch) -> None:
    def no_probe() -> tuple[bool, str]:
        raise AssertionError("probed /dev/kvm")

    linux.setattr(accel_probe.host, "kvm_device_status", no_probe)
    accel = choose_accel("tcg", "/nonexistent/qemu", Dummy())  # type: ignore[arg-type]
    assert accel.name == "tcg"
    assert accel.reason


def test_choose_hvf_on_linux(linux: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="macOS"):
        choose_accel("hvf", "/nonexistent/qemu", Dummy())  # type: ignore[arg-type]


def test_choose_hvf_and_auto_on_macos(linux: pytest.MonkeyPatch) -> None:
    linux.setattr(accel_probe.host, "is_macos", lambda: True)
    assert choose_accel("hvf", "qemu", Dummy()).name == "hvf"  # type: ignore[arg-type]
    assert choose_accel("auto", "qemu", Dummy()).name == "hvf"  # type: ignore[arg-type]


def test_choose_kvm_without_device(linux: pytest.MonkeyPatch) -> None:
    linux.setattr(accel_probe.host, "kvm_device_status", lambda: (False, "no /dev/kvm"))
    with pytest.raises(ConfigError) as info:
        choose_accel("kvm", "qemu", Dummy())  # type: ignore[arg-type]
    assert "no /dev/kvm" in str(info.value)
    assert "kvm" in str(info.value)


def test_choose_kvm_with_failing_canary(linux: pytest.MonkeyPatch) -> None:
    linux.setattr(accel_probe.host, "kvm_device_status", lambda: (True, "/dev/kvm is available"))
    linux.setattr(accel_probe, "kvm_canary", lambda binary, image: (False, "canary failed"))
    with pytest.raises(ConfigError, match="canary failed"):
        choose_accel("kvm", "qemu", Dummy())  # type: ignore[arg-type]


def test_choose_auto_without_device_uses_tcg(linux: pytest.MonkeyPatch) -> None:
    linux.setattr(accel_probe.host, "kvm_device_status", lambda: (False, "no /dev/kvm"))
    accel = choose_accel("auto", "qemu", Dummy())  # type: ignore[arg-type]
    assert accel.name == "tcg"
    assert "no /dev/kvm" in accel.reason


def test_choose_auto_canary_fails_uses_tcg(linux: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, object]] = []

    def canary(binary: str, image: object) -> tuple[bool, str]:
        calls.append((binary, image))
        return False, "canary failed"

    image = Dummy()
    linux.setattr(accel_probe.host, "kvm_device_status", lambda: (True, "/dev/kvm is available"))
    linux.setattr(accel_probe, "kvm_canary", canary)
    accel = choose_accel("auto", "/usr/bin/qemu-system-x86_64", image)  # type: ignore[arg-type]
    assert accel.name == "tcg"
    assert "canary failed" in accel.reason
    assert calls == [("/usr/bin/qemu-system-x86_64", image)]


@pytest.mark.parametrize("requested", ["auto", "kvm"])
def test_choose_kvm_when_canary_passes(linux: pytest.MonkeyPatch, requested: str) -> None:
    linux.setattr(accel_probe.host, "kvm_device_status", lambda: (True, "/dev/kvm is available"))
    linux.setattr(accel_probe, "kvm_canary", lambda binary, image: (True, "ok"))
    accel = choose_accel(requested, "qemu", Dummy())  # type: ignore[arg-type]
    assert accel == Accel("kvm", "ok")


# ---------------------------------------------------------------- privilege drop


def test_argv_without_drop_keeps_the_strict_sandbox(tmp_path: Path) -> None:
    argv = argv_for(tmp_path, sandbox=True)
    assert one(argv, "-sandbox") == qemu.SANDBOX
    assert "elevateprivileges=deny" in qemu.SANDBOX.split(",")
    assert "-runas" not in argv and "-chroot" not in argv


def test_argv_drops_to_a_user_inside_the_vm_dir(tmp_path: Path) -> None:
    argv = argv_for(tmp_path, sandbox=True, runas="65534:65534", chroot=tmp_path / "vm")
    assert one(argv, "-runas") == "65534:65534"
    assert one(argv, "-chroot") == str(tmp_path / "vm")
    # QEMU's own setuid() would be killed by elevateprivileges=deny; exec stays denied.
    sandbox = one(argv, "-sandbox").split(",")
    assert "elevateprivileges=allow" in sandbox
    assert {"on", "spawn=deny", "obsolete=deny", "resourcecontrol=deny"} <= set(sandbox)


def test_driver_drops_only_as_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    driver = qemu.QemuDriver("/usr/bin/qemu-system-x86_64")
    monkeypatch.setattr(qemu, "vmm_user", lambda: ("nobody", 65534, 65534))
    assert driver._privilege_drop(tmp_path) == ("65534:65534", tmp_path)
    driver.drop_privileges = False
    assert driver._privilege_drop(tmp_path) is None
    driver.drop_privileges = True
    monkeypatch.setattr(qemu, "vmm_user", lambda: None)  # not root
    assert driver._privilege_drop(tmp_path) is None


# ---------------------------------------------------------------- full argv, pinned
#
# Each configuration's whole argv as it was when the argv builders were refactored onto one
# spec object (issue 13): any change to a pinned list changes what QEMU runs, and the
# snapshot keys derived from it.

BIN = "/usr/bin/qemu-system-x86_64"
R = Path("/r/vm")
HEAD = ["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]


def guest_part(kernel: str, initrd: str, cmdline: str, ctl: str) -> list[str]:
    return [*HEAD, "-kernel", kernel, "-initrd", initrd, "-append", cmdline,
            "-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con",
            "-device", "virtio-serial-device",
            "-chardev", f"socket,id=ctl,path={ctl},server=on,wait=off",
            "-device", "virtserialport,chardev=ctl,name=smolvm.ctl"]


PINNED_BUILDER: dict[str, tuple[dict[str, Any], list[str]]] = {
    "tcg, no disk options": (
        {"binary": BIN, "accel": "tcg", "vcpus": 1, "memory_mib": 256, "kernel": Path("/i/vmlinux"),
         "initrd": Path("/i/boot-1.cpio"), "cmdline": "console=ttyS0 quiet", "control": R / "ctl.sock",
         "disk": R / "disk.qcow2"},
        [BIN, "-M", "microvm", "-accel", "tcg", "-cpu", "qemu64,+rdrand,+arat", "-smp", "1", "-m", "256",
         *guest_part("/i/vmlinux", "/i/boot-1.cpio", "console=ttyS0 quiet", "/r/vm/ctl.sock"),
         "-drive", "id=root,file=/r/vm/disk.qcow2,format=qcow2,if=none,cache=unsafe,discard=unmap,file.locking=off",
         "-device", "virtio-blk-device,drive=root"]),
    "kvm, network, shared raw disk, sandbox": (
        {"binary": BIN, "accel": "kvm", "vcpus": 4, "memory_mib": 1024, "kernel": Path("/i/vmlinux"),
         "initrd": Path("/i/boot-1.cpio"), "cmdline": "c", "control": R / "ctl.sock",
         "disk": Path("/c/shared/default.ext4"), "disk_format": "raw", "qmp": R / "qmp.sock", "sandbox": True,
         "nic": Nic(7, "smv0", "02:53:56:00:00:01")},
        [BIN, "-M", "microvm", "-accel", "kvm", "-cpu", "host", "-smp", "4", "-m", "1024",
         *guest_part("/i/vmlinux", "/i/boot-1.cpio", "c", "/r/vm/ctl.sock"),
         "-drive", "id=root,file=/c/shared/default.ext4,format=raw,if=none,cache=writeback,discard=unmap",
         "-device", "virtio-blk-device,drive=root",
         "-netdev", "tap,id=net0,fd=7", "-device", "virtio-net-device,netdev=net0,mac=02:53:56:00:00:01",
         "-qmp", "unix:/r/vm/qmp.sock,server=on,wait=off",
         "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]),
    "snapshot template, privilege drop": (
        {"binary": BIN, "accel": "tcg", "vcpus": 2, "memory_mib": 512, "kernel": Path("/i/vmlinux"),
         "initrd": Path("/i/boot-1.cpio"), "cmdline": "c", "control": R / "ctl.sock",
         "disk": Path("/s/k,1/disk.qcow2"), "qmp": R / "qmp.sock", "ram": RamFile(Path("/s/k,1/mem"), shared=True),
         "sandbox": True, "runas": "990:990", "chroot": R, "disk_fds": (11, 12)},
        [BIN, "-M", "microvm,memory-backend=mem", "-accel", "tcg", "-cpu", "qemu64,+rdrand,+arat",
         "-smp", "2", "-m", "512", *guest_part("/i/vmlinux", "/i/boot-1.cpio", "c", "/r/vm/ctl.sock"),
         "-add-fd", "fd=11,set=1,opaque=/s/k,,1/disk.qcow2", "-add-fd", "fd=12,set=1",
         "-drive", "id=root,file=/dev/fdset/1,format=qcow2,if=none,cache=unsafe,discard=unmap,file.locking=off",
         "-device", "virtio-blk-device,drive=root",
         "-object", "memory-backend-file,id=mem,size=512M,mem-path=/s/k,,1/mem,share=on",
         "-qmp", "unix:/r/vm/qmp.sock,server=on,wait=off",
         "-sandbox", "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny",
         "-chroot", "/r/vm", "-runas", "990:990"]),
    "snapshot clone, network, privilege drop": (
        {"binary": BIN, "accel": "kvm", "vcpus": 2, "memory_mib": 512, "kernel": Path("/i/vmlinux"),
         "initrd": Path("/i/boot-1.cpio"), "cmdline": "c", "control": R / "ctl.sock",
         "disk": R / "disk.qcow2", "qmp": R / "qmp.sock", "ram": RamFile(Path("/s/k/mem"), incoming=True),
         "sandbox": True, "nic": Nic(5, "smv1", "02:53:56:00:00:01"), "runas": "990:990", "chroot": R,
         "disk_fds": (8, 9)},
        [BIN, "-M", "microvm,memory-backend=mem", "-accel", "kvm", "-cpu", "host", "-smp", "2", "-m", "512",
         *guest_part("/i/vmlinux", "/i/boot-1.cpio", "c", "/r/vm/ctl.sock"),
         "-add-fd", "fd=8,set=1,opaque=/r/vm/disk.qcow2", "-add-fd", "fd=9,set=1",
         "-drive", "id=root,file=/dev/fdset/1,format=qcow2,if=none,cache=unsafe,discard=unmap,file.locking=off",
         "-device", "virtio-blk-device,drive=root",
         "-netdev", "tap,id=net0,fd=5", "-device", "virtio-net-device,netdev=net0,mac=02:53:56:00:00:01",
         "-object", "memory-backend-file,id=mem,size=512M,mem-path=/s/k/mem,share=off",
         "-qmp", "unix:/r/vm/qmp.sock,server=on,wait=off", "-incoming", "defer",
         "-sandbox", "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny",
         "-chroot", "/r/vm", "-runas", "990:990"]),
    "checkpoint helper of a cold-booted VM: machine RAM name, paused": (
        {"binary": BIN, "accel": "tcg", "vcpus": 1, "memory_mib": 256, "kernel": Path("/i/vmlinux"),
         "initrd": Path("/i/boot-1.cpio"), "cmdline": "c", "control": R / "ctl.sock",
         "disk": R / "disk.qcow2", "qmp": R / "qmp.sock", "paused": True,
         "ram": RamFile(Path("/c/cp/mem"), shared=True, incoming=True, id="microvm.ram")},
        [BIN, "-M", "microvm,memory-backend=microvm.ram", "-accel", "tcg", "-cpu", "qemu64,+rdrand,+arat",
         "-smp", "1", "-m", "256", *guest_part("/i/vmlinux", "/i/boot-1.cpio", "c", "/r/vm/ctl.sock"),
         "-drive", "id=root,file=/r/vm/disk.qcow2,format=qcow2,if=none,cache=unsafe,discard=unmap,file.locking=off",
         "-device", "virtio-blk-device,drive=root",
         "-object", "memory-backend-file,id=microvm.ram,size=256M,mem-path=/c/cp/mem,share=on",
         "-qmp", "unix:/r/vm/qmp.sock,server=on,wait=off", "-incoming", "defer", "-S"]),
}


@pytest.mark.parametrize("case", PINNED_BUILDER)
def test_builder_argv_is_pinned(case: str) -> None:
    kwargs, expected = PINNED_BUILDER[case]
    assert qemu_argv(MachineSpec(**kwargs)) == expected


class _Proc:
    pid = 4242

    def poll(self) -> int | None:
        return None


class _QMP:
    """Answers a clone's restore: the guest is running once the state is in."""

    def __init__(self, path: Path) -> None:
        pass

    def command(self, name: str, **args: Any) -> dict[str, Any]:
        return {"status": "running"} if name == "query-status" else {}

    def send_file(self, name: str, path: Path, flags: int) -> None:
        pass

    def close(self) -> None:
        pass


TSC_KHZ = 2_400_000
CMDLINE = ("console=ttyS0 quiet panic=-1 cryptomgr.notests lsm= tsc=reliable ftrace=none mitigations=off audit=0 "
           "no_timer_check random.trust_cpu=on "
           "initcall_blacklist=init_kprobe_trace,crypto_kdf108_init,load_system_certificate_list,init_ima reboot=t")


def fake_image(tmp_path: Path, *, mkdir: bool = True) -> Image:
    d = tmp_path / "img"
    if mkdir:
        d.mkdir(exist_ok=True)
    return Image(name="default", path=d, kernel=d / "vmlinux", initrd=d / "boot-abc.cpio", rootfs=d / "rootfs.ext4",
                 rootfs_mib=1024, digest="d" * 16, kernel_release="6.1", ssh_host_key_pub="")


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What the QEMU driver would start, with QEMU, qemu-img and the host out of the way."""
    calls: list[dict[str, Any]] = []

    def spawn(argv: list[str], workdir: Path, **kw: Any) -> Spawned:
        calls.append({"argv": list(argv), "workdir": workdir, **kw})
        return Spawned(_Proc(), (), False)  # type: ignore[arg-type]

    def overlay(backing: Path, backing_format: str, path: Path, size_mib: int | None = None) -> Path:
        path.write_bytes(b"QFI\xfb")
        return path

    monkeypatch.setattr(qemu, "spawn_vmm", spawn)
    monkeypatch.setattr(qemu, "create_overlay", overlay)
    monkeypatch.setattr(qemu, "QMP", _QMP)
    monkeypatch.setattr(qemu, "sandbox_supported", lambda binary: True)
    monkeypatch.setattr(qemu.host, "host_tsc_khz", lambda: TSC_KHZ)
    monkeypatch.setattr(qemu.host, "qemu_version", lambda binary: "QEMU emulator version 7.2.11")
    monkeypatch.setattr(qemu, "vmm_user", lambda: ("smolvm", 990, 991))
    monkeypatch.setattr(qemu, "vmm_uid", lambda: 990)
    return calls


def qemu_driver(accel: str = "tcg", *, drop: bool = True) -> qemu.QemuDriver:
    driver = qemu.QemuDriver(BIN)
    driver.select_accel = lambda requested, image: Accel(accel, "test")  # type: ignore[method-assign]
    driver.drop_privileges = drop
    return driver


def norm(argv: list[str], tmp_path: Path) -> list[str]:
    return [a.replace(str(tmp_path), "<T>") for a in argv]


SANDBOX_ARGS = ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
DROPPED_ARGS = ["-sandbox", "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny"]


def launched_part(workdir: str, cmdline: str) -> list[str]:
    return guest_part("<T>/img/vmlinux", "<T>/img/boot-abc.cpio", cmdline, f"{workdir}/ctl.sock")


def test_launch_tcg_without_network_or_drop(tmp_path: Path, spawned: list[dict[str, Any]]) -> None:
    (tmp_path / "vm").mkdir()
    qemu_driver(drop=False).launch(VMConfig(), fake_image(tmp_path), tmp_path / "vm")
    (call,) = spawned
    assert norm(call["argv"], tmp_path) == [
        BIN, "-M", "microvm", "-accel", "tcg", "-cpu", "qemu64,+rdrand,+arat", "-smp", "1", "-m", "256",
        *launched_part("<T>/vm", f"{CMDLINE} possible_cpus=2 tsc_early_khz={TSC_KHZ} smolvm.aslr=0"),
        "-drive", "id=root,file=<T>/vm/disk.qcow2,format=qcow2,if=none,cache=unsafe,discard=unmap,file.locking=off",
        "-device", "virtio-blk-device,drive=root",
        "-qmp", "unix:<T>/vm/qmp.sock,server=on,wait=off", *SANDBOX_ARGS]
    assert call["pass_fds"] == () and call["uid"] == os.geteuid()
    assert not (tmp_path / "vm" / "qemu.pid").exists()  # spawn_vmm's vmm.json is the one record
    assert (call["driver"], call["stderr_name"], call["watch"]) == ("qemu", "qemu.log", True)


def test_launch_kvm_with_network_and_drop(tmp_path: Path, spawned: list[dict[str, Any]]) -> None:
    (tmp_path / "vm").mkdir()
    config = VMConfig(network="isolated", vcpus=2, memory_mib=384)
    qemu_driver("kvm").launch(config, fake_image(tmp_path), tmp_path / "vm", Nic(7, "smv0", TEMPLATE_MAC))
    (call,) = spawned
    rw, ro = call["pass_fds"][:2]
    assert call["pass_fds"] == (rw, ro, 7) and call["uid"] == 990
    assert norm(call["argv"], tmp_path) == [
        BIN, "-M", "microvm", "-accel", "kvm", "-cpu", "host", "-smp", "2", "-m", "384",
        *launched_part("<T>/vm", f"{CMDLINE} possible_cpus=2 smolvm.net=1"),
        "-add-fd", f"fd={rw},set=1,opaque=<T>/vm/disk.qcow2", "-add-fd", f"fd={ro},set=1",
        "-drive", "id=root,file=/dev/fdset/1,format=qcow2,if=none,cache=unsafe,discard=unmap,file.locking=off",
        "-device", "virtio-blk-device,drive=root",
        "-netdev", "tap,id=net0,fd=7", "-device", f"virtio-net-device,netdev=net0,mac={TEMPLATE_MAC}",
        "-qmp", "unix:<T>/vm/qmp.sock,server=on,wait=off", *DROPPED_ARGS,
        "-chroot", "<T>/vm", "-runas", "990:991"]


def test_launch_template_with_drop(tmp_path: Path, spawned: list[dict[str, Any]]) -> None:
    for d in ("vm", "snap"):
        (tmp_path / d).mkdir()
    qemu_driver().launch_template(VMConfig(), fake_image(tmp_path), tmp_path / "vm", tmp_path / "snap")
    (call,) = spawned
    rw, ro = call["pass_fds"]
    assert norm(call["argv"], tmp_path) == [
        BIN, "-M", "microvm,memory-backend=mem", "-accel", "tcg", "-cpu", "qemu64,+rdrand,+arat",
        "-smp", "1", "-m", "256",
        *launched_part("<T>/vm", f"{CMDLINE} possible_cpus=2 tsc_early_khz={TSC_KHZ} smolvm.aslr=0"),
        "-add-fd", f"fd={rw},set=1,opaque=<T>/snap/disk.qcow2", "-add-fd", f"fd={ro},set=1",
        "-drive", "id=root,file=/dev/fdset/1,format=qcow2,if=none,cache=unsafe,discard=unmap,file.locking=off",
        "-device", "virtio-blk-device,drive=root",
        "-object", "memory-backend-file,id=mem,size=256M,mem-path=<T>/snap/mem,share=on",
        "-qmp", "unix:<T>/vm/qmp.sock,server=on,wait=off", *DROPPED_ARGS,
        "-chroot", "<T>/vm", "-runas", "990:991"]


def test_launch_clone_with_network_without_drop(tmp_path: Path, spawned: list[dict[str, Any]]) -> None:
    for d in ("vm", "snap"):
        (tmp_path / d).mkdir()
    config = VMConfig(network="nat", aslr=True)
    qemu_driver(drop=False).launch_clone(config, fake_image(tmp_path), tmp_path / "snap", tmp_path / "vm",
                                         Nic(6, "smv2", TEMPLATE_MAC))
    (call,) = spawned
    assert call["pass_fds"] == (6,)
    assert norm(call["argv"], tmp_path) == [
        BIN, "-M", "microvm,memory-backend=mem", "-accel", "tcg", "-cpu", "qemu64,+rdrand,+arat",
        "-smp", "1", "-m", "256",
        *launched_part("<T>/vm", f"{CMDLINE} possible_cpus=2 tsc_early_khz={TSC_KHZ} smolvm.net=1"),
        "-drive", "id=root,file=<T>/vm/disk.qcow2,format=qcow2,if=none,cache=unsafe,discard=unmap,file.locking=off",
        "-device", "virtio-blk-device,drive=root",
        "-netdev", "tap,id=net0,fd=6", "-device", f"virtio-net-device,netdev=net0,mac={TEMPLATE_MAC}",
        "-object", "memory-backend-file,id=mem,size=256M,mem-path=<T>/snap/mem,share=off",
        "-qmp", "unix:<T>/vm/qmp.sock,server=on,wait=off", "-incoming", "defer", *SANDBOX_ARGS]


def test_launch_clone_with_drop(tmp_path: Path, spawned: list[dict[str, Any]]) -> None:
    for d in ("vm", "snap"):
        (tmp_path / d).mkdir()
    qemu_driver("kvm").launch_clone(VMConfig(), fake_image(tmp_path), tmp_path / "snap", tmp_path / "vm")
    (call,) = spawned
    rw, ro = call["pass_fds"]
    assert norm(call["argv"], tmp_path) == [
        BIN, "-M", "microvm,memory-backend=mem", "-accel", "kvm", "-cpu", "host", "-smp", "1", "-m", "256",
        *launched_part("<T>/vm", f"{CMDLINE} possible_cpus=2"),
        "-add-fd", f"fd={rw},set=1,opaque=<T>/vm/disk.qcow2", "-add-fd", f"fd={ro},set=1",
        "-drive", "id=root,file=/dev/fdset/1,format=qcow2,if=none,cache=unsafe,discard=unmap,file.locking=off",
        "-device", "virtio-blk-device,drive=root",
        "-object", "memory-backend-file,id=mem,size=256M,mem-path=<T>/snap/mem,share=off",
        "-qmp", "unix:<T>/vm/qmp.sock,server=on,wait=off", "-incoming", "defer", *DROPPED_ARGS,
        "-chroot", "<T>/vm", "-runas", "990:991"]


#: snapshot_key hashes the argv with placeholder paths: these pin that argv too (and the
#: template format: 3 since templates write the identity files and prime the page cache; the
#: root overlay takes no image lock since checkpoints).
PINNED_KEYS = {
    ("tcg", False, "none"): "486e2af0562faea2d2e3",
    ("tcg", True, "none"): "9ef91924f3903f809ef9",
    ("tcg", True, "isolated"): "1849d3cdcae8ab2e27ae",
    ("kvm", True, "nat"): "521a8a794e87568c75a1",  # with host_cpu (issue 11: KVM keys name the host CPU)
}


@pytest.mark.parametrize(("accel", "drop", "network"), PINNED_KEYS)
def test_snapshot_key_is_pinned(spawned: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, accel: str, drop: bool,
                                network: str) -> None:
    # KVM keys name the host CPU (a -cpu host snapshot is only valid on the CPU it was taken on).
    monkeypatch.setattr(qemu.host, "cpu_identity", lambda: "vendor_id=AuthenticAMD; model name=pinned")
    key = qemu_driver(accel, drop=drop).snapshot_key(VMConfig(network=network), fake_image(Path("/"), mkdir=False))
    assert key == PINNED_KEYS[accel, drop, network]
    assert not spawned
