"""Which accelerator a QEMU guest runs on, and the canary boot that proves KVM works.

``/dev/kvm`` opening is not enough: nested PVM hosts open it but cannot run Linux guests
(PLATFORM.md), so KVM is trusted only once the image's kernel has booted under it. The
verdict is cached per host kernel, QEMU version and image. Both drivers ask here: QEMU to
choose between KVM and TCG, Firecracker (KVM only) to refuse a host where KVM fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from pathlib import Path

from .. import host
from ..cpumodel import tcg_cpu
from ..errors import ConfigError
from ..images import Image
from ..paths import cache_dir
from ..timeouts import scaled
from .base import Accel
from .kernel import kernel_cmdline
from .virt import ARM64_TCG_CPU, aarch64_kernel_cmdline, host_arch, machine_type

CANARY_MARK = "SMOLVM-CANARY-OK"
CANARY_TIMEOUT = 8.0  # a working KVM reaches the initramfs in well under 1 s
#: Canary outcomes that prove nothing about KVM (a busy or slow host, a missing binary): never cached.
CANARY_TIMED_OUT, CANARY_NOT_RUN = "canary boot did not finish within", "cannot run "


def accel_args(accel: str, cpu: str | None = None) -> list[str]:
    """``-accel``/``-cpu`` for an accelerator (pure); ``cpu`` is the TCG model (None: default)."""
    if accel == "tcg":
        return ["-accel", "tcg", "-cpu", tcg_cpu(cpu)]
    if accel in ("kvm", "hvf"):
        return ["-accel", accel, "-cpu", "host"]
    raise ConfigError(f"invalid accel={accel!r}: expected kvm, hvf or tcg")


def _verdict_path(binary: str, image: Image) -> Path:
    key = json.dumps([host.kernel_release(), host.qemu_version(binary), image.digest])
    return cache_dir() / "probes" / f"kvm-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def kvm_canary(binary: str, image: Image, timeout: float | None = None) -> tuple[bool, str]:
    """Boot the image's kernel under KVM to its initramfs and back: (worked, why). Cached per
    host kernel, QEMU version and image, unless it timed out or could not run (that proves
    nothing: a slow nested host or a busy CI runner must not disable KVM for good)."""
    path = _verdict_path(binary, image)
    try:
        data = json.loads(path.read_text())
        return bool(data["ok"]), str(data["reason"])
    except (OSError, ValueError, KeyError):
        pass
    ok, reason = canary_boot(binary, image, "kvm", scaled(CANARY_TIMEOUT) if timeout is None else timeout)
    if not ok and (CANARY_TIMED_OUT in reason or reason.startswith(CANARY_NOT_RUN)):
        return ok, reason
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"ok": ok, "reason": reason, "at": time.time()}))
    os.replace(tmp, path)
    return ok, reason


def canary_argv(binary: str, image: Image, accel: str) -> list[str]:
    """The canary boot's argv (pure but for the host's TSC): the image's own machine type
    (``-M virt`` for an arm64 image, as on arm64 Linux under KVM)."""
    if machine_type(image.arch) == "virt":
        head = ["-M", "virt", *accel_args(accel, ARM64_TCG_CPU)]
        cmdline = aarch64_kernel_cmdline(["smolvm.canary=1"])
    else:
        tsc = host.host_tsc_khz() if accel == "tcg" else None
        head = ["-M", "microvm", *accel_args(accel)]
        cmdline = kernel_cmdline(accel, tsc, ["smolvm.canary=1"])
    return [binary, *head, "-smp", "1", "-m", "128", "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot", "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", cmdline,
            "-serial", "stdio"]


def canary_boot(binary: str, image: Image, accel: str, timeout: float) -> tuple[bool, str]:
    """Boot the image's kernel under ``accel`` to its initramfs, which prints the canary mark
    and powers off: (worked, why)."""
    argv = canary_argv(binary, image, accel)
    what = accel.upper()
    started = time.monotonic()
    try:
        res = subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return False, f"{what} {CANARY_TIMED_OUT} {timeout:.0f}s"
    except OSError as exc:
        return False, f"{CANARY_NOT_RUN}{binary}: {exc}"
    out = res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")
    if CANARY_MARK in out:
        return True, f"{what} canary boot succeeded in {time.monotonic() - started:.2f}s"
    last = [ln for ln in out.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
    return False, f"{what} canary boot failed (exit {res.returncode}): {last[0][:200]}"


def choose_accel(requested: str, binary: str, image: Image) -> Accel:
    """Pick the accelerator for ``requested`` (``auto``, ``kvm``, ``hvf`` or ``tcg``)."""
    if requested == "tcg":
        return Accel("tcg", "requested with accel=tcg")
    here = host_arch()
    if image.arch != here:
        if requested in ("kvm", "hvf"):
            raise ConfigError(f"invalid accel={requested!r} for image {image.name!r}: it is an {image.arch} image and "
                              f"this host is {here or platform.machine()}; {requested.upper()} runs only guests of "
                              f"the host's own architecture: use accel='tcg' (or 'auto')")
        return Accel("tcg", f"an {image.arch} guest on an {here or platform.machine()} host: TCG emulation")
    if requested == "hvf" or (requested == "auto" and host.is_macos()):
        if not host.is_macos():
            raise ConfigError("invalid accel='hvf': HVF exists only on macOS hosts")
        return Accel("hvf", "macOS Hypervisor.framework")
    usable, why = host.kvm_device_status()
    if usable:
        ok, reason = kvm_canary(binary, image)
        if ok:
            return Accel("kvm", reason)
        why = f"{why}; {reason}"
    if requested == "kvm":
        raise ConfigError(f"invalid accel='kvm': KVM does not work on this host: {why}")
    return Accel("tcg", f"KVM unusable ({why}); using TCG software emulation")

