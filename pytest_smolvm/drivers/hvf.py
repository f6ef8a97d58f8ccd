"""QEMU on macOS Hypervisor.framework (HVF), and the aarch64 ``-M virt`` argv it needs.

Apple silicon runs arm64 guests: ``qemu-system-aarch64 -M virt -accel hvf -cpu host``,
booting an arm64 image (:func:`pytest_smolvm.images.recipe.arm64_recipe`). Intel Macs run
the Linux x86 argv (``-M microvm``) with ``-accel hvf``. Either way the devices are
virtio-mmio and the agent's control channel is the same virtio-serial port as on Linux.
The argv builders are pure and unit-tested for every platform; :class:`HvfQemuDriver` is
the QEMU driver with them, and runs only on macOS.
"""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Sequence

from .. import host
from ..config import VMConfig
from ..errors import ConfigError
from ..images import Image
from .base import Accel, guest_flags
from .kernel import BASE_CMDLINE, kernel_cmdline
from .qemu import QemuDriver, guest_args, qemu_argv
from .spec import MachineSpec

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


def virt_argv(spec: MachineSpec) -> list[str]:
    """Full ``qemu-system-aarch64 -M virt`` argv for one VM (pure): the arm64 counterpart of
    :func:`qemu_argv`, same spec, same virtio-mmio devices (``virt`` has virtio-mmio
    transports), so the control channel is the same virtio-serial port as on Linux/x86.
    ``accel`` is ``hvf`` (Apple silicon), ``kvm`` (arm64 Linux) or ``tcg`` (``-cpu max``)."""
    if spec.accel not in ("hvf", "kvm", "tcg"):
        raise ConfigError(f"invalid accel={spec.accel!r}: expected hvf, kvm or tcg")
    machine = "virt,gic-version=max" if spec.accel == "tcg" else "virt"
    if spec.ram is not None:
        machine += f",memory-backend={spec.ram.id}"
    return [spec.binary, "-M", machine, "-accel", spec.accel, "-cpu", "max" if spec.accel == "tcg" else "host",
            "-smp", str(spec.vcpus), "-m", str(spec.memory_mib), *guest_args(spec)]


def hvf_argv(host_arch: str, spec: MachineSpec) -> list[str]:
    """The argv of an HVF guest on a macOS host of ``host_arch`` (pure).

    Apple silicon (``arm64``): ``qemu-system-aarch64 -M virt -accel hvf -cpu host`` with an
    arm64 image. Intel Macs (``x86_64``): ``qemu-system-x86_64 -M microvm -accel hvf -cpu
    host``, the Linux argv with HVF for KVM. macOS QEMU has no seccomp: never ``-sandbox``.
    The spec's ``accel`` and ``sandbox`` are overridden accordingly.
    """
    spec = dataclasses.replace(spec, accel="hvf", sandbox=False)
    if QEMU_SYSTEM.get(host_arch) == "qemu-system-aarch64":
        return virt_argv(spec)
    if QEMU_SYSTEM.get(host_arch) == "qemu-system-x86_64":
        return qemu_argv(spec)
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

    @property
    def _aarch64(self) -> bool:
        return QEMU_SYSTEM.get(self.host_arch) == "qemu-system-aarch64"

    def _cmdline(self, config: VMConfig, accel: Accel) -> str:
        flags = [*guest_flags(config, accel), *self.extra_cmdline]
        if self._aarch64:
            return aarch64_kernel_cmdline(flags, config.vcpus)
        return kernel_cmdline(accel.name, host.host_tsc_khz(), flags, config.vcpus)

    def _sandbox(self) -> bool:
        return False  # macOS QEMU has no seccomp

    def _argv(self, spec: MachineSpec) -> list[str]:
        return virt_argv(spec) if self._aarch64 else qemu_argv(spec)
