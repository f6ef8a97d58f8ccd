"""Shared test setup (tests/ and examples/).

With ``SMOLVM_REQUIRE_VMS=1`` (set by ``.ci/run``), a skipped test under
``tests/integration/`` or ``examples/`` is turned into a failure: CI must prove features
in real VMs, never pass by skipping them. A test may opt out with
``@pytest.mark.smolvm_optional(reason)`` (e.g. backends that need hardware this host lacks).

With ``SMOLVM_TEST_IMAGE=NAME`` (set by ``scripts/run-arm64``: ``default-arm64``), every VM
the tests start on the default image boots NAME instead, the fixtures' and those the tests
make with ``SmolVM(VMConfig())`` alike: the same tests then prove another guest architecture.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Generator
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
sys.path.insert(0, str(Path(__file__).parent / "tests"))  # tests/fake_driver.py, tests/helpers.py
REAL_VM_DIRS = {"integration", "examples"}
#: Where a VM's resolver forwards when its test names no upstream: a closed port on loopback,
#: never the host's real resolvers (tests send nothing past loopback and their own namespaces).
TEST_DNS_UPSTREAM = "127.0.0.1:9"
os.environ.setdefault("SMOLVM_DNS_UPSTREAM", TEST_DNS_UPSTREAM)  # pytester's runs, and workers


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "smolvm_optional(reason): may skip even under SMOLVM_REQUIRE_VMS=1")


@pytest.fixture(autouse=True, scope="session")
def _no_real_dns_upstream() -> Generator[None, None, None]:
    """VMs the tests make with the engine directly (no plugin layers, so no environment) get
    the same loopback upstream by default."""
    from pytest_smolvm.network import resolver

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(resolver, "default_upstreams", lambda: (TEST_DNS_UPSTREAM,))
        yield


@pytest.fixture(autouse=True)
def _no_shared_images_for_units(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit and plugin tests build their image caches themselves: an ``SMOLVM_IMAGE_PATH`` in
    the caller's environment (a helper's worktree, a CI host with a shared cache) would let
    them find real images and test something else."""
    if not REAL_VM_DIRS & set(request.node.path.parts):
        monkeypatch.delenv("SMOLVM_IMAGE_PATH", raising=False)


@pytest.fixture(autouse=True, scope="session")
def _smolvm_test_image() -> Generator[None, None, None]:
    name = os.environ.get("SMOLVM_TEST_IMAGE", "").strip()
    if not name:
        yield
        return
    from pytest_smolvm import images

    original = images.resolve

    def resolve(name_or_path: str) -> images.Image:
        return original(name if name_or_path == "default" else name_or_path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(images, "resolve", resolve)
        for module in list(sys.modules.values()):  # test modules that imported resolve itself
            if getattr(module, "__name__", "").startswith("test_") and getattr(module, "resolve", None) is original:
                mp.setattr(module, "resolve", resolve)
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if (
        report.skipped
        and os.environ.get("SMOLVM_REQUIRE_VMS") == "1"
        and REAL_VM_DIRS & set(Path(str(item.fspath)).parts)
        and item.get_closest_marker("smolvm_optional") is None
    ):
        report.outcome = "failed"
        report.longrepr = f"real-VM test was skipped but SMOLVM_REQUIRE_VMS=1: {report.longrepr}"
    return report
