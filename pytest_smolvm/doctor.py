"""``python -m pytest_smolvm doctor``: which backend x accelerator works on this host, and why not.

Probing (binaries, /dev/kvm, canary boots) is kept apart from judging: :func:`collect`
gathers a :class:`Probes`, and :func:`verdicts` (pure) turns it into one
:class:`Verdict` per backend and accelerator, each with the command that fixes it.
"""

from __future__ import annotations

import dataclasses
import platform
from typing import TYPE_CHECKING

from . import host
from .errors import SmolVMError

if TYPE_CHECKING:
    from .images import Image

APT_QEMU = "apt-get install -y qemu-system-x86 qemu-utils"
BREW_QEMU = "brew install qemu"
BUILD_IMAGE = "python -m pytest_smolvm image build"


@dataclasses.dataclass(frozen=True)
class Probes:
    """What :func:`collect` found out about this host. ``None`` canaries were not run."""

    system: str = "Linux"
    arch: str = "x86_64"
    qemu: str | None = None
    qemu_version: str = ""
    image: str | None = None
    image_error: str = ""
    kvm_device: tuple[bool, str] = (False, "/dev/kvm does not exist")
    kvm_module: str | None = None
    kvm_canary: tuple[bool, str] | None = None
    tcg_canary: tuple[bool, str] | None = None
    hvf: tuple[bool, str] = (False, "not applicable (macOS only)")
    firecracker: str | None = None
    firecracker_version: str = ""
    guest_vsock: tuple[bool, str] = (False, "not checked")
    builder_missing: tuple[str, ...] = ()
    network: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One line of the report. ``works`` is None when the combination does not apply here."""

    what: str
    works: bool | None
    detail: str
    fix: str = ""

    def render(self) -> str:
        if self.works:
            text = f"works ({self.detail})"
        elif self.works is None:
            text = f"not applicable ({self.detail})"
        else:
            text = self.detail
        return f"{self.what}: {text}" + (f"; fix: {self.fix}" if self.fix else "")


def verdicts(p: Probes) -> list[Verdict]:
    """One verdict per backend x accelerator, then what ``auto`` picks (pure)."""
    kvm = _qemu_kvm(p)
    found = [_qemu_tcg(p), kvm, _qemu_hvf(p), _firecracker(p, kvm)]
    return [*found, _auto(p, found)]


def _macos(p: Probes) -> bool:
    return p.system == "Darwin"


def _install_qemu(p: Probes) -> str:
    return BREW_QEMU if _macos(p) else APT_QEMU


def _qemu_tcg(p: Probes) -> Verdict:
    """The baseline, proven by booting the image's kernel to its initramfs."""
    if not p.qemu:
        qemu_name = "qemu-system-aarch64" if p.arch in ("arm64", "aarch64") else "qemu-system-x86_64"
        return Verdict("qemu + tcg", False, f"{qemu_name} not found on PATH", _install_qemu(p))
    if p.image is None:
        return Verdict("qemu + tcg", False, f"no guest image to boot ({p.image_error})", BUILD_IMAGE)
    if p.tcg_canary is None or not p.tcg_canary[0]:
        why = p.tcg_canary[1] if p.tcg_canary else "the TCG canary was not run"
        return Verdict("qemu + tcg", False, f"{p.qemu} ({p.qemu_version}): {why}",
                       f"{BUILD_IMAGE} --force (if the image is damaged), or reinstall QEMU: {_install_qemu(p)}")
    return Verdict("qemu + tcg", True, f"{p.tcg_canary[1]}; {p.qemu_version}")


def _qemu_kvm(p: Probes) -> Verdict:
    """Opening /dev/kvm is not enough (nested PVM opens it, runs no Linux guest): the canary decides."""
    kvm_ok, kvm_why = p.kvm_device
    module = p.kvm_module or "?"
    if _macos(p):
        return Verdict("qemu + kvm", None, "Linux only; macOS has HVF")
    if not kvm_ok:
        if "not read/writable" in kvm_why:
            fix = "sudo usermod -aG kvm $USER (then log in again), or chmod 666 /dev/kvm"
        else:
            fix = ("sudo modprobe kvm_intel (or kvm_amd) after enabling VT-x/AMD-V in the firmware, or use a "
                   "cloud instance with nested virtualisation; accel=auto falls back to TCG meanwhile")
        return Verdict("qemu + kvm", False, kvm_why, fix)
    if p.kvm_canary is None:
        return Verdict("qemu + kvm", False, f"/dev/kvm present ({module}) but the canary could not run "
                       f"({'no QEMU' if not p.qemu else p.image_error or 'no image'})",
                       _install_qemu(p) if not p.qemu else BUILD_IMAGE)
    if not p.kvm_canary[0]:
        fix = ("none on this host: kvm_pvm (nested PVM) cannot run Linux guests; run on hardware "
               "virtualisation (VT-x/AMD-V). accel=auto uses TCG here" if p.kvm_module == "kvm_pvm" else
               "check dmesg for KVM errors; accel=auto uses TCG meanwhile")
        return Verdict("qemu + kvm", False, f"/dev/kvm present ({module}) but canary failed: {p.kvm_canary[1]}", fix)
    return Verdict("qemu + kvm", True, f"/dev/kvm ({module}); {p.kvm_canary[1]}")


def _qemu_hvf(p: Probes) -> Verdict:
    works, why = p.hvf
    if not _macos(p):
        return Verdict("qemu + hvf", None, "macOS only")
    if works:
        return Verdict("qemu + hvf", True, why)
    if "entitlement" in why:
        fix = f"brew reinstall qemu (Homebrew's QEMU is signed with {host.HVF_ENTITLEMENT})"
    elif "not installed" in why:
        fix = BREW_QEMU
    else:
        fix = "run on a Mac with Hypervisor.framework (not inside a VM without nested virtualisation)"
    return Verdict("qemu + hvf", False, why, fix)


def _firecracker(p: Probes, kvm: Verdict) -> Verdict:
    """KVM only, and the guest must serve the agent over vsock."""
    from .drivers.firecracker import INSTALL_HINT

    if _macos(p):
        return Verdict("firecracker", None, "Linux with KVM only")
    if not p.firecracker:
        return Verdict("firecracker", False, "binary not found on PATH", INSTALL_HINT)
    binary = f"{p.firecracker} ({p.firecracker_version})"
    if not kvm.works:
        return Verdict("firecracker", False, f"{binary} found, but it needs a working KVM: {kvm.detail}", kvm.fix)
    if not p.guest_vsock[0]:
        return Verdict("firecracker", False, f"{binary} on KVM, but the guest cannot serve the agent over vsock: "
                       f"{p.guest_vsock[1]}", "use backend='qemu'")
    return Verdict("firecracker", True, f"{binary} on KVM")


#: What ``backend="auto"`` tries, best first.
_AUTO_ORDER = ("firecracker", "qemu + kvm", "qemu + hvf", "qemu + tcg")


def _auto(p: Probes, found: list[Verdict]) -> Verdict:
    by_name = {v.what: v for v in found}
    for what in _AUTO_ORDER:
        if by_name[what].works:
            return Verdict("backend auto", True, f"uses {what}")
    return Verdict("backend auto", False, "no backend works on this host", _install_qemu(p))


def tcg_canary(binary: str, image: Image, timeout: float = 30.0) -> tuple[bool, str]:
    """Boot the image's kernel under TCG to its initramfs and back, like the KVM canary."""
    from .drivers.accel import canary_boot

    return canary_boot(binary, image, "tcg", timeout)


def collect(image_name: str = "default") -> Probes:
    """Probe this host: binaries, devices, the image, and canary boots (TCG always, KVM when
    /dev/kvm opens; the KVM verdict is cached per host kernel, QEMU version and image)."""
    from .drivers.firecracker import firecracker_version, guest_vsock_support
    from .images import resolve
    from .images.build import missing_tools
    from .network.userns import describe as describe_network

    qemu = host.qemu_binary()
    try:
        image = resolve(image_name)
        image_desc, image_error = f"{image.name} at {image.path} (kernel {image.kernel_release})", ""
    except SmolVMError as exc:
        image, image_desc, image_error = None, None, str(exc)
    kvm_device = host.kvm_device_status()
    kvm_canary = tcg = None
    if qemu and image is not None:
        tcg = tcg_canary(qemu, image)
        if kvm_device[0]:
            from .drivers.accel import kvm_canary as run_kvm_canary

            kvm_canary = run_kvm_canary(qemu, image)
    fc = host.firecracker_binary()
    return Probes(
        system=platform.system(), arch=host.host_arch(), qemu=qemu,
        qemu_version=host.qemu_version(qemu) if qemu else "", image=image_desc, image_error=image_error,
        kvm_device=kvm_device, kvm_module=host.kvm_module(), kvm_canary=kvm_canary, tcg_canary=tcg,
        hvf=host.hvf_status(qemu), firecracker=fc, firecracker_version=firecracker_version(fc) if fc else "",
        guest_vsock=guest_vsock_support(image) if image is not None else (False, image_error),
        builder_missing=tuple(missing_tools()), network=tuple(describe_network()),
    )


def report(p: Probes) -> tuple[list[str], bool]:
    """The doctor's lines, and whether any backend works."""
    lines = [f"host: {p.system} {p.arch}"]
    lines.append(f"image: {p.image}" if p.image else f"image: not available: {p.image_error}")
    lines.append("image builder tools: all present" if not p.builder_missing else
                 f"image builder tools: missing {', '.join(p.builder_missing)}; fix: apt-get install -y "
                 f"{' '.join(p.builder_missing)}")
    lines += p.network
    vs = verdicts(p)
    lines += [v.render() for v in vs]
    return lines, bool(vs[-1].works)
