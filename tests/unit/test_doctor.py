"""``doctor``: its judgement from injected probe results (pure), and one real run on this host."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_smolvm import host
from pytest_smolvm.doctor import Probes, Verdict, report, verdicts

# This development host (PLATFORM.md): QEMU + TCG works, /dev/kvm is kvm_pvm whose canary
# fails, no firecracker binary, Linux.
HERE = Probes(
    system="Linux", arch="x86_64", qemu="/usr/bin/qemu-system-x86_64", qemu_version="QEMU emulator version 7.2",
    image="default at /c/images/default/x", kvm_device=(True, "/dev/kvm is provided by kvm_pvm"),
    kvm_module="kvm_pvm", kvm_canary=(False, "KVM canary boot failed (exit -6): failed to set MSR 0x10a"),
    tcg_canary=(True, "TCG canary boot succeeded in 1.31s"),
    guest_vsock=(False, "the image has no vsock kernel modules"),
)


def by_what(p: Probes) -> dict[str, Verdict]:
    return {v.what: v for v in verdicts(p)}


def test_this_kind_of_host() -> None:
    v = by_what(HERE)
    assert v["qemu + tcg"].render().startswith("qemu + tcg: works (TCG canary boot succeeded")
    assert v["qemu + kvm"].render().startswith(
        "qemu + kvm: /dev/kvm present (kvm_pvm) but canary failed: KVM canary boot failed (exit -6)")
    assert "nested PVM" in v["qemu + kvm"].fix
    assert v["firecracker"].render().startswith("firecracker: binary not found on PATH; fix: install")
    assert v["qemu + hvf"].render() == "qemu + hvf: not applicable (macOS only)"
    assert v["backend auto"].render() == "backend auto: works (uses qemu + tcg)"


def test_no_qemu() -> None:
    v = by_what(dataclasses.replace(HERE, qemu=None, tcg_canary=None, kvm_canary=None))
    assert not v["qemu + tcg"].works
    assert v["qemu + tcg"].fix == "apt-get install -y qemu-system-x86 qemu-utils"
    assert "canary could not run (no QEMU)" in v["qemu + kvm"].detail
    assert v["backend auto"].render() == ("backend auto: no backend works on this host; "
                                          "fix: apt-get install -y qemu-system-x86 qemu-utils")


def test_no_image() -> None:
    v = by_what(dataclasses.replace(HERE, image=None, image_error="guest image 'default' is not built",
                                    tcg_canary=None, kvm_canary=None))
    assert v["qemu + tcg"].detail == "no guest image to boot (guest image 'default' is not built)"
    assert v["qemu + tcg"].fix == "python -m pytest_smolvm image build"


def test_kvm_permission_and_absence() -> None:
    perm = by_what(dataclasses.replace(HERE, kvm_canary=None, kvm_device=(
        False, "/dev/kvm exists but is not read/writable by this user (add the user to group 'kvm')")))
    assert "usermod -aG kvm" in perm["qemu + kvm"].fix
    gone = by_what(dataclasses.replace(HERE, kvm_canary=None, kvm_module=None,
                                       kvm_device=(False, "/dev/kvm does not exist")))
    assert gone["qemu + kvm"].render().startswith("qemu + kvm: /dev/kvm does not exist; fix: sudo modprobe kvm_intel")


def test_hardware_kvm_with_firecracker() -> None:
    kvm = dataclasses.replace(HERE, kvm_module="kvm_intel", kvm_device=(True, "/dev/kvm is available"),
                              kvm_canary=(True, "KVM canary boot succeeded in 0.21s"),
                              firecracker="/usr/local/bin/firecracker", firecracker_version="Firecracker v1.12.0")
    v = by_what(kvm)
    assert v["qemu + kvm"].works
    # the agent cannot listen on vsock yet: firecracker is reported as not working, and why
    assert not v["firecracker"].works and "vsock" in v["firecracker"].detail
    assert v["backend auto"].detail == "uses qemu + kvm"
    ready = by_what(dataclasses.replace(kvm, guest_vsock=(True, "ok")))
    assert ready["firecracker"].render() == \
        "firecracker: works (/usr/local/bin/firecracker (Firecracker v1.12.0) on KVM)"
    assert ready["backend auto"].detail == "uses firecracker"


def test_firecracker_binary_but_broken_kvm_names_the_kvm_problem() -> None:
    v = by_what(dataclasses.replace(HERE, firecracker="/usr/bin/firecracker", firecracker_version="v1.12"))
    assert v["firecracker"].detail.startswith("/usr/bin/firecracker (v1.12) found, but it needs a working KVM: "
                                              "/dev/kvm present (kvm_pvm) but canary failed")


def test_macos() -> None:
    mac = Probes(system="Darwin", arch="arm64", qemu="/opt/homebrew/bin/qemu-system-aarch64", qemu_version="9.1",
                 image=None, image_error="not built", hvf=(False, "/opt/homebrew/bin/qemu-system-aarch64 is not "
                                                                 "signed with the com.apple.security.hypervisor "
                                                                 "entitlement"))
    v = by_what(mac)
    assert v["qemu + kvm"].render() == "qemu + kvm: not applicable (Linux only; macOS has HVF)"
    assert v["firecracker"].works is None
    assert "brew reinstall qemu" in v["qemu + hvf"].fix
    ok = by_what(dataclasses.replace(mac, hvf=(True, "kern.hv_support=1")))
    assert ok["qemu + hvf"].render() == "qemu + hvf: works (kern.hv_support=1)"
    assert ok["backend auto"].detail == "uses qemu + hvf"
    none = by_what(dataclasses.replace(mac, qemu=None))
    assert none["qemu + tcg"].fix == "brew install qemu"
    assert "qemu-system-aarch64 not found" in none["qemu + tcg"].detail


MAC = Probes(system="Darwin", arch="arm64", qemu=None, image=None, image_error="not built",
             hvf=(False, "qemu-system-aarch64 is not installed"))
REINSTALL = ("fix: python -m pytest_smolvm image build --force (if the image is damaged), or reinstall QEMU: "
             "apt-get install -y qemu-system-x86 qemu-utils")
PVM_FIX = ("fix: none on this host: kvm_pvm (nested PVM) cannot run Linux guests; run on hardware "
           "virtualisation (VT-x/AMD-V). accel=auto uses TCG here")
PVM_FAILED = "/dev/kvm present (kvm_pvm) but canary failed: KVM canary boot failed (exit -6): failed to set MSR 0x10a"


@pytest.mark.parametrize(("probes", "expected"), [
    pytest.param(dataclasses.replace(HERE, tcg_canary=(False, "TCG canary boot timed out after 30s")), [
        "qemu + tcg: /usr/bin/qemu-system-x86_64 (QEMU emulator version 7.2): TCG canary boot timed out after 30s; "
        + REINSTALL,
        "backend auto: no backend works on this host; fix: apt-get install -y qemu-system-x86 qemu-utils",
    ], id="tcg-canary-failed"),
    pytest.param(dataclasses.replace(HERE, tcg_canary=None), [
        "qemu + tcg: /usr/bin/qemu-system-x86_64 (QEMU emulator version 7.2): the TCG canary was not run; "
        + REINSTALL,
    ], id="tcg-canary-not-run"),
    pytest.param(dataclasses.replace(HERE, image=None, image_error="guest image 'default' is not built",
                                     tcg_canary=None, kvm_canary=None), [
        "qemu + kvm: /dev/kvm present (kvm_pvm) but the canary could not run (guest image 'default' is not built); "
        "fix: python -m pytest_smolvm image build",
    ], id="kvm-canary-not-run-no-image"),
    pytest.param(dataclasses.replace(HERE, kvm_canary=None), [
        "qemu + kvm: /dev/kvm present (kvm_pvm) but the canary could not run (no image); "
        "fix: python -m pytest_smolvm image build",
    ], id="kvm-canary-not-run-no-image-error"),
    pytest.param(dataclasses.replace(HERE, arch="aarch64", qemu=None, tcg_canary=None, kvm_canary=None), [
        "qemu + tcg: qemu-system-aarch64 not found on PATH; fix: apt-get install -y qemu-system-x86 qemu-utils",
        "qemu + kvm: /dev/kvm present (kvm_pvm) but the canary could not run (no QEMU); "
        "fix: apt-get install -y qemu-system-x86 qemu-utils",
    ], id="linux-arm64-no-qemu"),
    pytest.param(dataclasses.replace(HERE, kvm_module="kvm_intel",
                                     kvm_canary=(False, "KVM canary boot failed (exit 1)")), [
        "qemu + kvm: /dev/kvm present (kvm_intel) but canary failed: KVM canary boot failed (exit 1); "
        "fix: check dmesg for KVM errors; accel=auto uses TCG meanwhile",
        "backend auto: works (uses qemu + tcg)",
    ], id="kvm-canary-failed-on-hardware"),
    pytest.param(dataclasses.replace(HERE, kvm_module=None, kvm_device=(True, "/dev/kvm is available"),
                                     kvm_canary=(True, "KVM canary boot succeeded in 0.2s")), [
        "qemu + kvm: works (/dev/kvm (?); KVM canary boot succeeded in 0.2s)",
        "backend auto: works (uses qemu + kvm)",
    ], id="kvm-works-unknown-module"),
    pytest.param(dataclasses.replace(HERE, firecracker="/usr/bin/firecracker", firecracker_version="v1.12"), [
        f"qemu + kvm: {PVM_FAILED}; {PVM_FIX}",
        f"firecracker: /usr/bin/firecracker (v1.12) found, but it needs a working KVM: {PVM_FAILED}; {PVM_FIX}",
    ], id="firecracker-inherits-the-kvm-fix"),
    pytest.param(MAC, [
        "qemu + tcg: qemu-system-aarch64 not found on PATH; fix: brew install qemu",
        "qemu + hvf: qemu-system-aarch64 is not installed; fix: brew install qemu",
        "firecracker: not applicable (Linux with KVM only)",
        "backend auto: no backend works on this host; fix: brew install qemu",
    ], id="macos-no-qemu"),
    pytest.param(dataclasses.replace(MAC, qemu="/opt/homebrew/bin/qemu-system-aarch64",
                                     hvf=(False, "kern.hv_support=0: this Mac has no Hypervisor.framework")), [
        "qemu + tcg: no guest image to boot (not built); fix: python -m pytest_smolvm image build",
        "qemu + hvf: kern.hv_support=0: this Mac has no Hypervisor.framework; fix: run on a Mac with "
        "Hypervisor.framework (not inside a VM without nested virtualisation)",
    ], id="macos-without-hypervisor-framework"),
])
def test_verdict_texts(probes: Probes, expected: list[str]) -> None:
    rendered = {v.what: v.render() for v in verdicts(probes)}
    for line in expected:
        what = line.split(": ", 1)[0]
        assert rendered[what] == line


def test_verdict_order() -> None:
    assert [v.what for v in verdicts(HERE)] == ["qemu + tcg", "qemu + kvm", "qemu + hvf", "firecracker",
                                                "backend auto"]


def test_report_lines_and_exit_status() -> None:
    lines, ok = report(dataclasses.replace(HERE, builder_missing=("lz4",)))
    assert ok and lines[0] == "host: Linux x86_64"
    assert "image builder tools: missing lz4; fix: apt-get install -y lz4" in lines
    _, ok = report(dataclasses.replace(HERE, qemu=None, tcg_canary=None, kvm_canary=None))
    assert not ok


REAL_HOST = (host.qemu_binary() is not None and Path("/sys/module/kvm_pvm").exists()
             and host.firecracker_binary() is None and sys.platform == "linux")


@pytest.mark.skipif(not REAL_HOST, reason="the development host's verdicts: QEMU, /dev/kvm from kvm_pvm, "
                                          "no firecracker binary, Linux")
def test_real_doctor_on_this_host() -> None:
    res = subprocess.run([sys.executable, "-m", "pytest_smolvm", "doctor"], capture_output=True, text=True,
                         timeout=120, env=os.environ)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()

    def line(prefix: str) -> str:
        found = [ln for ln in lines if ln.startswith(prefix)]
        assert len(found) == 1, (prefix, res.stdout)
        return found[0]

    assert line("qemu + tcg: ").startswith("qemu + tcg: works (TCG canary boot succeeded")
    assert line("qemu + kvm: ").startswith("qemu + kvm: /dev/kvm present (kvm_pvm) but canary failed: ")
    assert line("firecracker: ").startswith("firecracker: binary not found on PATH; fix: ")
    assert line("qemu + hvf: ") == "qemu + hvf: not applicable (macOS only)"
    assert line("backend auto: ") == "backend auto: works (uses qemu + tcg)"


def test_the_report_says_which_network_mode_this_user_gets() -> None:
    lines, _ = report(dataclasses.replace(HERE, network=("network: rootless mode (uid 1001: ...)",
                                                         "network nat: skipped: no pasta (fix: apt install passt)")))
    assert "network nat: skipped: no pasta (fix: apt install passt)" in lines
