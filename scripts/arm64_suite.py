"""The arm64 guest path for real on an x86-64 host: arm64 guests under aarch64 TCG.

Builds or reuses the ``default-arm64`` image (mmdebstrap through binfmt_misc and qemu-user,
set up by scripts/setup), boots one arm64 VM to measure a cold boot, a golden-snapshot clone,
a checkpoint clone and the first command, then runs with ``SMOLVM_TEST_IMAGE=default-arm64``
(conftest.py: every VM the tests start on the default image boots the arm64 one):

- the host-mode agent tests on the arm64 agent binary (``SMOLVM_TEST_AGENT_ARCH=arm64``,
  through binfmt) and the arm64 unit tests (build, cross-compiled agent, virt machine);
- :data:`SELECTION` of the integration tests, on arm64 guests.

Exit status 0 only if every selected test passed, none was skipped, and the run left no
aarch64 QEMU, VM directory, TAP or network namespace behind (``reap --dry-run``). Run by ``scripts/run-arm64``.
The same selection runs under KVM on arm64 Linux and under HVF on a Mac (scripts/verify-macos).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import psutil

from pytest_smolvm import SmolVM, VMConfig
from pytest_smolvm.images.build import build
from pytest_smolvm.images.recipe import arm64_recipe

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "default-arm64"

#: Host-mode tests of the agent, run on the arm64 binary (bug 5 of issue 22), and the unit
#: tests of the arm64 build, toolchains and machine.
AGENT_TESTS = ["tests/unit/test_agent_exec.py", "tests/unit/test_agent_spawn.py", "tests/unit/test_agent_listener.py",
               "tests/unit/test_agent_arm64.py", "tests/unit/test_agentbin.py", "tests/unit/test_arm64_build.py",
               "tests/unit/test_virt_machine.py", "tests/unit/test_deb.py", "tests/unit/test_macos_host.py"]

#: What runs on arm64 guests (issue 22): the QEMU conformance cases, run()/lifecycle, the static
#: agent's exec tests, snapshots/clones, checkpoints, the hostile cases (timeout kill, OOM, fork
#: bombs, panic and poweroff -> GuestDied), put/get/get_dir, network none and isolated (the
#: nat cases need an uplink, as in scripts/kvm_nested.py), spawn and live output, and the
#: user-level cross-architecture case (an arm64 C build tested in the guest), and an arm64
#: image made the way a Mac must (OCI import, kernel .deb read in Python, agent from zig).
SELECTION = {
    "tests/integration/test_conformance.py": "qemu-tcg",
    "tests/integration/test_run.py": "",
    "tests/integration/test_lifecycle.py": "",
    "tests/integration/test_static_agent.py": "",
    "tests/integration/test_snapshots.py": "",
    "tests/integration/test_checkpoint.py": "",
    "tests/integration/test_hostile.py": "",
    "tests/integration/test_transfer.py": "",
    "tests/integration/test_network.py": "none_gives or isolated_reaches or nothing_of_a_run",
    "tests/integration/test_spawn_output.py": "",
    "tests/integration/test_cross_arch.py": "",
    "tests/integration/test_image_without_linux_tools.py": "",
}


def say(msg: str) -> None:
    print(f"[arm64] {msg}", flush=True)


def selection(chosen: dict[str, str]) -> tuple[list[str], str]:
    """The test files and one ``-k`` expression for all of them (as scripts/kvm_nested.py)."""
    parts = []
    for path, expr in chosen.items():
        module = Path(path).name
        parts.append(f"({module} and ({expr}))" if expr else module)
    return list(chosen), " or ".join(parts)


def measure() -> None:
    """One arm64 VM: cold boot, first command, golden-snapshot clone, checkpoint and its clone."""
    t0 = time.monotonic()
    with SmolVM(VMConfig(image=IMAGE, snapshot=False)) as vm:
        boot = time.monotonic() - t0
        t1 = time.monotonic()
        r = vm.run("uname -m", check=True)
        first = time.monotonic() - t1
        if r.stdout.strip() != "aarch64":
            raise SystemExit(f"[arm64] FAILED: the guest says uname -m = {r.stdout.strip()!r}, not aarch64")
        say(f"cold boot {boot:.2f}s ({vm.accel.reason if vm.accel else '?'}); first command (uname -m) {first:.2f}s")
        t2 = time.monotonic()
        cp = vm.checkpoint()
        taken = time.monotonic() - t2
        try:
            t3 = time.monotonic()
            with SmolVM(VMConfig(image=IMAGE), checkpoint=cp) as clone:
                up = time.monotonic() - t3
                clone.run("true", check=True)
            say(f"checkpoint {taken:.2f}s (paused {cp.paused_s:.2f}s); its clone up {up:.2f}s")
        finally:
            cp.remove()
    for attempt in ("first (makes the golden snapshot if missing)", "second"):
        t4 = time.monotonic()
        with SmolVM(VMConfig(image=IMAGE)) as vm:
            up = time.monotonic() - t4
            t5 = time.monotonic()
            vm.run("true", check=True)
            say(f"{attempt} snapshot VM: {vm.boot_mode} in {up:.2f}s, first command {time.monotonic() - t5:.2f}s")


def aarch64_qemus() -> list[str]:
    """Running qemu-system-aarch64 processes, "pid argv" (by argv[0]: pgrep matches at most 15
    characters of a process name, and this one is longer)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        argv = proc.info["cmdline"] or []
        if argv and os.path.basename(argv[0]) == "qemu-system-aarch64":
            found.append(f"{proc.info['pid']} {' '.join(argv)[:300]}")
    return found


def leftovers() -> list[str]:
    """What the run left: aarch64 QEMUs (nothing else here runs them), and what the reaper
    would remove: VM directories, and the network namespaces (with their TAPs and nft tables)
    of runs whose process is gone. A concurrent run's live network is not a leftover."""
    found = [f"VMM: {p}" for p in aarch64_qemus()]
    reap = subprocess.run([sys.executable, "-m", "pytest_smolvm", "reap", "--dry-run"], capture_output=True,
                          text=True)
    if reap.returncode != 0 or not reap.stdout.strip().endswith("0 leftover VM(s) found"):
        found.append(f"reap --dry-run: {(reap.stdout + reap.stderr).strip()[-800:]}")
    return found


def run_pytest(args: list[str], env: dict[str, str], junit: Path) -> tuple[int, dict[str, int], str]:
    """Run pytest; (exit status, counts from its JUnit XML, its summary line)."""
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rfEs", "--color=no",
                             f"--junitxml={junit}", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    summary, text = "", b""
    while chunk := os.read(proc.stdout.fileno(), 65536):  # as it comes: progress dots end no line
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        text += chunk
    for line in text.decode(errors="replace").splitlines():
        if re.match(r"^=*\s*\d+ (passed|failed|errors?|skipped|deselected).* in [\d.]+s", line):
            summary = line.strip().strip("=").strip()  # the last one is the run's own
    rc = proc.wait()
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    try:
        for suite in ET.parse(junit).getroot().iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
    except (OSError, ET.ParseError):
        counts["errors"] += 1
    return rc, counts, summary


#: What scripts/verify-macos runs under HVF on Apple silicon: the selection above but the
#: cases macOS cannot have (networked policies: Linux netns/nftables/TAPs; the arm64 C build:
#: Debian's cross gcc; the no-Linux-tools import, which prepares its packages with apt) and the
#: QEMU conformance cases under HVF instead of TCG.
LINUX_ONLY = ("test_cross_arch.py", "test_network.py", "test_image_without_linux_tools.py")
MACOS_SELECTION = {**{k: v for k, v in SELECTION.items() if not k.endswith(LINUX_ONLY)},
                   "tests/integration/test_conformance.py": "qemu-hvf",
                   "tests/integration/test_checkpoint.py": "not networked",
                   "tests/integration/test_network.py": "none_gives"}


def macos_image() -> None:
    """A Mac cannot build the image (no mmdebstrap/apt): it must be there already."""
    from pytest_smolvm.errors import ImageError
    from pytest_smolvm.images import resolve

    try:
        image = resolve(IMAGE)
    except ImageError as exc:
        raise SystemExit(f"[arm64] {exc}\n[arm64] a Mac cannot build it: copy the build directory from a Linux host "
                         f"(python -m pytest_smolvm image build --arch arm64 there), or point SMOLVM_IMAGE_PATH at a "
                         f"shared copy; see docs/macos.md") from None
    say(f"image {IMAGE} at {image.path}")


def verified_row(summary: str) -> str:
    """The README "Verified on" row of a verify-macos run."""
    mac = subprocess.run(["sw_vers", "-productVersion"], capture_output=True, text=True).stdout.strip() or "?"
    model = subprocess.run(["sysctl", "-n", "hw.model"], capture_output=True, text=True).stdout.strip() or "?"
    from pytest_smolvm import host

    qemu = host.qemu_version(host.qemu_binary() or "qemu-system-aarch64")
    return (f"| `qemu` + `hvf`, arm64 guest | **real**, on macOS {mac} {platform.machine()} ({model}), {qemu} | "
            f"{summary}: `scripts/verify-macos` |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-measure", action="store_true", help="skip the timing VM")
    ap.add_argument("--macos", action="store_true", help="scripts/verify-macos: HVF, the macOS selection")
    ap.add_argument("pytest_args", nargs="*", help="extra arguments for the integration pytest run (e.g. -x)")
    args = ap.parse_args()
    started = time.monotonic()
    say(f"host {platform.system()} {platform.machine()}; image {IMAGE}")
    if args.macos:
        macos_image()
    else:
        image = build(arm64_recipe(IMAGE))
        say(f"image {IMAGE} at {image.path} ready after {time.monotonic() - started:.1f}s")
    if aarch64_qemus():
        say("note: aarch64 QEMU processes were running before this run: " + "; ".join(aarch64_qemus()))
    if not args.no_measure:
        measure()
    env = {**os.environ, "SMOLVM_TEST_IMAGE": IMAGE, "SMOLVM_IMAGE": IMAGE, "SMOLVM_REQUIRE_VMS": "1",
           "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    work = Path(os.environ.get("TMPDIR", "/tmp"))
    results = []
    if not args.macos:  # the agent is a Linux binary: its host-mode tests cannot run on a Mac
        t = time.monotonic()
        results.append(("agent on arm64 + arm64 units",
                        *run_pytest(["-q", *AGENT_TESTS], {**env, "SMOLVM_TEST_AGENT_ARCH": "arm64"},
                                    work / f"arm64-units-{os.getpid()}.xml"), time.monotonic() - t))
    files, expr = selection(MACOS_SELECTION if args.macos else SELECTION)
    accel = ["--smolvm-accel=hvf"] if args.macos else []
    t = time.monotonic()
    results.append(("integration on arm64 guests",
                    *run_pytest(["-q", "-o", "console_output_style=classic", *accel, "-k", expr, *files,
                                 *args.pytest_args], env, work / f"arm64-integration-{os.getpid()}.xml"),
                    time.monotonic() - t))
    return report(results, leftovers(), started, args.macos)


def report(results: list[tuple[str, int, dict[str, int], str, float]], left: list[str], started: float,
           macos: bool) -> int:
    ok = not left
    for name, rc, counts, summary, took in results:
        good = rc == 0 and counts["tests"] > 0 and not (counts["failures"] or counts["errors"] or counts["skipped"])
        ok = ok and good
        say(f"{name}: {summary or 'no summary'} ({took:.0f}s){'' if good else '  <- FAILED (failure, error or skip)'}")
    for item in left:
        say(f"LEFTOVER: {item}")
    say(f"{'PASSED' if ok else 'FAILED'} in {time.monotonic() - started:.0f}s")
    if macos and ok:
        print("Verified on (README):\n" + verified_row(results[-1][3]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
