"""Host capability probes: accelerators, binaries. Nothing here starts a VM."""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil


def qemu_binary() -> str | None:
    """Path of the QEMU system emulator for this host's architecture, if installed."""
    arch = platform.machine()
    name = {"x86_64": "qemu-system-x86_64", "amd64": "qemu-system-x86_64",
            "arm64": "qemu-system-aarch64", "aarch64": "qemu-system-aarch64"}.get(arch, "qemu-system-x86_64")
    return shutil.which(name)


def qemu_version(binary: str) -> str:
    """First line of ``qemu --version`` (used to key cached probe verdicts)."""
    return binary_version(binary)


@functools.cache
def binary_version(binary: str) -> str:
    """First line of ``<binary> --version`` ("unknown" if it cannot say)."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.splitlines()[0].strip() if out else "unknown"


def kvm_device_status() -> tuple[bool, str]:
    """Whether /dev/kvm can be opened, and a description of what it is."""
    dev = Path("/dev/kvm")
    if not dev.exists():
        return False, "/dev/kvm does not exist (no KVM module loaded, or not Linux)"
    if not os.access(dev, os.R_OK | os.W_OK):
        return False, "/dev/kvm exists but is not read/writable by this user (add the user to group 'kvm')"
    if Path("/sys/module/kvm_pvm").exists():
        return True, "/dev/kvm is provided by kvm_pvm (nested PVM, not hardware virtualisation)"
    return True, "/dev/kvm is available"


def is_macos() -> bool:
    return platform.system() == "Darwin"


@functools.lru_cache(maxsize=1)
def host_tsc_khz() -> int | None:
    """Host TSC frequency in kHz (the guest's TSC runs at the host's under TCG)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


def kernel_release() -> str:
    return platform.release()


CPU_IDENTITY_FIELDS = ("vendor_id", "cpu family", "model", "model name", "stepping", "flags", "Features",
                       "CPU implementer", "CPU part")


@functools.cache
def cpu_identity() -> str:
    """What a ``-cpu host`` guest's saved state depends on: this CPU (vendor, model, feature
    flags of the first processor) and the kernel, whose KVM decides which CPUID bits and MSRs
    a guest sees. A snapshot taken under KVM restored on another CPU (a cache shared between
    CI runners of different types) would give its guest instructions the CPU lacks."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0].splitlines():
            key, _, value = line.partition(":")
            if key.strip() in CPU_IDENTITY_FIELDS:
                fields[key.strip()] = value.strip()
    except OSError:
        fields["uname"] = " ".join(platform.uname())
    fields["kernel"] = platform.release()
    return hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest()[:16]


def process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, from Linux's /proc (None elsewhere).
    Only to compare stamps older versions wrote; new stamps are :func:`process_start_time`."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


#: Two start times of one process may differ by this much: psutil derives Linux start times
#: from the boot time, which the kernel recomputes (NTP) in whole seconds.
START_TOLERANCE = 1.0


def process_start_time(pid: int) -> float | None:
    """When ``pid`` started (seconds since the epoch, psutil's ``create_time``), or None if no
    such process runs. With the pid it names one process: a reused pid starts later.
    Works wherever psutil does (Linux, macOS), /proc or not."""
    if pid <= 0:
        return None
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def process_alive(pid: int, started: float | None) -> bool:
    """True if ``pid`` runs and (when ``started`` is known) is the process that started then.

    ``started`` is a :func:`process_start_time` (float); an int is a stamp older versions
    wrote (/proc clock ticks), compared where /proc exists and otherwise taken as alive, so a
    concurrent run's owner is never mistaken for dead."""
    now = process_start_time(pid)
    if now is None or started is None:
        return now is not None
    if isinstance(started, int):
        ticks = process_start_ticks(pid)
        return ticks is None or ticks == started
    return abs(now - started) <= START_TOLERANCE


def owner_stamp(pid: int) -> dict[str, Any]:
    """What names process ``pid`` in an owner record (owner.json, network leases).

    ``create_time`` is what this version compares. ``pid_start`` keeps the /proc clock ticks
    that older versions wrote and compare (None without /proc): an older pytest-smolvm running
    beside this one on the same host then still sees this run's owners as alive, instead of
    reaping a live run's VMs and namespaces."""
    return {"pid": pid, "pid_start": process_start_ticks(pid), "create_time": process_start_time(pid)}


def host_name() -> str:
    """This host's name as reports and owner records show it (``socket.gethostname()``)."""
    return socket.gethostname()


def stamp_alive(stamp: Mapping[str, Any]) -> bool:
    """Whether the process an owner record names still runs (see :func:`owner_stamp`)."""
    pid = stamp.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool):
        return False
    started = stamp.get("create_time")
    if not isinstance(started, float):
        started = stamp.get("pid_start")
    return process_alive(pid, started if isinstance(started, (int, float)) else None)


def host_arch() -> str:
    """This host's CPU architecture as ``platform.machine()`` spells it (x86_64, arm64, aarch64)."""
    return platform.machine()


def firecracker_binary() -> str | None:
    """Path of the ``firecracker`` binary, if on PATH."""
    return shutil.which("firecracker")


def kvm_module() -> str | None:
    """The kernel module behind /dev/kvm: ``kvm_pvm`` (nested PVM), ``kvm_intel``, ``kvm_amd``,
    or None when none is loaded."""
    for name in ("kvm_pvm", "kvm_intel", "kvm_amd", "kvm"):
        if Path(f"/sys/module/{name}").exists():
            return name
    return None


HVF_ENTITLEMENT = "com.apple.security.hypervisor"


def hvf_status(qemu: str | None = None) -> tuple[bool, str]:
    """Whether HVF can run guests here: macOS, ``kern.hv_support`` = 1, and a QEMU signed
    with the hypervisor entitlement (Homebrew's is). Off macOS: not applicable."""
    if not is_macos():
        return False, "not applicable (macOS only)"
    try:
        hv = subprocess.run(["sysctl", "-n", "kern.hv_support"], capture_output=True, text=True,
                            timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"cannot read sysctl kern.hv_support: {exc}"
    if hv != "1":
        return False, (f"kern.hv_support={hv or '?'}: this Mac (or the VM macOS runs in) offers no "
                       f"Hypervisor.framework")
    qemu = qemu or qemu_binary()
    if not qemu:
        return False, "QEMU is not installed (brew install qemu)"
    try:
        ent = subprocess.run(["codesign", "-d", "--entitlements", "-", "--xml", qemu], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"cannot read the entitlements of {qemu}: {exc}"
    if HVF_ENTITLEMENT not in ent.stdout + ent.stderr:
        return False, f"{qemu} is not signed with the {HVF_ENTITLEMENT} entitlement"
    return True, f"kern.hv_support=1, {qemu} has the {HVF_ENTITLEMENT} entitlement"


#: Where Debian puts e2fsprogs' tools, which an ordinary user's PATH often lacks.
SBIN_DIRS = "/usr/local/sbin:/usr/sbin:/sbin"


def find_tool(name: str) -> str | None:
    """``name`` on PATH, else in the sbin directories (mkfs.ext4, debugfs, e2fsck live there,
    and they need no root for image files of our own)."""
    return shutil.which(name) or shutil.which(name, path=SBIN_DIRS)
