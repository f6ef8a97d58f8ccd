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
from ..errors import ConfigError
from ..images import Image
from .base import Accel
from .kernel import kernel_cmdline
from .qemu import QemuDriver, qemu_argv, virt_argv
from .spec import MachineSpec
from .virt import HOST_ARCHES, aarch64_kernel_cmdline, qemu_for

__all__ = ["QEMU_SYSTEM", "HvfQemuDriver", "aarch64_kernel_cmdline", "hvf_argv", "hvf_cmdline", "virt_argv"]

#: Host CPU architecture (``platform.machine()``) -> QEMU system emulator.
QEMU_SYSTEM: dict[str, str] = {"x86_64": "qemu-system-x86_64", "amd64": "qemu-system-x86_64",
                               "arm64": "qemu-system-aarch64", "aarch64": "qemu-system-aarch64"}


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

    ``accel`` ``auto``/``hvf`` mean HVF for a guest of the Mac's own architecture; ``tcg`` is
    honoured, and a guest of the other architecture runs under TCG. The machine follows the
    image (:mod:`.virt`), as on Linux.
    """

    name = "qemu"

    def __init__(self, binary: str | None = None, *, host_arch: str | None = None,
                 extra_cmdline: Sequence[str] = ()) -> None:
        self.host_arch = host_arch or platform.machine()
        super().__init__(binary or host.qemu_binary(), extra_cmdline=extra_cmdline)
        self.drop_privileges = False  # not wired for -M virt on macOS, where root is rare

    def binary_for(self, image: Image) -> str:
        if image.arch == HOST_ARCHES.get(self.host_arch):
            return self.binary
        return qemu_for(image.arch)

    def select_accel(self, requested: str, image: Image) -> Accel:
        native = image.arch == HOST_ARCHES.get(self.host_arch)
        if not native and requested in ("auto", "tcg"):
            return Accel("tcg", f"an {image.arch} guest on this {self.host_arch} Mac: TCG emulation")
        if not native and requested == "hvf":
            raise ConfigError(f"invalid accel='hvf' for image {image.name!r}: HVF runs only guests of the Mac's own "
                              f"architecture ({self.host_arch}), and the image is {image.arch}; use accel='tcg'")
        if requested in ("auto", "hvf"):
            ok, why = host.hvf_status()
            if not ok:
                raise ConfigError(f"invalid accel={requested!r}: HVF does not work here: {why}")
            return Accel("hvf", f"macOS Hypervisor.framework ({why})")
        if requested == "tcg":
            return Accel("tcg", "requested with accel=tcg")
        raise ConfigError(f"invalid accel={requested!r} on macOS: expected auto, hvf or tcg")

    def _sandbox(self, binary: str) -> bool:
        return False  # macOS QEMU has no seccomp
