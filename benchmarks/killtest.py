#!/usr/bin/env python3
"""Kill pytest with SIGKILL at a random point, 10 times; reap; count what is left (must be 0).

    python benchmarks/killtest.py [--rounds 10] [--seed N]

Leftovers counted: VMM processes of those runs, their runtime directories (sockets,
overlays, console logs) and retained/kept VMs. VMMs should already be gone before `reap`
(they die with the thread that started them); `reap` removes the files.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pytest_smolvm.paths import runtime_dir

SUITE = '''
import time, pytest

@pytest.mark.parametrize("i", range(20))
def test_vm(smolvm, i):
    smolvm.run("echo work > /root/f && sync")
    time.sleep(0.3)

def test_session(smolvm_session):
    smolvm_session.run("true")
'''


def vmm_pids(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmd and marker.encode() in cmd:
                found.append(int(pid))
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    prefix = f"kt{os.getpid():x}"
    survivors_before_reap = 0
    with tempfile.TemporaryDirectory() as d:
        Path(d, "test_kill.py").write_text(SUITE)
        for i in range(args.rounds):
            run_id = f"{prefix}-{i}"
            env = {**os.environ, "SMOLVM_RUN_ID": run_id}
            proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", d],
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            delay = rng.uniform(1.0, 12.0)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            time.sleep(0.5)  # PR_SET_PDEATHSIG delivery
            alive = vmm_pids(run_id)
            survivors_before_reap += len(alive)
            print(f"round {i}: SIGKILL after {delay:.1f}s; VMMs alive right after: {len(alive)}")
    reap = subprocess.run([sys.executable, "-m", "pytest_smolvm", "reap"], capture_output=True, text=True)
    print(reap.stdout.strip().splitlines()[-1] if reap.stdout.strip() else reap.stderr)
    left_procs = vmm_pids(prefix)
    left_dirs = [p for p in runtime_dir().glob(f"{prefix}-*")] if runtime_dir().is_dir() else []
    for pid in left_procs:
        print(f"leftover VMM pid {pid}")
    for p in left_dirs:
        print(f"leftover directory {p}")
    print(f"seed {args.seed}; VMMs that outlived pytest before reap: {survivors_before_reap}")
    print(f"leftovers after reap: {len(left_procs) + len(left_dirs)}")
    sys.exit(1 if left_procs or left_dirs else 0)


if __name__ == "__main__":
    main()
