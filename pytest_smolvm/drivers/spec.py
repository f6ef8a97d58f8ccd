"""What one QEMU process is asked to run, gathered once per launch.

The QEMU driver builds a :class:`MachineSpec` from (config, image, VM directory,
accelerator, disk, NIC, launch mode); the argv builders (``qemu.qemu_argv`` for
``-M microvm``, ``hvf.virt_argv`` for ``-M virt``) are pure functions of it, so every value
has one source instead of being handed down through each builder's keywords.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .base import Nic


@dataclasses.dataclass(frozen=True)
class RamFile:
    """Guest RAM backed by a snapshot's memory file.

    ``shared`` for a snapshot template: the guest's writes must reach the file. Private
    (copy-on-write) for a clone, which also sets ``incoming``: QEMU waits for the migration
    stream that restores the device state, started over QMP.

    ``id`` names the backend, and so the RAM in a migration stream: ``mem`` for snapshots;
    a checkpoint of a cold-booted VM keeps the machine's own name (``microvm.ram``,
    ``mach-virt.ram`` on ``virt``: :data:`~.virt.RAM_IDS`), which
    QEMU allows for a backend given as ``memory-backend=`` (its migration-compatibility rule).
    """

    path: Path
    shared: bool = False
    incoming: bool = False
    id: str = "mem"


@dataclasses.dataclass(frozen=True)
class MachineSpec:
    """Everything a QEMU argv builder reads.

    ``nic``: a virtio-net device on the TAP descriptor QEMU inherits. ``runas`` (``uid:gid``)
    and ``chroot``: what QEMU drops to once every file, socket and descriptor is open.
    ``disk_fds`` (read-write, read-only) of ``disk``: QEMU reopens a disk by name when it
    (de)activates it around a migration, which it cannot do by path once chrooted and
    unprivileged; through an fd set it picks the inherited descriptor instead.
    """

    binary: str
    accel: str
    vcpus: int
    memory_mib: int
    kernel: Path
    initrd: Path
    cmdline: str
    control: Path
    disk: Path | None
    disk_format: str = "qcow2"
    disk_fds: tuple[int, int] | None = None
    qmp: Path | None = None
    ram: RamFile | None = None
    nic: Nic | None = None
    sandbox: bool = False
    runas: str | None = None
    chroot: Path | None = None
    #: The guest CPU model under TCG (None: :data:`~pytest_smolvm.cpumodel.DEFAULT_TCG_CPU`).
    cpu: str | None = None
    #: Read-only volumes (:mod:`pytest_smolvm.volumes`): inherited descriptors, in order.
    volume_fds: tuple[int, ...] = ()
    #: Start with the guest paused (``-S``): a restore that must never run the guest.
    paused: bool = False
    #: The QEMU machine type, which follows the image's architecture (:mod:`.virt`):
    #: ``microvm`` (x86-64, :func:`~.qemu.qemu_argv`) or ``virt`` (aarch64, :func:`~.virt.virt_argv`).
    machine: str = "microvm"
