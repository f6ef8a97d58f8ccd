"""Live output under ``-s``: each line of a running command's output on the terminal at once,
sanitised, secrets masked, prefixed with the VM's name; nothing of it with capture on (fake
driver: the real agent as a host process, so only harmless commands; the real-VM run of the
same is tests/integration/test_spawn_output.py::test_live_output_under_s_in_a_real_vm)."""

from __future__ import annotations

import pytest
from test_plugin import fake

__all__ = ["fake"]

TEST = r"""
import sys
import time

class Stamped:
    # Records when each write reached the terminal, then passes it on.
    def __init__(self, inner):
        self.inner, self.writes = inner, []
    def write(self, text):
        self.writes.append((time.monotonic(), text))
        return self.inner.write(text)
    def flush(self):
        self.inner.flush()

def test_live(smolvm, monkeypatch):
    stamped = Stamped(sys.stdout)
    monkeypatch.setattr(sys, "stdout", stamped)
    r = smolvm.run("echo first; printf 'esc \033[2J\033]0;title\007 end\n'; echo oops >&2; "
                   "sleep 1; echo $TOKEN; printf 'no newline'", env={"TOKEN": "hunter2-secret"})
    done = time.monotonic()
    first = next(t for t, text in stamped.writes if "] first" in text)
    print(f"RUN-DONE first line {done - first:.1f}s before the end")
    assert done - first > 0.5             # shown while the command still ran
    assert r.stdout.startswith("first\n")
"""


def test_s_shows_output_live_sanitised_and_prefixed(fake: pytest.Pytester) -> None:
    fake.makepyfile(TEST)
    result = fake.runpytest("-s", "-p", "no:randomly")
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    result.stdout.fnmatch_lines([
        "*[[]vm*[]] first",
        r"[[]vm*[]] esc \x1b[[]2J\x1b]0;title\x07 end",
        "[[]vm* stderr[]] oops",
        "[[]vm*[]] [*][*][*]",
        "[[]vm*[]] no newline",
        "RUN-DONE first line *s before the end",
    ])
    assert "\x1b" not in out and "hunter2-secret" not in out


def test_capture_on_shows_no_live_output(fake: pytest.Pytester) -> None:
    fake.makepyfile("""
        def test_quiet(smolvm):
            assert smolvm.live_output is None
            assert smolvm.run("echo first").stdout == "first\\n"
    """)
    result = fake.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=1)
    assert "] first" not in result.stdout.str()
