"""VMM drivers behind one Protocol (:mod:`.base`)."""

from __future__ import annotations

import socket
from pathlib import Path

from .. import host
from ..config import VMConfig
from ..errors import ConfigError
from .base import Accel, Driver, Machine


def firecracker_status(image_name: str = "default") -> tuple[bool, str]:
    """Whether the Firecracker backend can run here, and why (binary on PATH, KVM device,
    KVM canary boot of the image's kernel when QEMU is there to run it)."""
    from .firecracker import INSTALL_HINT

    binary = host.firecracker_binary()
    if not binary:
        return False, f"the firecracker binary is not on PATH; fix: {INSTALL_HINT}"
    usable, why = host.kvm_device_status()
    if not usable:
        return False, f"Firecracker needs KVM: {why}"
    qemu = host.qemu_binary()
    if qemu:
        from ..errors import ImageError
        from ..images import resolve
        from .accel import kvm_canary

        try:
            image = resolve(image_name)
        except ImageError as exc:
            return False, f"cannot run the KVM canary: {exc}"
        ok, reason = kvm_canary(qemu, image)
        if not ok:
            return False, f"Firecracker needs a working KVM: {why}; {reason}"
        why = reason
    return True, f"{binary} on KVM ({why})"


def connect_kept(workdir: Path, timeout: float = 10.0) -> socket.socket:
    """A control connection to the agent of a VM kept in ``workdir`` (``python -m pytest_smolvm
    shell``): the driver that made the directory knows its socket, so callers never name it."""
    from .firecracker import AGENT_VSOCK_PORT, VSOCK_NAME, vsock_connect
    from .qemu import CONTROL_NAME

    if (workdir / VSOCK_NAME).exists():
        return vsock_connect(workdir / VSOCK_NAME, AGENT_VSOCK_PORT, timeout=timeout)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(workdir / CONTROL_NAME))
    except OSError:
        sock.close()
        raise
    return sock


def default_driver(config: VMConfig) -> Driver:
    """The built-in driver for ``config.backend``.

    ``qemu``: QEMU (KVM or TCG; HVF on macOS). ``firecracker``: Firecracker, or ConfigError saying
    what is missing and how to fix it. ``auto``: Firecracker when its binary is on PATH and
    KVM works (canary boot), the VM's accelerator allows KVM, it has no network (TAPs are
    attached by the network layer) nor volumes and its image can carry the agent over vsock; else QEMU.
    """
    if config.backend == "firecracker":
        ok, why = firecracker_status(config.image)
        if not ok:
            raise ConfigError(f"invalid backend='firecracker': {why}; or use backend='qemu'")
        from .firecracker import FirecrackerDriver

        return FirecrackerDriver()
    if config.backend == "auto" and config.accel in ("auto", "kvm") and config.network == "none" \
            and not config.volumes and host.firecracker_binary():
        from .firecracker import FirecrackerDriver, guest_vsock_support

        if guest_vsock_support(config.image)[0] and firecracker_status(config.image)[0]:
            return FirecrackerDriver()
    if config.backend in ("auto", "qemu"):
        if host.is_macos():  # HVF, and -M virt on Apple silicon
            from .hvf import HvfQemuDriver

            return HvfQemuDriver()
        from .qemu import QemuDriver

        return QemuDriver()
    raise ConfigError(f"invalid backend={config.backend!r}: expected auto, qemu or firecracker")


__all__ = ["Accel", "Driver", "Machine", "default_driver", "firecracker_status"]
