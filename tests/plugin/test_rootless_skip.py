"""Networking without root where the host forbids it: a networked test is skipped with a
one-line reason naming the fix (never an ERROR with a traceback), and no VM starts. The host
without user namespaces is simulated in this process (runpytest runs in-process)."""

from __future__ import annotations

import json

import pytest
from helpers import FAKE_CONFTEST, isolated_pytester

from pytest_smolvm.network import userns

CONFTEST = FAKE_CONFTEST + """
_FIRST = []

def pytest_sessionstart(session):
    _FIRST.append(len(LAUNCHES))

def pytest_sessionfinish(session):
    with open("launches.json", "w") as f:
        json.dump([c.network for c in LAUNCHES[_FIRST[0]:]], f)
"""
TESTS = """
import pytest

@pytest.mark.smolvm(network="isolated")
def test_isolated(smolvm):
    pass

@pytest.mark.smolvm(network="nat", allow=["198.51.100.0/24"])
def test_nat(smolvm_factory):
    smolvm_factory()

def test_none(smolvm):
    pass
"""


@pytest.fixture
def fake(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    return isolated_pytester(pytester, monkeypatch, conftest=None)


def test_a_host_without_user_namespaces_skips_networked_tests_with_the_fix(
        fake: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(userns, "rootless", lambda: True)
    monkeypatch.setattr(userns, "_sysctl_is_zero", lambda path: path.endswith("unprivileged_userns_clone"))
    monkeypatch.setattr(userns, "_probe_cache", {})
    monkeypatch.setattr(userns.shutil, "which", lambda name, **kw: f"/usr/bin/{name}")
    fake.makeconftest(CONFTEST)
    fake.makepyfile(TESTS)
    result = fake.runpytest("--smolvm-pool=0", "-rs")
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines([
        "SKIPPED*network='isolated' without root: unprivileged user namespaces are off "
        "(fix: sysctl kernel.unprivileged_userns_clone=1, or root)",
        "SKIPPED*network='nat' without root: unprivileged user namespaces are off*"])
    assert "Traceback" not in result.stdout.str()
    assert json.loads((fake.path / "launches.json").read_text()) == ["none"]


def test_no_pasta_skips_nat_only(fake: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(userns, "rootless", lambda: True)
    monkeypatch.setattr(userns, "_probe_cache", {"userns": None})
    monkeypatch.setattr(userns.shutil, "which", lambda name, **kw: None if name == "pasta" else f"/usr/bin/{name}")
    monkeypatch.setattr(userns.os, "access", lambda path, mode: True)
    fake.makeconftest(CONFTEST)
    fake.makepyfile(TESTS.split("def test_none")[0])
    result = fake.runpytest("--smolvm-pool=0", "-rs", "-k", "test_nat")
    result.assert_outcomes(skipped=1, deselected=1)
    result.stdout.fnmatch_lines(["SKIPPED*network='nat' without root needs pasta for its uplink "
                                 "(fix: apt install passt, or run as root)"])
