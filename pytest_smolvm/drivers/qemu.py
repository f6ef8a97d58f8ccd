"""QEMU driver: ``-M microvm`` with virtio-mmio devices, on KVM, HVF or TCG.

The argv is built by pure functions (unit-tested) of one :class:`~.spec.MachineSpec`,
which the driver builds once per launch; process handling lives in :class:`QemuMachine`.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from .. import host
from ..config import VMConfig
from ..cpumodel import check_cpu_model
from ..errors import BootError, ConfigError
from ..images import Image
from ..paths import check_socket_path
from ..volumes import open_volumes, qemu_volume_args, volume_sizes
from .accel import accel_args, choose_accel
from .base import (
    TEMPLATE_FORMAT,
    TEMPLATE_MAC,
    Accel,
    Machine,
    Nic,
    Spawned,
    VMMProcess,
    guest_flags,
    spawn_vmm,
    vmm_uid,
    vmm_user,
)
from .disks import checked_disk_size, shared_disk
from .kernel import kernel_cmdline as kernel_cmdline
from .qmp import QMP
from .spec import MachineSpec, RamFile
from .virt import ARM64_TCG_CPU, RAM_IDS, aarch64_kernel_cmdline, host_arch, machine_type, qemu_for

CONTROL_PORT = "smolvm.ctl"
#: What ``-M microvm`` names its own RAM (QEMU's ``default-ram-id``; every machine's:
#: :data:`~.virt.RAM_IDS`): a checkpoint of a cold-booted VM restores into a backend of that name.
BUILTIN_RAM_ID = RAM_IDS["microvm"]
MIB = 1 << 20
#: Room for device state (and a stream's per-page headers) beyond guest RAM in a checkpoint.
STATE_SLACK = 64 * MIB
#: The control socket in a VM directory (the guest agent's virtio-serial port).
CONTROL_NAME = "ctl.sock"
#: QEMU's seccomp filter: no obsolete syscalls, no privilege changes, no spawning helpers,
#: no scheduler/affinity changes. Migrations use fd: URIs, so nothing needs to spawn.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
#: The filter when QEMU drops root itself (``-runas``): elevateprivileges=deny would kill it at
#: its own setuid(). Once it runs as an unprivileged user, set*id cannot gain anything and
#: exec (the other way up, through a setuid binary) stays denied by spawn=deny.
SANDBOX_DROPPED = "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny"


def _opt(path: Path | str) -> str:
    """A path inside a QEMU option string: a comma is written as two (QEMU's escaping)."""
    return str(path).replace(",", ",,")


def qemu_argv(spec: MachineSpec) -> list[str]:
    """Full QEMU ``-M microvm`` argv for one VM (pure)."""
    machine = "microvm" if spec.ram is None else f"microvm,memory-backend={spec.ram.id}"
    return [spec.binary, "-M", machine, *accel_args(spec.accel, spec.cpu), "-smp", str(spec.vcpus),
            "-m", str(spec.memory_mib), *guest_args(spec)]


def virt_argv(spec: MachineSpec) -> list[str]:
    """Full ``qemu-system-aarch64 -M virt`` argv for one VM (pure): the arm64 counterpart of
    :func:`qemu_argv`, same spec, same virtio-mmio devices; the one ``virt`` builder of HVF
    (Apple silicon), KVM (arm64 Linux) and TCG (``-cpu`` the spec's, else
    :data:`~.virt.ARM64_TCG_CPU`)."""
    if spec.accel not in ("hvf", "kvm", "tcg"):
        raise ConfigError(f"invalid accel={spec.accel!r}: expected hvf, kvm or tcg")
    machine = "virt,gic-version=max" if spec.accel == "tcg" else "virt"
    if spec.ram is not None:
        machine += f",memory-backend={spec.ram.id}"
    cpu = (spec.cpu or ARM64_TCG_CPU) if spec.accel == "tcg" else "host"
    return [spec.binary, "-M", machine, "-accel", spec.accel, "-cpu", cpu,
            "-smp", str(spec.vcpus), "-m", str(spec.memory_mib), *guest_args(spec)]


def guest_args(spec: MachineSpec) -> list[str]:
    """Everything of a QEMU argv after machine, accelerator, CPUs and memory size (pure).
    The same on every machine type (microvm, virt)."""
    return [*_boot_args(spec), *_disk_args(spec), *_nic_args(spec), *_ram_args(spec), *_monitor_args(spec),
            *_confinement_args(spec)]


def _boot_args(spec: MachineSpec) -> list[str]:
    """Kernel, console and control port. The serial console is QEMU's stdout, a pipe the
    engine caps (a file chardev would grow without limit under a guest's ``yes > /dev/console``)."""
    return [
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(spec.kernel), "-initrd", str(spec.initrd), "-append", spec.cmdline,
        "-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con",
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=ctl,path={_opt(spec.control)},server=on,wait=off",
        "-device", f"virtserialport,chardev=ctl,name={CONTROL_PORT}",
    ]


def _disk_args(spec: MachineSpec) -> list[str]:
    if spec.disk is None:
        return []
    cache = "unsafe" if spec.disk_format == "qcow2" else "writeback"
    # A VM's own overlay takes no image lock: nothing else opens it, and a checkpoint, which
    # reopens it read-only, would find the launch's read-write descriptor still holding the
    # write lock (QEMU closes a removed fd-set descriptor only while the guest runs).
    locking = ",file.locking=off" if spec.disk_format == "qcow2" else ""
    file = _opt(spec.disk)
    argv = []
    if spec.disk_fds is not None:
        argv += ["-add-fd", f"fd={spec.disk_fds[0]},set=1,opaque={file}", "-add-fd", f"fd={spec.disk_fds[1]},set=1"]
        file = "/dev/fdset/1"
    # Volumes after the root disk's device: the guest names disks in argv order (root is vda).
    return [*argv, "-drive", f"id=root,file={file},format={spec.disk_format},if=none,cache={cache},discard=unmap"
            f"{locking}",
            "-device", "virtio-blk-device,drive=root", *qemu_volume_args(spec.volume_fds)]


def _nic_args(spec: MachineSpec) -> list[str]:
    if spec.nic is None:
        return []
    return ["-netdev", f"tap,id=net0,fd={spec.nic.tap_fd}",
            "-device", f"virtio-net-device,netdev=net0,mac={spec.nic.mac}"]


def _ram_args(spec: MachineSpec) -> list[str]:
    if spec.ram is None:
        return []
    return ["-object", f"memory-backend-file,id={spec.ram.id},size={spec.memory_mib}M,mem-path={_opt(spec.ram.path)},"
                       f"share={'on' if spec.ram.shared else 'off'}"]


def _monitor_args(spec: MachineSpec) -> list[str]:
    """QMP, and waiting on it for a snapshot restore's migration stream."""
    argv = [] if spec.qmp is None else ["-qmp", f"unix:{_opt(spec.qmp)},server=on,wait=off"]
    if spec.ram is not None and spec.ram.incoming:
        argv += ["-incoming", "defer"]
    if spec.paused:
        argv.append("-S")
    return argv


def _confinement_args(spec: MachineSpec) -> list[str]:
    """Seccomp, then the chroot and user QEMU drops to once everything is open."""
    argv = ["-sandbox", SANDBOX_DROPPED if spec.runas else SANDBOX] if spec.sandbox else []
    if spec.chroot is not None:
        argv += ["-chroot", str(spec.chroot)]
    if spec.runas is not None:
        argv += ["-runas", spec.runas]
    return argv


class QemuMachine(VMMProcess):
    """One running QEMU process."""

    def __init__(self, proc: subprocess.Popen[bytes], accel: Accel, workdir: Path, disk: Path,
                 spawned: Spawned | None = None) -> None:
        super().__init__(proc, accel, workdir, disk, "qemu.log", spawned)
        self.control_path = workdir / CONTROL_NAME
        self.qmp_path = workdir / "qmp.sock"
        #: Checkpoints taken: each one moves the VM onto a new disk overlay.
        self.generation = 0
        #: How the guest's RAM appears in a migration stream: ``mem`` (a memory backend of
        #: ours, as snapshot clones have) or ``builtin`` (the machine's own RAM block).
        self.ram_layout = "builtin"
        #: (fd set, descriptor number in QEMU) of the active disk's read-write descriptor, when
        #: the disk came as an fd set. A checkpoint removes it once the layer is read-only: its
        #: open file description would otherwise keep the layer's write lock.
        self.rw_fd: tuple[int, int | None] | None = None

    def connect(self, timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise BootError(f"QEMU exited with status {self.exit_status()} before the control "
                                f"socket was ready: {self.diagnostics()}", self.console_tail())
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.control_path))
                return sock
            except OSError as exc:
                sock.close()
                if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                    raise BootError(f"cannot connect to {self.control_path}: {exc}") from exc
            if time.monotonic() > deadline:
                raise BootError(f"QEMU did not open its control socket within {timeout:.0f}s",
                                self.console_tail())
            time.sleep(0.002)



class QemuDriver:
    """Runs guests in QEMU microvm. ``accel`` is resolved once per driver instance."""

    name = "qemu"

    def __init__(self, binary: str | None = None, *, extra_cmdline: Sequence[str] = ()) -> None:
        found = binary or host.qemu_binary()
        if not found:
            raise ConfigError("backend 'qemu' needs qemu-system-x86_64; install it with: "
                              "apt-get install -y qemu-system-x86 qemu-utils")
        self.binary = found
        self._accel: dict[tuple[str, str], Accel] = {}
        #: Appended to the guest kernel command line (debugging: e.g. ``loglevel=7``).
        self.extra_cmdline = tuple(extra_cmdline)
        #: Kill QEMU when this process ends, however it ends (off only for --smolvm-keep-failed).
        self.die_with_parent = True
        #: As root: QEMU drops to :func:`~.base.vmm_user` and chroots to the VM directory once
        #: everything is open (``-runas``/``-chroot``).
        self.drop_privileges = True

    def select_accel(self, requested: str, image: Image) -> Accel:
        """Resolve ``auto``/``kvm``/``hvf``/``tcg`` to an accelerator that works here for
        ``image`` (whose architecture may not be the host's: then only TCG can run it)."""
        key = (requested, image.arch)
        if key not in self._accel:
            self._accel[key] = choose_accel(requested, self.binary_for(image), image)
        return self._accel[key]

    def binary_for(self, image: Image) -> str:
        """The QEMU that runs ``image``: this driver's for the host's architecture, else the
        system emulator of the image's (``qemu-system-aarch64`` for an arm64 image)."""
        if image.arch == (host_arch() or "amd64"):
            return self.binary
        return qemu_for(image.arch)

    def prepare_disk(self, config: VMConfig, image: Image, workdir: Path) -> tuple[Path, str]:
        """Create the VM's root disk; returns (path, qemu format)."""
        size = checked_disk_size(config, image)
        if config.disk_mode == "shared":
            return shared_disk(image, size), "raw"
        return create_overlay(image.rootfs, "raw", workdir / "disk.qcow2", size), "qcow2"

    def _cmdline(self, config: VMConfig, accel: Accel, image: Image) -> str:
        flags = [*guest_flags(config, accel), *self.extra_cmdline]
        if machine_type(image.arch) == "virt":
            return aarch64_kernel_cmdline(flags, config.vcpus)
        return kernel_cmdline(accel.name, host.host_tsc_khz(), flags, config.vcpus)

    def _sandbox(self, binary: str) -> bool:
        return sandbox_supported(binary)

    def _privilege_drop(self, workdir: Path) -> tuple[str, Path] | None:
        """(``runas``, ``chroot``): as root, QEMU drops to the VMM user inside ``workdir``."""
        user = vmm_user() if self.drop_privileges else None
        return None if user is None else (f"{user[1]}:{user[2]}", workdir)

    def _spec(self, config: VMConfig, image: Image, workdir: Path, accel: Accel, disk: Path | None,
              fmt: str = "qcow2", *, nic: Nic | None, ram: RamFile | None = None,
              disk_fds: tuple[int, int] | None = None, volume_fds: tuple[int, ...] = (),
              paused: bool = False) -> MachineSpec:
        """The one spec of a launch: sockets in ``workdir``, the disk, NIC and RAM file given."""
        if (nic is None) != (config.network == "none"):
            raise ConfigError(f"network={config.network!r} needs a NIC exactly when it is not 'none' "
                              f"(got {'none' if nic is None else nic.tap})")
        runas, chroot = self._privilege_drop(workdir) or (None, None)
        binary = self.binary_for(image)
        for name in (CONTROL_NAME, "qmp.sock"):  # macOS allows 103 bytes, Linux 107
            check_socket_path(workdir / name, "VM's control" if name == CONTROL_NAME else "VM's QMP")
        return MachineSpec(
            binary=binary, accel=accel.name, cpu=config.cpu, vcpus=config.vcpus, memory_mib=config.memory_mib,
            kernel=image.kernel, initrd=image.initrd, cmdline=self._cmdline(config, accel, image),
            control=workdir / CONTROL_NAME, disk=disk, disk_format=fmt, disk_fds=disk_fds, qmp=workdir / "qmp.sock",
            ram=ram, nic=nic, sandbox=self._sandbox(binary), runas=runas, chroot=chroot, volume_fds=volume_fds,
            paused=paused, machine=machine_type(image.arch))

    def _argv(self, spec: MachineSpec) -> list[str]:
        if spec.accel == "tcg":
            check_cpu_model(spec.binary, spec.cpu)
        return virt_argv(spec) if spec.machine == "virt" else qemu_argv(spec)

    def _start(self, config: VMConfig, image: Image, workdir: Path, accel: Accel, disk: Path, fmt: str = "qcow2",
               *, nic: Nic | None, ram: RamFile | None = None, paused: bool = False) -> QemuMachine:
        """Build the spec and start QEMU. Read-only volumes always go in as descriptors; when QEMU
        drops privileges, the root disk does too."""
        volume_fds = tuple(open_volumes(config.volumes))
        fds = None
        try:
            if self._privilege_drop(workdir):
                fds = (os.open(disk, os.O_RDWR | os.O_CLOEXEC), os.open(disk, os.O_RDONLY | os.O_CLOEXEC))
            spec = self._spec(config, image, workdir, accel, disk, fmt, nic=nic, ram=ram, disk_fds=fds,
                              volume_fds=volume_fds, paused=paused)
            return self._spawn(spec, accel, workdir, disk)
        finally:
            for fd in (*(fds or ()), *volume_fds):
                os.close(fd)

    def _spawn(self, spec: MachineSpec, accel: Accel, workdir: Path, disk: Path) -> QemuMachine:
        dropped = vmm_uid() if spec.runas is not None else None
        uid = os.geteuid() if dropped is None else dropped
        pass_fds = (*(spec.disk_fds or ()), *spec.volume_fds, *((spec.nic.tap_fd,) if spec.nic is not None else ()))
        spawned = spawn_vmm(self._argv(spec), workdir, driver="qemu", uid=uid, stderr_name="qemu.log",
                            pass_fds=pass_fds, watch=self.die_with_parent)
        machine = QemuMachine(spawned.proc, accel, workdir, disk, spawned)
        machine.ram_layout = "mem" if spec.ram is not None and spec.ram.id == "mem" else "builtin"
        if spec.disk_fds is not None:
            machine.rw_fd = (1, None)  # QEMU keeps a duplicate: its number comes from query-fdsets
        return machine

    def launch(self, config: VMConfig, image: Image, workdir: Path, nic: Nic | None = None) -> QemuMachine:
        accel = self.select_accel(config.accel, image)
        disk, fmt = self.prepare_disk(config, image, workdir)
        return self._start(config, image, workdir, accel, disk, fmt, nic=nic)

    # ------------------------------------------------------------- snapshots

    def snapshot_key(self, config: VMConfig, image: Image) -> str:
        """Identity of a snapshot: everything that shapes guest RAM and device state.

        The full argv with this VM's paths replaced by placeholders, plus the QEMU version
        and the image's boot identity. Anything that changes them gets a new snapshot.
        """
        accel = self.select_accel(config.accel, image)
        placeholder = Path("/SNAP")
        nic = None if config.network == "none" else Nic(3, "tap", TEMPLATE_MAC)  # fd: a placeholder
        fds = (4, 5) if self._privilege_drop(placeholder) else None  # placeholders, like the NIC's
        volume_fds = tuple(range(6, 6 + len(config.volumes)))  # placeholders too
        argv = self._argv(self._spec(config, image, placeholder, accel, placeholder / "disk.qcow2", "qcow2", nic=nic,
                                     ram=RamFile(placeholder / "mem"), disk_fds=fds, volume_fds=volume_fds))
        shape: dict[str, object] = {"argv": argv, "qemu": host.qemu_version(argv[0]), "image": image.id,
                                    "disk_size_mib": config.disk_size_mib, "format": TEMPLATE_FORMAT}
        if accel.name != "tcg":  # -cpu host: the state holds this CPU's features
            shape["host_cpu"] = host.cpu_identity()
        if config.volumes:  # sizes, not contents: the agent drops the device cache before mounting
            shape["volume_bytes"] = volume_sizes(config.volumes)
        blob = json.dumps(shape)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def launch_template(self, config: VMConfig, image: Image, workdir: Path, target: Path,
                        nic: Nic | None = None) -> QemuMachine:
        """Cold-boot a VM whose RAM (shared) and disk live in ``target``, to be snapshotted.
        Sockets and logs stay in ``workdir`` (short AF_UNIX paths)."""
        accel = self.select_accel(config.accel, image)
        disk, fmt = self.prepare_disk(config, image, target)
        return self._start(config, image, workdir, accel, disk, fmt, nic=nic, ram=RamFile(target / "mem", shared=True))

    def save_snapshot(self, machine: QemuMachine, target: Path) -> None:
        """Save device state to ``target/state`` (RAM is already in ``target/mem``), then stop
        the template for good: it must never run again, or it would change the shared RAM."""
        qmp = QMP(machine.qmp_path)
        try:
            qmp.command("migrate-set-capabilities",
                        capabilities=[{"capability": "x-ignore-shared", "state": True}])
            qmp.command("stop")
            qmp.send_file("state", target / "state", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            qmp.command("migrate", uri="fd:state")
            qmp.wait_migration(60)
        finally:
            qmp.close()
            machine.kill()

    def launch_clone(self, config: VMConfig, image: Image, snapshot: Path, workdir: Path,
                     nic: Nic | None = None) -> QemuMachine:
        """Restore a snapshot: private copy-on-write RAM, a fresh overlay on the snapshot's disk."""
        accel = self.select_accel(config.accel, image)
        overlay = create_overlay(snapshot / "disk.qcow2", "qcow2", workdir / "disk.qcow2")
        machine = self._start(config, image, workdir, accel, overlay, nic=nic,
                              ram=RamFile(snapshot / "mem", incoming=True))
        _restore(machine, snapshot / "state", ignore_shared=True, what="snapshot")
        return machine

    # ------------------------------------------------------------- checkpoints

    def checkpoint_shape(self, config: VMConfig, image: Image, ram: str) -> dict[str, object]:
        """What a checkpoint's RAM and device state depend on, by field (pure but for the
        accelerator and QEMU version probes): a clone must match every value. ``ram`` is how
        the VM's RAM is named in the migration stream: ``mem`` (a memory backend, as snapshot
        clones have) or ``builtin`` (a cold-booted VM)."""
        accel = self.select_accel(config.accel, image)
        shape: dict[str, object] = {
            "backend": self.name, "qemu": host.qemu_version(self.binary_for(image)), "accel": accel.name,
            "image": image.id,
            "vcpus": config.vcpus, "memory_mib": config.memory_mib, "cpu": config.cpu,
            "disk_size_mib": config.disk_size_mib, "nic": config.network != "none",
            "aslr": config.aslr, "volumes": [f"{v.target}={v.source}" for v in config.volumes], "ram": ram}
        if accel.name != "tcg":  # -cpu host: the state holds this CPU's features
            shape["host_cpu"] = host.cpu_identity()
        return shape

    def ram_layout(self, machine: Machine) -> str:
        assert isinstance(machine, QemuMachine)
        return machine.ram_layout

    def save_checkpoint(self, machine: Machine, config: VMConfig, image: Image, target: Path, *, ram: str,
                        timeout: float, nic: Nic | None = None) -> tuple[int, float]:
        """Save a running VM's state into ``target`` as a snapshot clones restore like a
        golden one (``mem``, ``state``, ``disk.qcow2``), and let it run on. ``ram``: how the
        VM's RAM is named (``mem``: a snapshot clone; ``builtin``: cold-booted). Returns the
        disk's virtual size in bytes and the seconds the guest was paused.

        The VM itself is paused only while its full state is streamed to a file
        (:meth:`_stream_out`). A helper QEMU, never running its guest, then loads that stream
        into a shared RAM file and saves its device state beside it, so every clone maps the
        RAM copy-on-write (restored in tens of ms, pages shared) instead of loading ~100 MB."""
        assert isinstance(machine, QemuMachine)
        stream = target / "stream"
        size, paused = self._stream_out(machine, target / "disk.qcow2", stream, timeout)
        # The guest cannot make the stream bigger than its RAM and devices; a QEMU that did
        # (one the guest took over) gets no helper to feed it to.
        _check_size(stream, config.memory_mib * MIB + STATE_SLACK, "the VM's migration stream")
        helper_dir = target / "helper"
        helper_dir.mkdir(mode=0o700)
        try:
            overlay = create_overlay(target / "disk.qcow2", "qcow2", helper_dir / "disk.qcow2", size_bytes=size,
                                     unsafe=True)
            # The helper shares the VM's TAP (a NIC's features must match its state), but a
            # stopped guest's NIC never reads or writes it (QEMU sends nothing while stopped).
            helper = self._start(config, image, helper_dir, self.select_accel(config.accel, image), overlay, nic=nic,
                                 ram=RamFile(target / "mem", shared=True, incoming=True, id=self._ram_id(ram, image)),
                                 paused=True)
            try:
                _restore(helper, stream, ignore_shared=False, what="checkpoint", run=False)
                qmp = QMP(helper.qmp_path, timeout=max(timeout, 10.0))
                try:
                    qmp.command("migrate-set-capabilities",
                                capabilities=[{"capability": "x-ignore-shared", "state": True}])
                    qmp.send_file("state", target / "state", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                    qmp.command("migrate", uri="fd:state")
                    qmp.wait_migration(timeout)
                finally:
                    qmp.close()
            finally:
                helper.kill()
            _check_size(target / "state", STATE_SLACK, "the checkpoint's device state")
        finally:
            shutil.rmtree(helper_dir, ignore_errors=True)
            stream.unlink(missing_ok=True)
        return size, paused

    def _ram_id(self, ram: str, image: Image) -> str:
        """The RAM block's name in a checkpoint's stream: ``mem`` (a snapshot clone's backend)
        or the machine's own RAM of a cold-booted VM (``microvm.ram``, ``mach-virt.ram``)."""
        return "mem" if ram == "mem" else RAM_IDS[machine_type(image.arch)]

    def _stream_out(self, machine: QemuMachine, layer: Path, stream: Path, timeout: float) -> tuple[int, float]:
        """Pause the VM, hard-link its disk overlay to ``layer`` and move the VM onto a new
        overlay on top of it (``blockdev-snapshot``: QEMU reopens the old layer read-only, so
        nothing writes it again), stream its RAM and device state to ``stream`` (every page:
        a snapshot clone's RAM is a private copy), resume it. The new overlay is made here and
        handed over as descriptors, so this works in QEMU's chroot without privileges."""
        qmp = QMP(machine.qmp_path, timeout=max(timeout, 10.0))
        stopped: float | None = None
        try:
            size = _disk_virtual_size(qmp.command("query-block"))
            machine.generation += 1
            new = machine.workdir / f"disk.{machine.generation}.qcow2"
            os.link(machine.disk_path, layer)
            create_overlay(layer, "qcow2", new, size_bytes=size, unsafe=True)
            qmp.command("stop")
            stopped = time.monotonic()
            _switch_overlay(qmp, machine, new)
            qmp.command("migrate-set-capabilities",
                        capabilities=[{"capability": "x-ignore-shared", "state": False}])
            qmp.command("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
            qmp.send_file("checkpoint", stream, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            qmp.command("migrate", uri="fd:checkpoint")
            qmp.wait_migration(timeout)
            qmp.command("cont")
            paused = time.monotonic() - stopped
            stopped = None
        except BootError as exc:
            raise BootError(f"saving a checkpoint of the VM failed: {exc}; QEMU said: "
                            f"{machine.diagnostics()}") from None
        finally:
            if stopped is not None and machine.alive():
                try:  # whatever failed, the VM runs on
                    qmp.command("cont")
                except (BootError, OSError):
                    pass
            qmp.close()
        return size, paused

    def launch_checkpoint(self, config: VMConfig, image: Image, checkpoint: Path, workdir: Path, *, ram: str,
                          disk_bytes: int, nic: Nic | None = None) -> QemuMachine:
        """Start a VM restored from a checkpoint, as a snapshot clone: its RAM file mapped
        privately, a fresh overlay on the checkpoint's disk layer."""
        accel = self.select_accel(config.accel, image)
        overlay = create_overlay(checkpoint / "disk.qcow2", "qcow2", workdir / "disk.qcow2",
                                 size_bytes=disk_bytes, unsafe=True)
        machine = self._start(config, image, workdir, accel, overlay, nic=nic,
                              ram=RamFile(checkpoint / "mem", incoming=True, id=self._ram_id(ram, image)))
        _restore(machine, checkpoint / "state", ignore_shared=True, what="checkpoint")
        return machine


def _switch_overlay(qmp: QMP, machine: QemuMachine, new: Path) -> None:
    """Move the paused VM's disk onto the overlay ``new`` (``blockdev-snapshot``), handed to
    QEMU as an fd set; the old layer becomes its read-only backing."""
    fdset: int | None = None
    added = []
    for flags in (os.O_RDWR, os.O_RDONLY):
        fd = os.open(new, flags | os.O_CLOEXEC)
        try:
            fdset, qemu_fd = qmp.add_fd(fd, fdset, opaque=f"{new.name}:{'rw' if flags == os.O_RDWR else 'ro'}")
            added.append(qemu_fd)
        finally:
            os.close(fd)
    assert fdset is not None
    node = f"cp{machine.generation}"
    qmp.command("blockdev-add", driver="qcow2", **{"node-name": node}, backing=None,
                file={"driver": "file", "filename": f"/dev/fdset/{fdset}", "locking": "off"},
                cache={"no-flush": True})
    qmp.command("blockdev-snapshot", node="root", overlay=node)
    machine.disk_path = new
    if machine.rw_fd is not None:  # closed once the guest runs again: the layer is read-only now
        fdset_id, rw = machine.rw_fd
        if rw is None:  # the launch's set: its read-write descriptor is the one with the opaque
            rw = _opaque_fd(qmp.command("query-fdsets"), fdset_id)
        qmp.command("remove-fd", **{"fdset-id": fdset_id, "fd": rw})
    machine.rw_fd = (fdset, added[0])


def _check_size(path: Path, limit: int, what: str) -> None:
    size = path.stat().st_size
    if size > limit:
        raise BootError(f"{what} ({path}) is {size} bytes, over the {limit} a guest of this size can produce; "
                        f"the checkpoint was not made")


def _opaque_fd(fdsets: object, fdset_id: int) -> int:
    """The descriptor of fd set ``fdset_id`` that carries an opaque string (``query-fdsets``)."""
    for found in fdsets if isinstance(fdsets, list) else []:
        if found.get("fdset-id") == fdset_id:
            for fd in found.get("fds", []):
                if "opaque" in fd:
                    return int(fd["fd"])
    raise BootError(f"QEMU reported no read-write descriptor in fd set {fdset_id} (query-fdsets)")


def _disk_virtual_size(blocks: object) -> int:
    """The root disk's virtual size from a ``query-block`` reply."""
    for dev in blocks if isinstance(blocks, list) else []:
        if dev.get("device") == "root" and "inserted" in dev:
            return int(dev["inserted"]["image"]["virtual-size"])
    raise BootError("QEMU reported no root disk (query-block)")


def _restore(machine: QemuMachine, state: Path, *, ignore_shared: bool, what: str, run: bool = True) -> None:
    """Load ``state`` into a QEMU started with ``-incoming defer`` and (``run``) let the guest
    run; kills the machine on failure."""
    try:
        qmp = QMP(machine.qmp_path)
        try:
            qmp.command("migrate-set-capabilities",
                        capabilities=[{"capability": "x-ignore-shared", "state": ignore_shared}])
            qmp.send_file("state", state, os.O_RDONLY)
            qmp.command("migrate-incoming", uri="fd:state")
            deadline = time.monotonic() + 30
            while (status := qmp.command("query-status")["status"]) == "inmigrate":
                if time.monotonic() > deadline:
                    raise BootError(f"{what} restore did not finish within 30s")
                time.sleep(0.002)
            if run and status != "running":
                qmp.command("cont")
        finally:
            qmp.close()
    except BaseException as exc:
        diag = machine.diagnostics()
        machine.kill()
        if isinstance(exc, BootError):
            if diag:
                raise BootError(f"{exc}; QEMU said: {diag}") from None
            raise
        if isinstance(exc, Exception):  # QEMU hung up on QMP as it failed (ConnectionResetError): say why
            raise BootError(f"{what} restore failed ({type(exc).__name__}: {exc}); QEMU said: "
                            f"{diag or '(nothing on stderr)'}") from exc
        raise


def create_overlay(backing: Path, backing_format: str, overlay: Path, size_mib: int | None = None, *,
                   size_bytes: int | None = None, unsafe: bool = False) -> Path:
    """A qcow2 overlay on ``backing`` (with its virtual size grown to ``size_mib`` if given).
    ``unsafe`` (``-u``, with ``size_bytes``): the backing is not opened, so a layer a running
    QEMU still holds (a checkpoint's) needs no lock."""
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", backing_format, "-b", str(backing), str(overlay)]
    if unsafe:
        argv.insert(2, "-u")
    if size_mib is not None:
        argv.append(f"{size_mib}M")
    elif size_bytes is not None:
        argv.append(str(size_bytes))
    res = subprocess.run(argv, capture_output=True, text=True)
    if res.returncode != 0:
        raise BootError(f"qemu-img could not create the disk overlay {overlay}: {res.stderr.strip()}")
    return overlay


@functools.cache
def sandbox_supported(binary: str) -> bool:
    """Whether this QEMU has seccomp (``-sandbox``): a build without it refuses the option."""
    try:
        res = subprocess.run([binary, "-sandbox", SANDBOX, "-M", "none", "-display", "none", "-nodefaults",
                              "-no-user-config", "-monitor", "none", "-S", "-qmp", "stdio"],
                             input=b'{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
                             capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0
