"""Shared by the real-VM tests: paths fixed before pytester moves HOME, and a view of the
host's QEMU processes (to prove none outlives its VM)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

from pytest_smolvm.paths import cache_dir

REAL_CACHE = cache_dir()
TESTS_DIR = Path(__file__).resolve().parent
#: The conftest of a pytester run whose VMs come from the fake driver (plugin logic only).
#: ``LAUNCHES`` lists every config the fake driver was asked to launch.
FAKE_CONFTEST = f"""
import json, sys
sys.path.insert(0, {str(TESTS_DIR)!r})
import pytest
from fake_driver import FakeDriver, LAUNCHES

@pytest.hookimpl(tryfirst=True)
def pytest_smolvm_make_driver(config, pytestconfig):
    return FakeDriver()
"""


def qemu_processes() -> dict[int, str]:
    """Every QEMU process on the host: pid -> command line (processes that exit while we
    look are skipped)."""
    return processes("qemu-system")


def processes(text: str) -> dict[int, str]:
    """Every process whose command line mentions ``text``: pid -> command line."""
    found = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                found[int(pid)] = cmd
    return found


#: Settings of the outer run that a pytester run must not inherit (they would reshape its VMs).
OUTER_SETTINGS = ("SMOLVM_NETWORK", "SMOLVM_VCPUS", "SMOLVM_MEMORY_MIB", "SMOLVM_IMAGE", "SMOLVM_ACCEL")


P = TypeVar("P")


def isolated_pytester(pytester: P, monkeypatch: Any, conftest: str | None = FAKE_CONFTEST) -> P:
    """``pytester`` cut off from the outer run's settings, on the real image cache, with
    ``conftest`` (default: the fake driver's) written."""
    for var in OUTER_SETTINGS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(REAL_CACHE))
    if conftest is not None:
        pytester.makeconftest(conftest)  # type: ignore[attr-defined]  # P is a pytest.Pytester
    return pytester
