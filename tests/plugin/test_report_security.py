"""What a failing test's report shows under -vv -l: no env secret, no raw terminal escape
(fake driver: the real agent in a thread, commands run on the host, so only harmless ones)."""

from __future__ import annotations

import secrets

import pytest
from test_plugin import fake

__all__ = ["fake"]


def test_env_secrets_never_reach_vv_l_output(fake: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    marker_secret, run_secret = f"MARK{secrets.token_hex(10)}", f"RUN{secrets.token_hex(10)}"
    monkeypatch.setenv("CI_MARK", marker_secret)
    monkeypatch.setenv("CI_RUN", run_secret)
    fake.makepyfile("""
        import os
        import pytest

        @pytest.mark.smolvm(env={"MARK": os.environ["CI_MARK"]})
        def test_config_shown(smolvm, smolvm_config):
            token = os.environ["CI_RUN"]
            smolvm.run("echo $MARK; echo $TOKEN >&2; exit 3", env={"TOKEN": token}, check=True)

        @pytest.mark.smolvm(env={"MARK": os.environ["CI_MARK"]})
        def test_assert_shown(smolvm):
            r = smolvm.run("echo $MARK $TOKEN", env={"TOKEN": os.environ["CI_RUN"]})
            assert r.stdout == "", r.stdout
    """)
    result = fake.runpytest("-vv", "-l", "--tb=long", "-rA")
    result.assert_outcomes(failed=2)
    out = result.stdout.str() + result.stderr.str()
    assert "CommandFailed" in out and "***" in out
    assert marker_secret not in out and run_secret not in out


def test_guest_escapes_never_reach_the_terminal_raw(fake: pytest.Pytester) -> None:
    fake.makepyfile(r"""
        def test_escapes(smolvm):
            r = smolvm.run(r"printf '\033]0;pwned\007\033[2J\342\200\256evil'")
            print(r.stdout)
            assert r.stdout == "", r.stdout
    """)
    result = fake.runpytest("-vv", "-l")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "pwned" in out and "\\x1b]0;pwned" in out
    assert "\x1b" not in out and "\u202e" not in out and "\x07" not in out
