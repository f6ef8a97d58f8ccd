"""The KVM path, run for real on a host without usable KVM: nested inside a TCG guest.

L1 is a SmolVM booted under TCG with emulated AMD-V (``cpu=L1_CPU``) from the ``kvm-host``
image (QEMU, the engine's Debian dependencies, ``kvm_amd``). The project, the default image
and a newer pytest and pluggy than Debian 12 ships go in as read-only volumes. In L1,
``modprobe kvm_amd`` gives ``/dev/kvm``; the engine there must pick KVM on its own
(``accel=auto``, canary), then pytest runs the KVM subsets with ``--smolvm-accel=kvm``: the
L2 guests are real KVM guests. Afterwards L1 must hold no VMM, namespace, nft table or VM
directory. Exit status 0 only if every selected test passed and none was skipped.

Run by ``scripts/run-kvm-nested``. It proves behaviour, never speed: L2 runs on emulated
hardware virtualisation, inside emulation.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import re
import shlex
import shutil
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

from pytest_smolvm import SmolVM, VMConfig, volumes
from pytest_smolvm.images import resolve
from pytest_smolvm.images.build import build
from pytest_smolvm.images.recipe import KVM_HOST_MODULES, Recipe, kvm_host_recipe
from pytest_smolvm.paths import cache_dir

ROOT = Path(__file__).resolve().parent.parent
#: TCG emulates AMD-V (svm, with nested paging: npt), not VT-x.
L1_CPU = "qemu64,+rdrand,+arat,+svm,+npt"
#: One: with two L1 vCPUs (multi-threaded TCG), L2 guests that boot or restore at the same
#: time hung (agent silent for 360 s, commands unanswered: 2 of 30 concurrent clones);
#: with one, 30 of 30 came up. An emulation limit, not the engine's: measured 2026-12-01.
L1_VCPUS = 1
L1_MEMORY_MIB = 4096
L1_DISK_MIB = 8192
#: SMOLVM_TIMEOUT_SCALE inside L1 unless the caller sets one.
DEFAULT_SCALE = "4"
#: Debian 12 has pytest 7.2 and pluggy 1.0; the package (and conftest.py) need pytest >= 7.4
#: and pluggy >= 1.3 (``hookimpl(wrapper=True)``). The host's installed copies go in, as a volume.
VENDORED = ("pytest", "pluggy")
PROJECT_SKIP = shutil.ignore_patterns(".git", "__pycache__", "*.pyc", ".mypy_cache", ".ruff_cache", ".pytest_cache",
                                      ".tox", "*.egg-info", ".hypothesis", "build", "dist")

MNT_PROJECT, MNT_IMAGE, MNT_SITE = "/mnt/smolvm-project", "/mnt/smolvm-image", "/mnt/smolvm-site"
L1_CACHE, L1_RUNTIME, LOG = "/var/cache/smolvm", "/tmp/smolvm-l1", "/root/inner.log"

#: What runs under KVM in L1 (issue 11): the qemu-kvm conformance cases, every snapshot/clone
#: test, every hostile case (timeout kill, OOM, fork bomb, panic and poweroff -> GuestDied),
#: every lifecycle and run() case, the guest-side security cases, network none and isolated;
#: then the harness checks L1 for leftovers. Left out (measured in one nested run of the whole
#: of tests/integration, 2026-12-01: 114 passed, 10 failed, all for these reasons): cases that
#: need plugins Debian's L1 lacks (pytest-xdist, pytest-timeout) or paramiko >= 3.2 (L1 has
#: 2.12), pytester runs whose subprocess does not see the plugin's entry point, and cases that
#: assume TCG's throughput (a console flood that must pass 128 KiB in 5 s: each console byte
#: is a nested exit here), and one pool refill that missed its fixed 90 s while the other host
#: core ran another suite (test_snapshots' 120 s one missed too then; it passed in quiet runs).
#: The background fork bomb is left out too: passed in one nested run, but in another, with
#: the other host core busy, the agent (nice -20 against 1024 nice-0 forkers: ~8% of L2's one
#: vCPU, each fork costly under nested paging) did not answer a get() within 120 s.
#: test_changed_image_gets_a_new_snapshot changes the boot layer, and a new boot layer means
#: compiling the static agent: L1 has no C compiler (musl-tools and gcc would grow the kvm-host
#: image for one test that is about boot-layer keys, not KVM).
SELECTION = {
    "tests/integration/test_conformance.py": "qemu-kvm",
    "tests/integration/test_snapshots.py": "not changed_image_gets_a_new_snapshot",
    "tests/integration/test_hostile.py": "not background_fork_bomb",
    "tests/integration/test_network.py": "none_gives or isolated_reaches or nothing_of_a_run",
    "tests/integration/test_lifecycle.py": "",
    "tests/integration/test_run.py": "",
    "tests/integration/test_security_guest.py": "",
    # Issue 15 under KVM: checkpoints (a -cpu host VM's full state, restored by KVM) and the
    # streaming channel. The networked checkpoint case needs a nat uplink, left out like
    # test_network's nat cases; the warm-pool case waits a fixed 120 s for a spare, which it
    # missed once in the full selection (the session pool's own refills on L1's one vCPU)
    # and made in 83 s alone, like the pool refill left out above.
    "tests/integration/test_checkpoint.py": "not networked_clone and not warm_pool",
    "tests/integration/test_spawn_output.py": "",
}


def say(msg: str) -> None:
    print(f"[kvm-nested] {msg}", flush=True)


def stage_project(dest: Path) -> Path:
    """A clean copy of the working tree (no caches, no .git): what L1 imports and tests."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(ROOT, dest, ignore=PROJECT_SKIP, symlinks=True)
    return dest


def stage_site(dest: Path) -> Path:
    """The host's installed copies of :data:`VENDORED`, and this project's metadata, as a site
    directory."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in VENDORED:
        dist = importlib.metadata.distribution(name)
        base = Path(str(dist.locate_file(""))).resolve()
        for rel in dist.files or ():
            src = Path(str(dist.locate_file(rel))).resolve()
            if not src.is_relative_to(base) or "__pycache__" in src.parts or not src.is_file():
                continue  # console scripts outside site-packages, bytecode
            target = dest / src.relative_to(base)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    register_package(dest)
    return dest


def register_package(site: Path) -> None:
    """Metadata that makes the project on PYTHONPATH look installed, so pytest finds the
    plugin by its ``pytest11`` entry point: also in pytester's subprocess runs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    entry_points = "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in points.items())
                           for group, points in project.get("entry-points", {}).items())
    (info / "entry_points.txt").write_text(entry_points)


def selection() -> tuple[list[str], str]:
    """The test files and one ``-k`` expression for all of them."""
    parts = []
    for path, expr in SELECTION.items():
        # The module's file name, ".py" included: a bare "test_run" would also match every
        # test function whose name starts with it, in any module.
        module = Path(path).name
        parts.append(f"({module} and ({expr}))" if expr else module)
    return list(SELECTION), " or ".join(parts)


def l1_setup(vm: SmolVM, image_digest: str) -> None:
    """Load kvm_amd and the network modules, add the VMM user, put the default image in L1's image cache. It is copied
    off its volume: tests write boot layers into the image directory (a changed agent)."""
    script = f"""set -e
t=$(date +%s%N); modprobe kvm_amd; t2=$(date +%s%N)
test -c /dev/kvm
echo "modprobe kvm_amd: $(( (t2 - t) / 1000000 )) ms"
modprobe -a {" ".join(m for m in KVM_HOST_MODULES if m != "kvm_amd")}
dmesg | grep -E 'kvm|SVM' | sed 's/^/  dmesg: /' | tail -4
getent passwd smolvm >/dev/null || useradd --system --no-create-home --home-dir /nonexistent \\
  --shell /usr/sbin/nologin smolvm
mkdir -p {L1_CACHE}/images/default {L1_RUNTIME}
t=$(date +%s%N); cp -a --sparse=always {MNT_IMAGE} {L1_CACHE}/images/default/{image_digest}; t2=$(date +%s%N)
echo "default image copied from its volume to L1's disk: $(( (t2 - t) / 1000000 )) ms"
"""
    r = vm.run(script, timeout=600)
    print(r.stdout, end="", flush=True)
    if r.exit_code != 0:
        raise SystemExit(f"[kvm-nested] L1 setup failed ({r.exit_code}): {r.stderr}")


def l1_env(scale: str) -> dict[str, str]:
    return {"SMOLVM_CACHE_DIR": L1_CACHE, "SMOLVM_RUNTIME_DIR": L1_RUNTIME, "SMOLVM_REQUIRE_VMS": "1",
            "SMOLVM_TIMEOUT_SCALE": scale, "PYTHONPATH": f"{MNT_SITE}:{MNT_PROJECT}",
            "PYTHONDONTWRITEBYTECODE": "1"}


def auto_picks_kvm(vm: SmolVM, env: dict[str, str]) -> None:
    """``accel=auto`` in L1 must choose KVM by itself (canary boot, scaled timeout)."""
    code = ("from pytest_smolvm import host; from pytest_smolvm.drivers.accel import choose_accel; "
            "from pytest_smolvm.images import resolve; "
            "a = choose_accel('auto', host.qemu_binary(), resolve('default')); print(a.name, '-', a.reason)")
    t0 = time.monotonic()
    r = vm.run(["python3", "-c", code], env=env, timeout=600)
    say(f"L1 accel=auto chose: {r.stdout.strip() or r.stderr.strip()[-500:]} ({time.monotonic() - t0:.1f}s)")
    if r.exit_code != 0 or not r.stdout.startswith("kvm "):
        raise SystemExit("[kvm-nested] FAILED: accel=auto did not pick KVM in L1")


def run_inner(vm: SmolVM, env: dict[str, str], extra: list[str], deadline: float) -> str:
    """Start pytest in L1 in the background and stream its log here; returns the log."""
    files, expr = selection()
    argv = ["python3", "-u", "-m", "pytest", "-p", "no:cacheprovider", "--smolvm-accel=kvm", "-rfEs",
            "-o", "console_output_style=classic", "-k", expr, *files, *extra]
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    start = (f"cd {MNT_PROJECT} && (env {exports} setsid {shlex.join(argv)} > {LOG} 2>&1; "
             f"echo $? > {LOG}.rc) </dev/null >/dev/null 2>&1 &")
    vm.run(start, timeout=60, check=True)
    log = b""
    while True:
        time.sleep(5)
        rc = vm.run(f"cat {LOG}.rc 2>/dev/null", timeout=300).stdout.strip()
        chunk = vm.run(["tail", "-c", f"+{len(log) + 1}", LOG], timeout=300).stdout_bytes
        if chunk:
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
            log += chunk
        if rc.isdigit():  # written after the log is complete: the tail above got all of it
            return log.decode(errors="replace") + f"\n[exit {rc}]"
        if time.monotonic() > deadline:
            raise SystemExit("[kvm-nested] FAILED: the inner pytest did not finish in time")


def leftovers(vm: SmolVM, env: dict[str, str]) -> list[str]:
    """What the inner run left in L1 (must be nothing)."""
    checks = {
        "VMM processes": "pgrep -a qemu-system || true",
        "network namespaces": "ip netns list",
        "smolvm nft tables": "nft list tables | grep -i smolvm || true",
        "VM directories": f"find {L1_RUNTIME} -mindepth 2 -maxdepth 2 -type d",
    }
    found = []
    for what, cmd in checks.items():
        out = vm.run(cmd, timeout=120).stdout.strip()
        if out:
            found.append(f"{what}: {out}")
    reap = vm.run(["python3", "-m", "pytest_smolvm", "reap", "--dry-run"], env=env, cwd=MNT_PROJECT, timeout=300)
    if not reap.stdout.strip().endswith("0 leftover VM(s) found"):
        found.append(f"reap --dry-run: {reap.stdout.strip()[-500:]} {reap.stderr.strip()[-500:]}")
    return found


def verdict(log: str) -> tuple[str, bool]:
    """pytest's summary line, and whether it means every test passed and none was skipped."""
    lines = [ln for ln in log.splitlines() if re.match(r"^=+ .* in [\d.]+s", ln)]
    summary = lines[-1] if lines else "(no pytest summary line)"
    counts = dict((k, int(n)) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|"
                                                     r"deselected|warnings?)", summary))
    ok = (counts.get("passed", 0) > 0 and not any(counts.get(k) for k in ("failed", "error", "errors", "skipped",
                                                                           "xpassed", "xfailed"))
          and log.rstrip().endswith("[exit 0]"))
    return summary, ok


@contextlib.contextmanager
def booted_l1(scale: str) -> Iterator[tuple[SmolVM, dict[str, str]]]:
    """L1, booted and ready: kvm_amd loaded, the default image in place, KVM chosen by
    ``accel=auto``. Yields the VM and the environment the engine in L1 runs with."""
    t0 = time.monotonic()
    kvm_host = build(kvm_host_recipe(), progress=lambda m: say(f"  {m}"))
    default = resolve("default")  # also writes its boot layer for this version of the agent
    say(f"images: L1 {kvm_host.path}, L2 {default.path} ({time.monotonic() - t0:.1f}s)")
    t0 = time.monotonic()
    stage = cache_dir() / "kvm-nested"
    vols = {MNT_PROJECT: str(stage_project(stage / "project")), MNT_IMAGE: str(default.path),
            MNT_SITE: str(stage_site(stage / "site"))}
    for target, source in vols.items():
        volumes.prepare(volumes.Volume(source, target))
    say(f"volumes ready: {', '.join(f'{s} -> {t}' for t, s in vols.items())} ({time.monotonic() - t0:.1f}s)")
    config = VMConfig(image=kvm_host.name, accel="tcg", cpu=L1_CPU, vcpus=L1_VCPUS, memory_mib=L1_MEMORY_MIB,
                      disk_size_mib=L1_DISK_MIB, snapshot=False, volumes=volumes.check_volumes(vols),
                      boot_timeout=600, timeout=600)
    t0 = time.monotonic()
    with SmolVM(config, name="kvm-nested-l1") as l1:
        say(f"L1 booted under {l1.accel.name if l1.accel else '?'} with -cpu {L1_CPU}, {L1_VCPUS} vCPUs, "
            f"{L1_MEMORY_MIB} MiB in {time.monotonic() - t0:.1f}s")
        l1_setup(l1, Recipe().digest())
        env = l1_env(scale)
        auto_picks_kvm(l1, env)
        yield l1, env


def run_benchmarks(vm: SmolVM, env: dict[str, str], humaneval: Path | None, limit: int) -> int:
    """``--bench``: the clone and HumanEval benchmarks with L2 under KVM. Nested paging inside
    emulation: the numbers show where time goes without TCG's translation, never real speed."""
    runs = [["python3", "benchmarks/clone.py", "--clone-only", "--clones", "15", "--cold", "2"]]
    if humaneval is not None:
        vm.put(humaneval, "/root/HumanEval.jsonl.gz")
        runs.append(["python3", "benchmarks/humaneval.py", "--data", "/root/HumanEval.jsonl.gz",
                     "--limit", str(limit)])
    failed = 0
    for argv in runs:
        t0 = time.monotonic()
        r = vm.run(argv, env={**env, "SMOLVM_ACCEL": "kvm"}, cwd=MNT_PROJECT, timeout=3600)
        say(f"$ {shlex.join(argv)}: exit {r.exit_code} in {time.monotonic() - t0:.0f}s")
        print(r.stdout, r.stderr[-3000:] if r.exit_code else "", sep="", flush=True)
        failed |= r.exit_code != 0
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=float(os.environ.get("SMOLVM_NESTED_BUDGET", 2700)),
                        help="seconds the inner pytest may take (default 2700)")
    parser.add_argument("--bench", action="store_true",
                        help="run benchmarks/clone.py (and humaneval.py with --humaneval-data) in L1 instead of pytest")
    parser.add_argument("--humaneval-data", type=Path, help="HumanEval.jsonl.gz for --bench")
    parser.add_argument("--humaneval-limit", type=int, default=60, help="problems for --bench (default 60)")
    args, pytest_args = parser.parse_known_args(argv)  # the rest goes to the inner pytest (e.g. -x)
    scale = os.environ.get("SMOLVM_TIMEOUT_SCALE", DEFAULT_SCALE)
    started = time.monotonic()
    if args.bench:
        with booted_l1(scale) as (l1, env):
            return run_benchmarks(l1, env, args.humaneval_data, args.humaneval_limit)
    with booted_l1(scale) as (l1, env):
        t0 = time.monotonic()
        log = run_inner(l1, env, pytest_args, time.monotonic() + args.budget)
        inner = time.monotonic() - t0
        left = leftovers(l1, env)
    summary, ok = verdict(log)
    say(f"inner pytest (SMOLVM_TIMEOUT_SCALE={scale}): {inner:.0f}s; whole nested run: "
        f"{time.monotonic() - started:.0f}s")
    for item in left:
        say(f"LEFTOVER in L1: {item}")
    say(f"L1 leftovers after the run: {'none' if not left else len(left)}")
    print(summary, flush=True)
    return 0 if ok and not left else 1


if __name__ == "__main__":
    sys.exit(main())
