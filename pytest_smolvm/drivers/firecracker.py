"""Firecracker driver: one ``firecracker --api-sock`` process per VM, configured over its REST API.

Firecracker needs KVM, boots the image's uncompressed ELF ``vmlinux`` directly, takes raw
disks only and has no virtio-serial: the guest agent's control stream is carried by
Firecracker's *hybrid vsock*. The host connects to the vsock device's Unix socket, writes
``CONNECT <port>\\n`` and reads ``OK <host port>\\n``; from then on the stream is the guest's
AF_VSOCK connection on ``<port>`` (see Firecracker's ``docs/vsock.md``).

The API payloads are built by pure functions whose field names and types follow Firecracker's
published API specification (``src/firecracker/swagger/firecracker.yaml``; 1.x). Process
handling, the API client (HTTP/1.1 over AF_UNIX, stdlib only) and the vsock handshake live
apart from them.

Paths a snapshot remembers (the root disk and the vsock socket) are given *relative* to the
VMM's working directory, which is the VM directory: a clone started in its own directory
therefore opens its own disk copy and binds its own socket, on every Firecracker version,
without needing the load-time overrides.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from .. import host
from ..config import VMConfig
from ..errors import BootError, ConfigError, ImageError
from ..images import Image
from ..images.recipe import VSOCK_MODULES
from .accel import kvm_canary
from .base import TEMPLATE_FORMAT, TEMPLATE_MAC, Accel, Nic, Spawned, VMMProcess, guest_flags, spawn_vmm
from .disks import checked_disk_size, shared_disk
from .kernel import kernel_cmdline

#: The guest port the agent listens on (AF_VSOCK) when it runs under Firecracker.
AGENT_VSOCK_PORT: Final = 1024
#: Guest context id; 0-2 are reserved (hypervisor, local, host).
GUEST_CID: Final = 3
ROOT_DRIVE_ID: Final = "rootfs"
NET_IFACE_ID: Final = "eth0"
#: Firecracker-specific kernel flags: reboot through the i8042 (Firecracker exits on it),
#: no PCI probing (every device is virtio-mmio), ``smolvm.vsock=1`` tells the guest's init
#: to load the vsock modules and the agent to listen on :data:`AGENT_VSOCK_PORT`.
FIRECRACKER_CMDLINE: Final = ("reboot=k", "pci=off", "i8042.noaux", "i8042.nomux", "i8042.dumbkbd",
                              "smolvm.vsock=1")
#: Files in the VM directory (relative names: see the module docstring).
DISK_NAME: Final = "disk.ext4"
VSOCK_NAME: Final = "v.sock"
API_NAME: Final = "api.sock"
CACHE_TYPES: Final = ("Unsafe", "Writeback")
ACTIONS: Final = ("FlushMetrics", "InstanceStart", "SendCtrlAltDel")
VM_STATES: Final = ("Paused", "Resumed")
SNAPSHOT_TYPES: Final = ("Full", "Diff")
MAX_VCPUS: Final = 32
API_TIMEOUT: Final = 10.0
INSTALL_HINT: Final = ("install a release binary from https://github.com/firecracker-microvm/firecracker/releases "
                       "as 'firecracker' on PATH (x86_64 or aarch64 Linux with KVM)")

Payload = dict[str, Any]
Request = tuple[str, str, Payload]

# ---------------------------------------------------------------- API payloads (pure)


def boot_source_payload(kernel: Path | str, boot_args: str, initrd: Path | str | None = None) -> Payload:
    """Body of ``PUT /boot-source`` (BootSource)."""
    body: Payload = {"kernel_image_path": str(kernel), "boot_args": boot_args}
    if initrd is not None:
        body["initrd_path"] = str(initrd)
    return body


def drive_payload(drive_id: str, path_on_host: Path | str, *, is_root_device: bool = False,
                  is_read_only: bool = False, cache_type: str = "Unsafe") -> Payload:
    """Body of ``PUT /drives/{drive_id}`` (Drive, virtio-block). ``Unsafe`` ignores the
    guest's flushes, like QEMU's ``cache=unsafe`` on an isolated overlay; a shared disk
    should use ``Writeback``."""
    if cache_type not in CACHE_TYPES:
        raise ConfigError(f"invalid cache_type={cache_type!r}: Firecracker accepts {', '.join(CACHE_TYPES)}")
    return {"drive_id": drive_id, "path_on_host": str(path_on_host), "is_root_device": is_root_device,
            "is_read_only": is_read_only, "cache_type": cache_type}


def machine_config_payload(vcpus: int, memory_mib: int, *, smt: bool = False,
                           track_dirty_pages: bool = False) -> Payload:
    """Body of ``PUT /machine-config`` (MachineConfiguration). Firecracker takes 1 or an
    even number of vCPUs, at most 32."""
    if not (vcpus == 1 or (vcpus % 2 == 0 and 2 <= vcpus <= MAX_VCPUS)):
        fix = "1" if vcpus < 1 else str(min(vcpus + 1, MAX_VCPUS))
        raise ConfigError(f"invalid vcpus={vcpus}: Firecracker runs 1 or an even number of vCPUs up to "
                          f"{MAX_VCPUS}; use vcpus={fix}")
    return {"vcpu_count": vcpus, "mem_size_mib": memory_mib, "smt": smt, "track_dirty_pages": track_dirty_pages}


def network_interface_payload(iface_id: str, host_dev_name: str, guest_mac: str | None = None) -> Payload:
    """Body of ``PUT /network-interfaces/{iface_id}`` (NetworkInterface): a TAP on the host."""
    body: Payload = {"iface_id": iface_id, "host_dev_name": host_dev_name}
    if guest_mac is not None:
        body["guest_mac"] = guest_mac
    return body


def vsock_payload(uds_path: Path | str, guest_cid: int = GUEST_CID) -> Payload:
    """Body of ``PUT /vsock`` (Vsock): the hybrid vsock's host-side Unix socket."""
    if guest_cid < 3:
        raise ConfigError(f"invalid guest_cid={guest_cid}: vsock context ids 0-2 are reserved; use 3 or more")
    return {"guest_cid": guest_cid, "uds_path": str(uds_path)}


def action_payload(action_type: str) -> Payload:
    """Body of ``PUT /actions`` (InstanceActionInfo)."""
    if action_type not in ACTIONS:
        raise ConfigError(f"invalid action_type={action_type!r}: expected one of {', '.join(ACTIONS)}")
    return {"action_type": action_type}


def vm_state_payload(state: str) -> Payload:
    """Body of ``PATCH /vm`` (Vm): pause before a snapshot, resume after."""
    if state not in VM_STATES:
        raise ConfigError(f"invalid state={state!r}: expected one of {', '.join(VM_STATES)}")
    return {"state": state}


def snapshot_create_payload(snapshot_path: Path | str, mem_file_path: Path | str,
                            snapshot_type: str = "Full") -> Payload:
    """Body of ``PUT /snapshot/create`` (SnapshotCreateParams); the VM must be paused."""
    if snapshot_type not in SNAPSHOT_TYPES:
        raise ConfigError(f"invalid snapshot_type={snapshot_type!r}: expected one of {', '.join(SNAPSHOT_TYPES)}")
    return {"snapshot_path": str(snapshot_path), "mem_file_path": str(mem_file_path),
            "snapshot_type": snapshot_type}


def snapshot_load_payload(snapshot_path: Path | str, mem_file_path: Path | str, *, resume_vm: bool = True,
                          network_overrides: Sequence[tuple[str, str]] = (),
                          vsock_uds_path: Path | str | None = None) -> Payload:
    """Body of ``PUT /snapshot/load`` (SnapshotLoadParams), guest memory mapped privately
    from a file (``mem_backend`` File). ``network_overrides`` are (iface_id, TAP) pairs for a
    clone's own TAP; ``vsock_uds_path`` moves the vsock socket (newer Firecracker only: this
    driver uses relative paths instead and leaves it out)."""
    body: Payload = {"snapshot_path": str(snapshot_path),
                     "mem_backend": {"backend_type": "File", "backend_path": str(mem_file_path)},
                     "resume_vm": resume_vm}
    if network_overrides:
        body["network_overrides"] = [{"iface_id": i, "host_dev_name": tap} for i, tap in network_overrides]
    if vsock_uds_path is not None:
        body["vsock_override"] = {"uds_path": str(vsock_uds_path)}
    return body


def firecracker_cmdline(config: VMConfig, accel: Accel) -> str:
    """The guest kernel command line under Firecracker (pure)."""
    return kernel_cmdline(accel.name, None, [*guest_flags(config, accel), *FIRECRACKER_CMDLINE], config.vcpus)


def boot_requests(config: VMConfig, image: Image, accel: Accel, *, disk: Path | str = DISK_NAME,
                  vsock: Path | str = VSOCK_NAME, tap: str | None = None, guest_mac: str | None = None,
                  track_dirty_pages: bool = False) -> list[Request]:
    """The API calls that configure and start one VM, in order: (method, path, body) (pure).

    The root disk is a plain virtio-block device that the initramfs mounts, so it is not
    Firecracker's "root device" (that would add ``root=`` to the command line).
    """
    if (tap is None) != (config.network == "none"):
        raise ConfigError(f"invalid network={config.network!r} for Firecracker: "
                          + ("a networked VM needs a TAP device from the network layer"
                             if tap is None else "network='none' must not get a TAP device"))
    cache = "Writeback" if config.disk_mode == "shared" else "Unsafe"
    reqs: list[Request] = [
        ("PUT", "/machine-config", machine_config_payload(config.vcpus, config.memory_mib,
                                                          track_dirty_pages=track_dirty_pages)),
        ("PUT", "/boot-source", boot_source_payload(image.kernel, firecracker_cmdline(config, accel), image.initrd)),
        ("PUT", f"/drives/{ROOT_DRIVE_ID}", drive_payload(ROOT_DRIVE_ID, disk, cache_type=cache)),
        ("PUT", "/vsock", vsock_payload(vsock)),
    ]
    if tap is not None:
        reqs.append(("PUT", f"/network-interfaces/{NET_IFACE_ID}",
                     network_interface_payload(NET_IFACE_ID, tap, guest_mac)))
    reqs.append(("PUT", "/actions", action_payload("InstanceStart")))
    return reqs


def config_file(requests: Sequence[Request]) -> Payload:
    """The same configuration as one ``--config-file`` document (FullVmConfiguration)."""
    doc: Payload = {}
    for method, path, body in requests:
        if method != "PUT" or path == "/actions":
            continue
        top = path.strip("/").split("/", 1)[0]
        if top in ("drives", "network-interfaces"):
            doc.setdefault(top, []).append(body)
        else:
            doc[top] = body
    return doc


def firecracker_argv(binary: str, api_sock: Path, *, vm_id: str | None = None,
                     config_file: Path | None = None, log_path: Path | None = None,
                     level: str = "Warning") -> list[str]:
    """Full argv of one Firecracker process (pure)."""
    argv = [binary, "--api-sock", str(api_sock)]
    if vm_id is not None:
        argv += ["--id", vm_id]
    if config_file is not None:
        argv += ["--config-file", str(config_file)]
    if log_path is not None:
        argv += ["--log-path", str(log_path), "--level", level]
    return argv


# ---------------------------------------------------------------- API client


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over an AF_UNIX stream socket (Firecracker's API transport)."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class FirecrackerAPI:
    """A client of one Firecracker API socket. Every failure raises :class:`BootError`
    naming the call and Firecracker's ``fault_message``."""

    def __init__(self, path: Path, timeout: float = API_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout

    def request(self, method: str, url: str, body: Payload | None = None) -> Payload | None:
        """Send one request; return the decoded JSON reply (None for 204 No Content)."""
        conn = _UnixHTTPConnection(self.path, self.timeout)
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, url, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise BootError(f"Firecracker API {method} {url} on {self.path} failed: {exc}") from exc
        finally:
            conn.close()
        try:
            reply = json.loads(raw) if raw.strip() else None
        except ValueError:
            reply = {"fault_message": raw[:500].decode(errors="replace")}
        if not 200 <= resp.status < 300:
            fault = reply.get("fault_message") if isinstance(reply, dict) else reply
            raise BootError(f"Firecracker API {method} {url} returned {resp.status}: {fault} "
                            f"(body sent: {json.dumps(body)})")
        return reply if isinstance(reply, dict) else None

    def wait_ready(self, alive: Any, timeout: float) -> None:
        """Wait until the API socket answers ``GET /`` (the process may still be starting)."""
        deadline = time.monotonic() + timeout
        while True:
            if not alive():
                raise BootError(f"Firecracker exited before its API socket {self.path} was ready")
            if self.path.exists():
                try:
                    self.request("GET", "/")
                    return
                except BootError:
                    pass
            if time.monotonic() > deadline:
                raise BootError(f"Firecracker did not open its API socket {self.path} within {timeout:.0f}s")
            time.sleep(0.005)


# ---------------------------------------------------------------- hybrid vsock (host side)


def vsock_connect(uds_path: Path, port: int, timeout: float) -> socket.socket:
    """One attempt at a host-initiated hybrid-vsock connection: ``CONNECT <port>\\n``, then
    ``OK <n>\\n``. Returns the connected stream, positioned right after the ``OK`` line.
    Raises ConnectionError when nobody listens on ``port`` in the guest (Firecracker then
    closes the stream) and OSError when the socket itself is unreachable."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(str(uds_path))
        sock.sendall(f"CONNECT {port}\n".encode())
        line = b""
        # Byte by byte: whatever follows the newline already belongs to the agent's stream.
        while not line.endswith(b"\n"):
            ch = sock.recv(1)
            if not ch:
                raise ConnectionError(f"vsock port {port} refused the connection (nothing listens in the guest)")
            line += ch
            if len(line) > 64:
                raise ConnectionError(f"unexpected hybrid-vsock reply {line!r}")
        if not line.startswith(b"OK "):
            raise ConnectionError(f"unexpected hybrid-vsock reply {line!r}")
        sock.settimeout(None)
        return sock
    except BaseException:
        sock.close()
        raise


class FirecrackerMachine(VMMProcess):
    """One running Firecracker process."""

    def __init__(self, proc: subprocess.Popen[bytes], accel: Accel, workdir: Path, disk: Path,
                 port: int = AGENT_VSOCK_PORT, spawned: Spawned | None = None) -> None:
        super().__init__(proc, accel, workdir, disk, "firecracker.log", spawned)
        self.api_path = workdir / API_NAME
        self.vsock_path = workdir / VSOCK_NAME
        self.port = port
        self.api = FirecrackerAPI(self.api_path)

    def connect(self, timeout: float) -> socket.socket:
        """Connect to the guest agent through the hybrid vsock, retrying until it listens."""
        deadline = time.monotonic() + timeout
        last = "no attempt"
        while True:
            if not self.alive():
                raise BootError(f"Firecracker exited with status {self.exit_status()} before the guest agent "
                                f"listened on vsock port {self.port}: {self.diagnostics()}", self.console_tail())
            try:
                return vsock_connect(self.vsock_path, self.port, timeout=max(1.0, deadline - time.monotonic()))
            except ConnectionError as exc:
                last = str(exc)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                    raise BootError(f"cannot connect to {self.vsock_path}: {exc}") from exc
                last = str(exc)
            if time.monotonic() > deadline:
                raise BootError(f"the guest agent did not accept vsock port {self.port} within {timeout:g}s "
                                f"({last})", self.console_tail())
            time.sleep(0.01)



# ---------------------------------------------------------------- the driver


def guest_vsock_support(image: Image | str) -> tuple[bool, str]:
    """Whether ``image``'s guest can serve the agent over vsock, and if not what is missing:
    the vsock kernel modules in the image, and an agent that listens on AF_VSOCK."""
    if isinstance(image, str):
        from ..errors import SmolVMError
        from ..images import resolve

        try:
            image = resolve(image)
        except SmolVMError as exc:
            return False, str(exc)
    from .virt import host_arch

    if image.arch != host_arch():  # backend=auto then picks QEMU, which emulates it
        return False, f"image {image.name!r} is {image.arch}: Firecracker runs only this host's architecture"
    missing = [m for m in VSOCK_MODULES if not (image.path / "modules" / f"{m}.ko").exists()]
    if missing:
        return False, (f"the image has no vsock kernel modules ({', '.join(missing)}); rebuild it with: "
                       f"python -m pytest_smolvm image build --force")
    from importlib import resources

    agent = resources.files("pytest_smolvm.guest").joinpath("agent.c").read_text()
    if "AF_VSOCK" not in agent:
        return False, (f"this version's guest agent listens on virtio-serial only, not on AF_VSOCK port "
                       f"{AGENT_VSOCK_PORT}; use backend='qemu'")
    return True, "vsock modules in the image, agent listens on AF_VSOCK"



def firecracker_version(binary: str) -> str:
    """First line of ``firecracker --version`` (keys snapshots: their format is per version)."""
    return host.binary_version(binary)


def copy_disk(source: Path, target: Path, size_mib: int | None = None) -> Path:
    """A private raw copy of ``source`` (Firecracker has no copy-on-write disk format):
    a reflink where the filesystem can, else a sparse copy."""
    tmp = target.with_name(target.name + ".tmp")
    res = subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(source), str(tmp)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise BootError(f"could not copy the disk {source} to {tmp}: {res.stderr.strip()}")
    if size_mib is not None and tmp.stat().st_size < size_mib << 20:
        os.truncate(tmp, size_mib << 20)
    os.replace(tmp, target)
    return target


class FirecrackerDriver:
    """Runs guests in Firecracker on KVM. Raises :class:`ConfigError` when the binary is missing.

    A ``nic`` from the network layer is attached by its TAP *name*: Firecracker opens the TAP
    itself (it cannot inherit a descriptor), so it must run in the TAP's network namespace
    and nothing else may hold a single-queue TAP open.
    """

    name = "firecracker"

    def __init__(self, binary: str | None = None, *, extra_cmdline: Sequence[str] = ()) -> None:
        found = binary or host.firecracker_binary()
        if not found:
            raise ConfigError(f"backend 'firecracker' needs the firecracker binary, which is not on PATH; "
                              f"{INSTALL_HINT}")
        self.binary = found
        self.extra_cmdline = tuple(extra_cmdline)
        self.die_with_parent = True
        self._accel: dict[str, Accel] = {}

    def select_accel(self, requested: str, image: Image) -> Accel:
        """Firecracker runs on KVM only; ``auto`` and ``kvm`` both mean KVM, proven by the canary."""
        if requested not in self._accel:
            if requested not in ("auto", "kvm"):
                raise ConfigError(f"invalid accel={requested!r} for backend 'firecracker': Firecracker runs on "
                                  f"KVM only; use accel='kvm' (or 'auto'), or backend='qemu' for {requested}")
            usable, why = host.kvm_device_status()
            if not usable:
                raise ConfigError(f"backend 'firecracker' needs KVM: {why}")
            qemu = host.qemu_binary()
            if qemu:  # the same canary the QEMU driver trusts; without QEMU, trust the device
                ok, reason = kvm_canary(qemu, image)
                if not ok:
                    raise ConfigError(f"backend 'firecracker' needs a working KVM: {why}; {reason}")
                why = reason
            self._accel[requested] = Accel("kvm", f"Firecracker on KVM ({why})")
        return self._accel[requested]

    def _check_image(self, image: Image) -> None:
        ok, why = guest_vsock_support(image)
        if not ok:
            raise ImageError(f"backend 'firecracker' cannot reach the guest agent of image {image.name!r}: {why}")

    def prepare_disk(self, config: VMConfig, image: Image, workdir: Path) -> Path:
        """The VM's raw root disk: a private copy (isolated) or the shared disk (shared)."""
        size = checked_disk_size(config, image)
        if config.disk_mode == "shared":
            return shared_disk(image, size)
        return copy_disk(image.rootfs, workdir / DISK_NAME, size)

    def _spawn(self, accel: Accel, workdir: Path, disk: Path) -> FirecrackerMachine:
        (workdir / "firecracker.log").touch()
        argv = firecracker_argv(self.binary, workdir / API_NAME, vm_id=workdir.name[-60:],
                                log_path=workdir / "firecracker.log")
        # Firecracker's jailer (chroot, uid drop, cgroups) is not used: left for later.
        spawned = spawn_vmm(argv, workdir, driver="firecracker", uid=os.geteuid(), stderr_name=None,
                            watch=self.die_with_parent)
        machine = FirecrackerMachine(spawned.proc, accel, workdir, disk, spawned=spawned)
        try:
            machine.api.wait_ready(machine.alive, API_TIMEOUT)
        except BaseException:
            machine.kill()
            raise
        return machine

    def _configure(self, machine: FirecrackerMachine, requests: Sequence[Request]) -> None:
        try:
            for method, url, body in requests:
                machine.api.request(method, url, body)
        except BaseException as exc:
            diag = machine.diagnostics()
            machine.kill()
            if isinstance(exc, BootError) and diag:
                raise BootError(f"{exc}; Firecracker said: {diag}", machine.console_tail()) from None
            raise

    def _requests(self, config: VMConfig, image: Image, accel: Accel, disk: str | Path,
                  nic: Nic | None) -> list[Request]:
        if config.volumes:
            raise ConfigError("invalid volumes: the Firecracker backend has no read-only volumes yet; "
                              "use backend='qemu'")
        reqs = boot_requests(config, image, accel, disk=disk, tap=nic.tap if nic else None,
                             guest_mac=nic.mac if nic else None)
        if self.extra_cmdline:
            boot = reqs[1][2]
            boot["boot_args"] = " ".join([boot["boot_args"], *self.extra_cmdline])
        return reqs

    def launch(self, config: VMConfig, image: Image, workdir: Path, nic: Nic | None = None) -> FirecrackerMachine:
        accel = self.select_accel(config.accel, image)
        self._check_image(image)
        disk = self.prepare_disk(config, image, workdir)
        # An isolated disk sits in the VM directory (the VMM's cwd): relative, like a snapshot's.
        disk_ref: str | Path = DISK_NAME if disk.parent == workdir else disk
        machine = self._spawn(accel, workdir, disk)
        self._configure(machine, self._requests(config, image, accel, disk_ref, nic))
        return machine

    # ------------------------------------------------------------- snapshots

    def snapshot_key(self, config: VMConfig, image: Image) -> str:
        """Identity of a snapshot: the configuration calls, the Firecracker version and the image."""
        accel = self.select_accel(config.accel, image)
        nic = None if config.network == "none" else Nic(-1, "tap", TEMPLATE_MAC)  # a placeholder
        reqs = self._requests(config, image, accel, DISK_NAME, nic)
        blob = json.dumps({"requests": reqs, "firecracker": firecracker_version(self.binary), "image": image.id,
                           "disk_size_mib": config.disk_size_mib, "format": TEMPLATE_FORMAT,
                           "host_cpu": host.cpu_identity()},
                          sort_keys=True)
        return "fc-" + hashlib.sha256(blob.encode()).hexdigest()[:17]

    def launch_template(self, config: VMConfig, image: Image, workdir: Path, target: Path,
                        nic: Nic | None = None) -> FirecrackerMachine:
        """Cold-boot a template whose disk lives in ``target`` (seen as ``disk.ext4`` in ``workdir``)."""
        accel = self.select_accel(config.accel, image)
        self._check_image(image)
        disk = copy_disk(image.rootfs, target / DISK_NAME, config.disk_size_mib)
        (workdir / DISK_NAME).symlink_to(disk)
        machine = self._spawn(accel, workdir, disk)
        self._configure(machine, self._requests(config, image, accel, DISK_NAME, nic))
        return machine

    def save_snapshot(self, machine: FirecrackerMachine, target: Path) -> None:
        """Pause the template, write ``target/state`` and ``target/mem``, and stop it for good."""
        try:
            machine.api.request("PATCH", "/vm", vm_state_payload("Paused"))
            machine.api.request("PUT", "/snapshot/create",
                                snapshot_create_payload(target / "state", target / "mem"))
        finally:
            machine.kill()

    def launch_clone(self, config: VMConfig, image: Image, snapshot: Path, workdir: Path,
                     nic: Nic | None = None) -> FirecrackerMachine:
        """Restore a snapshot: guest memory mapped privately, its own copy of the snapshot's disk."""
        accel = self.select_accel(config.accel, image)
        disk = copy_disk(snapshot / DISK_NAME, workdir / DISK_NAME)
        machine = self._spawn(accel, workdir, disk)
        overrides = [(NET_IFACE_ID, nic.tap)] if nic else []
        self._configure(machine, [("PUT", "/snapshot/load",
                                   snapshot_load_payload(snapshot / "state", snapshot / "mem",
                                                         network_overrides=overrides))])
        return machine
