"""QEMU on macOS Hypervisor.framework (HVF), and the aarch64 ``-M virt`` argv it needs.

Apple silicon runs arm64 guests: ``qemu-system-aarch64 -M virt -accel hvf -cpu host``,
booting an arm64 image (:func:`pytest_smolvm.images.recipe.arm64_recipe`). Intel Macs run
the Linux x86 argv (``-M microvm``) with ``-accel hvf``. Either way the devices are
virtio-mmio and the agent's control channel is the same virtio-serial port as on Linux.
The argv builders are pure and unit-tested for every platform; :class:`HvfQemuDriver` is
the QEMU driver with them, and runs only on macOS.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from pathlib import Path

from .. import host
from ..config import VMConfig
from ..errors import ConfigError
from ..images import Image
from .base import Accel, Nic, guest_flags
from .qemu import BASE_CMDLINE, QemuDriver, guest_args, kernel_cmdline, qemu_argv

#: Host CPU architecture (``platform.machine()``) -> QEMU system emulator.
QEMU_SYSTEM: dict[str, str] = {"x86_64": "qemu-system-x86_64", "amd64": "qemu-system-x86_64",
                               "arm64": "qemu-system-aarch64", "aarch64": "qemu-system-aarch64"}


def aarch64_kernel_cmdline(extra: Sequence[str] = (), vcpus: int = 1) -> str:
    """The guest kernel command line on ``-M virt`` (pure): the console is the PL011
    ``ttyAMA0``, and the x86-only TSC flags are left out."""
    parts = ["console=ttyAMA0" if p == "console=ttyS0" else p for p in BASE_CMDLINE if not p.startswith("tsc=")]
    parts.append(f"possible_cpus={max(vcpus, 2)}")
    parts.extend(extra)
    return " ".join(parts)


def virt_argv(
    *,
    binary: str,
    accel: str,
    vcpus: int,
    memory_mib: int,
    kernel: Path,
    initrd: Path,
    cmdline: str,
    control: Path,
    disk: Path | None,
    disk_format: str = "qcow2",
    qmp: Path | None = None,
    memory_file: Path | None = None,
    memory_shared: bool = False,
    incoming: bool = False,
    sandbox: bool = False,
    nic: Nic | None = None,
) -> list[str]:
    """Full ``qemu-system-aarch64 -M virt`` argv for one VM (pure): the arm64 counterpart of
    :func:`qemu_argv`, same keywords, same virtio-mmio devices (``virt`` has virtio-mmio
    transports), so the control channel is the same virtio-serial port as on Linux/x86.
    ``accel`` is ``hvf`` (Apple silicon), ``kvm`` (arm64 Linux) or ``tcg`` (``-cpu max``)."""
    if accel not in ("hvf", "kvm", "tcg"):
        raise ConfigError(f"invalid accel={accel!r}: expected hvf, kvm or tcg")
    machine = "virt,gic-version=max" if accel == "tcg" else "virt"
    if memory_file is not None:
        machine += ",memory-backend=mem"
    return [binary, "-M", machine, "-accel", accel, "-cpu", "max" if accel == "tcg" else "host",
            "-smp", str(vcpus), "-m", str(memory_mib),
            *guest_args(memory_mib=memory_mib, kernel=kernel, initrd=initrd, cmdline=cmdline,
                        control=control, disk=disk, disk_format=disk_format, qmp=qmp, memory_file=memory_file,
                        memory_shared=memory_shared, incoming=incoming, sandbox=sandbox, nic=nic)]


def hvf_argv(host_arch: str, **kwargs: object) -> list[str]:
    """The argv of an HVF guest on a macOS host of ``host_arch`` (pure).

    Apple silicon (``arm64``): ``qemu-system-aarch64 -M virt -accel hvf -cpu host`` with an
    arm64 image. Intel Macs (``x86_64``): ``qemu-system-x86_64 -M microvm -accel hvf -cpu
    host``, the Linux argv with HVF for KVM. macOS QEMU has no seccomp: never ``-sandbox``.
    Keywords are those of :func:`qemu_argv` except ``accel``.
    """
    kwargs = {**kwargs, "accel": "hvf", "sandbox": False}
    if QEMU_SYSTEM.get(host_arch) == "qemu-system-aarch64":
        return virt_argv(**kwargs)  # type: ignore[arg-type]
    if QEMU_SYSTEM.get(host_arch) == "qemu-system-x86_64":
        return qemu_argv(**kwargs)  # type: ignore[arg-type]
    raise ConfigError(f"invalid host architecture {host_arch!r} for HVF: expected arm64 or x86_64")


def hvf_cmdline(host_arch: str, extra: Sequence[str] = (), vcpus: int = 1) -> str:
    """The guest kernel command line for an HVF guest on ``host_arch`` (pure)."""
    if QEMU_SYSTEM.get(host_arch) == "qemu-system-aarch64":
        return aarch64_kernel_cmdline(extra, vcpus)
    return kernel_cmdline("hvf", None, extra, vcpus)


class HvfQemuDriver(QemuDriver):
    """The QEMU driver on macOS: HVF, ``-M virt`` on Apple silicon, no seccomp sandbox.

    ``accel`` ``auto``/``hvf`` mean HVF; ``tcg`` is honoured (``-cpu max`` on aarch64).
    """

    name = "qemu"

    def __init__(self, binary: str | None = None, *, host_arch: str | None = None,
                 extra_cmdline: Sequence[str] = ()) -> None:
        self.host_arch = host_arch or platform.machine()
        super().__init__(binary or host.qemu_binary(), extra_cmdline=extra_cmdline)
        self.drop_privileges = False  # not wired for -M virt on macOS, where root is rare

    def select_accel(self, requested: str, image: Image) -> Accel:
        if requested in ("auto", "hvf"):
            ok, why = host.hvf_status()
            if not ok:
                raise ConfigError(f"invalid accel={requested!r}: HVF does not work here: {why}")
            return Accel("hvf", f"macOS Hypervisor.framework ({why})")
        if requested == "tcg":
            return Accel("tcg", "requested with accel=tcg")
        raise ConfigError(f"invalid accel={requested!r} on macOS: expected auto, hvf or tcg")

    def _argv(self, config: VMConfig, image: Image, workdir: Path, accel: Accel, disk: Path | None,
              fmt: str = "qcow2", *, nic: Nic | None = None, **extra: object) -> list[str]:
        flags = [*guest_flags(config, accel), *self.extra_cmdline]
        aarch64 = QEMU_SYSTEM.get(self.host_arch) == "qemu-system-aarch64"
        cmdline = aarch64_kernel_cmdline(flags, config.vcpus) if aarch64 else \
            kernel_cmdline(accel.name, host.host_tsc_khz(), flags, config.vcpus)
        build = virt_argv if aarch64 else qemu_argv
        return build(
            binary=self.binary, accel=accel.name, vcpus=config.vcpus, memory_mib=config.memory_mib,
            kernel=image.kernel, initrd=image.initrd, cmdline=cmdline,
            control=workdir / "ctl.sock", disk=disk, disk_format=fmt,
            qmp=workdir / "qmp.sock", sandbox=False, nic=nic, **extra,  # type: ignore[arg-type]
        )
