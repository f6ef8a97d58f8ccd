"""The network ceiling (--smolvm-network / SMOLVM_NETWORK) holds against every route a config
takes after the markers: a ``pytest_smolvm_configure`` hook and a ``smolvm_config`` override.
Plugin logic, so the fake driver serves; it records every config it is asked to launch."""

from __future__ import annotations

import json

import pytest
from helpers import FAKE_CONFTEST, isolated_pytester

CONFTEST = FAKE_CONFTEST + """
_FIRST = []

def pytest_sessionstart(session):
    _FIRST.append(len(LAUNCHES))  # fake_driver may be imported already: count this run's only

def pytest_sessionfinish(session):
    with open("launches.json", "w") as f:
        json.dump([c.network for c in LAUNCHES[_FIRST[0]:]], f)
"""
RAISING_HOOK = """
def pytest_smolvm_configure(config, request):
    return config.replace(network="isolated")
"""
RAISING_OVERRIDE = """
@pytest.fixture
def smolvm_config(smolvm_config):
    return smolvm_config.replace(network="nat")
"""
TESTS = """
def test_function(smolvm):
    pass

def test_factory(smolvm_factory):
    smolvm_factory()

def test_session(smolvm_session):
    pass
"""


@pytest.fixture
def fake(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    return isolated_pytester(pytester, monkeypatch, conftest=None)


def _launched(pytester: pytest.Pytester) -> list[str]:
    return list(json.loads((pytester.path / "launches.json").read_text()))


def test_configure_hook_cannot_raise_the_policy_past_the_ceiling(fake: pytest.Pytester) -> None:
    fake.makeconftest(CONFTEST + RAISING_HOOK)
    fake.makepyfile(TESTS)
    result = fake.runpytest("--smolvm-network=none", "--smolvm-pool=0", "-rs")
    result.assert_outcomes(skipped=3)
    result.stdout.fnmatch_lines(["*network='isolated'*--smolvm-network=none caps network policy at 'none'*"])
    assert _launched(fake) == []  # no VM started at all, let alone an isolated one


def test_config_override_cannot_raise_the_policy_past_the_ceiling(
    fake: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMOLVM_NETWORK", "none")
    fake.makeconftest(CONFTEST + RAISING_OVERRIDE)
    fake.makepyfile(TESTS)
    result = fake.runpytest("--smolvm-pool=0", "-rs")
    # The session VM is not built from smolvm_config, so only it may run.
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(["*network='nat'*SMOLVM_NETWORK=none caps network policy at 'none'*"])
    assert _launched(fake) == ["none"]


def test_hook_and_override_may_lower_the_policy(fake: pytest.Pytester) -> None:
    fake.makeconftest(CONFTEST + RAISING_OVERRIDE.replace('"nat"', '"none"')
                      + RAISING_HOOK.replace('"isolated"', '"none"'))
    fake.makepyfile("""
        import pytest

        @pytest.mark.smolvm(network="isolated")
        def test_lowered(smolvm):
            pass
    """)
    fake.runpytest("--smolvm-network=isolated", "--smolvm-pool=0").assert_outcomes(passed=1)
    assert _launched(fake) == ["none"]
