"""Image recipes and their content digests (pure).

An image has two layers:

- the **base** (kernel ELF, virtio modules, busybox, ext4 rootfs) built from Debian packages
  by :mod:`pytest_smolvm.images.build`; its digest covers the recipe below, so changing the
  package list, suite or builder logic gives a new base;
- the **boot layer**, an initramfs holding the init scripts and the guest agent, derived from
  the base in milliseconds whenever the agent changes (:mod:`pytest_smolvm.images.initramfs`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib import resources
from typing import Final

from ..errors import ConfigError

#: Bumped when the builder makes different images from the same recipe. 2: the rootfs no
#: longer carries the build host's /etc/resolv.conf (issue 23).
BUILDER_VERSION: Final = 2

#: Modules the initramfs loads, in dependency order (all are modules in Debian's cloud kernel).
BOOT_MODULES: Final = ("virtio_ring", "virtio", "virtio_mmio", "virtio_blk", "virtio_console")
#: Loaded only when the VM has a NIC (``smolvm.net=1`` on the kernel command line).
NET_MODULES: Final = ("failover", "net_failover", "virtio_net")
#: Loaded only under Firecracker (``smolvm.vsock=1``): the agent's channel is AF_VSOCK there.
#: Optional in an image: builds before this list existed lack them (rebuild with --force).
VSOCK_MODULES: Final = ("vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport")

#: Debian architectures a recipe can target, and the kernel package each boots.
ARCHES: Final = ("amd64", "arm64")
KERNEL_PACKAGES: Final = {"amd64": "linux-image-cloud-amd64", "arm64": "linux-image-cloud-arm64"}

DEFAULT_PACKAGES: Final = (
    "python3", "openssh-server", "iproute2", "e2fsprogs", "procps", "ca-certificates",
)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What goes into an image's base layer.

    ``arch`` is the Debian architecture of the guest (``amd64`` or ``arm64``); use
    :func:`arm64_recipe` for an arm64 image (its kernel package differs too).
    ``rootfs_modules`` are kernel modules (with their dependencies) of the guest's kernel
    put into the rootfs for ``modprobe`` (:mod:`.kmods`); the initramfs never needs them.
    """

    name: str = "default"
    suite: str = "bookworm"
    kernel_package: str = "linux-image-cloud-amd64"
    packages: tuple[str, ...] = DEFAULT_PACKAGES
    rootfs_mib: int = 1024
    arch: str = "amd64"
    rootfs_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.arch not in ARCHES:
            raise ConfigError(f"invalid arch={self.arch!r}: expected one of {', '.join(ARCHES)}")

    def digest(self) -> str:
        fields = {**dataclasses.asdict(self), "name": None}
        if self.arch == "amd64":
            # amd64 images were built before ``arch`` existed: leaving it out keeps their
            # digests (and so every existing build) valid.
            del fields["arch"]
        if not self.rootfs_modules:
            del fields["rootfs_modules"]  # likewise: images built before it keep their digest
        blob = json.dumps({"builder": BUILDER_VERSION, **fields}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Recipe:
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields}
        for name in ("packages", "rootfs_modules"):
            if name in kwargs:
                kwargs[name] = tuple(kwargs[name])  # type: ignore[arg-type]
        return cls(**kwargs)  # type: ignore[arg-type]


def arm64_recipe(name: str = "default-arm64", **changes: object) -> Recipe:
    """The default recipe for arm64 guests (Debian arm64 packages, for QEMU ``-M virt`` on
    HVF or KVM): same packages, Debian's arm64 cloud kernel."""
    return dataclasses.replace(Recipe(name=name, arch="arm64", kernel_package=KERNEL_PACKAGES["arm64"]),
                               **changes)  # type: ignore[arg-type]


#: What L1 of the nested KVM harness (scripts/run-kvm-nested) runs besides the defaults: the
#: engine's runtime dependencies from Debian, QEMU, the network tools, and kvm_amd.
KVM_HOST_PACKAGES: Final = (
    "qemu-system-x86", "qemu-utils", "python3-pytest", "python3-pygments", "python3-filelock", "python3-paramiko",
    "python3-pyroute2", "python3-psutil", "python3-dnslib", "python3-idna", "nftables", "kmod",
)


#: Modules L1 loads: KVM, and what the network layer needs (TAPs, veths, the nftables
#: expressions of network/policy.py); Debian's cloud kernel builds them all as modules.
KVM_HOST_MODULES: Final = (
    "kvm_amd", "tun", "veth", "nf_tables", "nft_ct", "nft_connlimit", "nft_limit", "nft_masq", "nft_nat",
    "nft_chain_nat", "nft_fib_inet", "nft_fib_ipv4", "nft_reject_inet", "nft_objref", "nft_redir",
)


def kvm_host_recipe(name: str = "kvm-host") -> Recipe:
    """An image that can be a KVM host inside a TCG guest with emulated AMD-V (``cpu`` with
    ``+svm,+npt``): QEMU, the engine's dependencies, ``kvm_amd`` and the network modules."""
    return Recipe(name=name, packages=DEFAULT_PACKAGES + KVM_HOST_PACKAGES, rootfs_mib=2048,
                  rootfs_modules=KVM_HOST_MODULES)


STAGE1_INIT: Final = r"""#!/bin/sh
# smolvm stage 1 (initramfs, busybox): load virtio, mount the root disk, prepare the new root
# and hand over. Everything runs as busybox applets: under TCG each dynamically linked
# program costs 60-100 ms to start, a static applet a few.
mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
read up _ < /proc/uptime; echo "smolvm-init: stage 1 at ${up}s"
cmdline=" $(cat /proc/cmdline) "
case "$cmdline" in *" smolvm.canary=1 "*) echo "SMOLVM-CANARY-OK"; poweroff -f ;; esac
for m in __MODULES__; do
  insmod /lib/modules/$m.ko || echo "smolvm-init: insmod $m failed"
done
case "$cmdline" in *" smolvm.net=1 "*)
  for m in __NET_MODULES__; do insmod /lib/modules/$m.ko || echo "smolvm-init: insmod $m failed"; done ;;
esac
case "$cmdline" in *" smolvm.vsock=1 "*)
  for m in __VSOCK_MODULES__; do insmod /lib/modules/$m.ko || echo "smolvm-init: insmod $m failed"; done ;;
esac
i=0
while [ ! -b /dev/vda ]; do
  i=$((i+1))
  if [ $i -gt 1000 ]; then echo "smolvm-init: no root disk /dev/vda"; poweroff -f; fi
  sleep 0.01
done
read up _ < /proc/uptime; echo "smolvm-init: modules loaded at ${up}s"
mount -t ext4 -o noatime /dev/vda /newroot || { echo "smolvm-init: cannot mount /dev/vda"; poweroff -f; }
mount -t tmpfs -o mode=0755,size=16m run /newroot/run
mkdir -p /newroot/run/smolvm
cp -r /smolvm/. /newroot/run/smolvm/
cp /bin/busybox /newroot/run/smolvm/
mount --move /dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o mode=620,ptmxmode=666 devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 shm /newroot/dev/shm
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
echo smolvm > /newroot/proc/sys/kernel/hostname
ip link set lo up
# The agent and every command live in cgroup smolvm (init stays in the root): a fork bomb or
# memory hog meets pids.max / memory.max, and commands are born inside it (no per-command
# migration, which costs milliseconds under TCG). The agent protects itself with nice -20
# and an OOM score of -1000 (guest/agent.c).
cg=/newroot/sys/fs/cgroup
if mount -t cgroup2 -o favordynmods cgroup2 $cg 2>/dev/null || mount -t cgroup2 cgroup2 $cg 2>/dev/null; then
  echo "+memory +pids" > $cg/cgroup.subtree_control
  mkdir -p $cg/smolvm
  echo __PIDS_MAX__ > $cg/smolvm/pids.max
  while read k v u; do
    if [ "$k" = MemTotal: ]; then echo $(( (v - __MEM_RESERVE_KIB__) * 1024 )) > $cg/smolvm/memory.max; fi
  done < /newroot/proc/meminfo
fi
case "$cmdline" in *" smolvm.aslr=0 "*) echo 0 > /newroot/proc/sys/kernel/randomize_va_space ;; esac
exec switch_root /newroot /run/smolvm/busybox sh /run/smolvm/init.sh
"""

# PID 1 in the real root is busybox sh: while it waits for the agent it reaps every orphan,
# so the agent never has to (and never races its own children's exit statuses). The agent is
# one static binary (guest/agent.c): it needs nothing from the root filesystem.
AGENT_PATH: Final = "/run/smolvm/smolvm-agent"
STAGE2_INIT: Final = r"""read up _ < /proc/uptime; echo "smolvm-init: stage 2 at ${up}s"
__AGENT__
echo "smolvm-init: agent exited with status $?"
echo o > /proc/sysrq-trigger
""".replace("__AGENT__", AGENT_PATH)


def agent_sources() -> dict[str, bytes]:
    """What the boot layer's guest side is made from, by name: the agent's C source (the
    binary built from it is keyed by compiler too, see :mod:`.agentbin`) and stage 2."""
    pkg = resources.files("pytest_smolvm.guest")
    return {
        "agent.c": pkg.joinpath("agent.c").read_bytes(),
        "init.sh": STAGE2_INIT.encode(),
    }


#: Limits of the cgroup the agent and every command run in.
CMD_PIDS_MAX: Final = 1024
CMD_MEM_RESERVE_KIB: Final = 48 * 1024  # kept for the kernel, init and the agent


def stage1_init() -> bytes:
    return (STAGE1_INIT.replace("__MODULES__", " ".join(BOOT_MODULES))
            .replace("__PIDS_MAX__", str(CMD_PIDS_MAX))
            .replace("__MEM_RESERVE_KIB__", str(CMD_MEM_RESERVE_KIB))
            .replace("__NET_MODULES__", " ".join(NET_MODULES))
            .replace("__VSOCK_MODULES__", " ".join(VSOCK_MODULES)).encode())


def boot_digest(toolchain: str = "") -> str:
    """Digest of everything in the boot layer that does not come from the base: stage 1, the
    agent's source and compiler flags, stage 2, and ``toolchain`` (the agent compiler's
    identity, :func:`~.agentbin.boot_key`; empty for the host's own musl-gcc)."""
    from .agentbin import CFLAGS

    h = hashlib.sha256(stage1_init() + "\0".join(CFLAGS).encode())
    for name, data in sorted(agent_sources().items()):
        h.update(name.encode() + b"\0" + data)
    if toolchain:
        h.update(b"toolchain\0" + toolchain.encode())
    return h.hexdigest()[:16]
