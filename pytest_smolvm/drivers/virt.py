"""QEMU's aarch64 ``-M virt`` machine, shared by every way an arm64 guest runs: HVF on Apple
silicon, KVM on arm64 Linux, TCG anywhere else (an arm64 guest on an x86-64 host).

The machine follows the image: an ``amd64`` image boots ``qemu-system-x86_64 -M microvm``,
an ``arm64`` one ``qemu-system-aarch64 -M virt``. Both have virtio-mmio transports, so the
devices and the agent's control channel (a virtio-serial port) are the same, and both argv
builders (:func:`~.qemu.qemu_argv`, :func:`~.qemu.virt_argv`) share everything after the
machine, CPU and memory. The facts here are pure but for :func:`qemu_for`, which looks on PATH.
"""

from __future__ import annotations

import platform
import shutil
from collections.abc import Sequence
from typing import Final

from ..errors import ConfigError
from .kernel import BASE_CMDLINE

#: Guest architecture (Debian's name) -> (QEMU system emulator, machine type).
MACHINES: Final = {"amd64": ("qemu-system-x86_64", "microvm"), "arm64": ("qemu-system-aarch64", "virt")}
#: The RAM block a machine type names its own RAM (QEMU's ``default-ram-id``): a checkpoint of
#: a cold-booted VM restores into a backend of that name, or the stream would not match.
RAM_IDS: Final = {"microvm": "microvm.ram", "virt": "mach-virt.ram"}
#: ``platform.machine()`` -> Debian architecture.
HOST_ARCHES: Final = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
#: The TCG CPU of an arm64 guest. ``max`` emulates pointer authentication with QARMA, which
#: makes boot 2.7x slower (canary to a marker: 4.7 s with ``max``, 1.7 s with this or
#: ``cortex-a72``, measured here); ``pauth-impdef=on`` keeps pointer authentication, with
#: QEMU's cheap implementation-defined algorithm, and every other ``max`` feature.
ARM64_TCG_CPU: Final = "max,pauth-impdef=on"
#: What to install for each emulator (Debian; Homebrew's ``qemu`` has both).
INSTALL: Final = {"qemu-system-x86_64": "apt-get install qemu-system-x86 qemu-utils (macOS: brew install qemu)",
                  "qemu-system-aarch64": "apt-get install qemu-system-arm qemu-utils (macOS: brew install qemu)"}


def host_arch() -> str | None:
    """This host's Debian architecture, or None for another CPU."""
    return HOST_ARCHES.get(platform.machine())


def machine_type(arch: str) -> str:
    """The QEMU machine an image of Debian architecture ``arch`` boots on."""
    try:
        return MACHINES[arch][1]
    except KeyError:
        raise ConfigError(f"invalid image architecture {arch!r}: expected one of {', '.join(MACHINES)}") from None


def qemu_for(arch: str) -> str:
    """The path of the QEMU system emulator for guests of ``arch``; ConfigError naming the
    package when it is not on PATH."""
    machine_type(arch)
    name = MACHINES[arch][0]
    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"an {arch} guest needs {name}, which is not on PATH; install it with: {INSTALL[name]}")
    return found


def aarch64_kernel_cmdline(extra: Sequence[str] = (), vcpus: int = 1) -> str:
    """The guest kernel command line on ``-M virt`` (pure): the console is the PL011
    ``ttyAMA0``, and the x86-only TSC flags are left out."""
    parts = ["console=ttyAMA0" if p == "console=ttyS0" else p for p in BASE_CMDLINE if not p.startswith("tsc=")]
    parts.append(f"possible_cpus={max(vcpus, 2)}")
    parts.extend(extra)
    return " ".join(parts)
