"""Run a snippet of "generated" code in a fresh VM and check what it printed.

The snippet below stands for code an AI model or a contributor wrote: it runs with root
inside its own microVM, so whatever it does to "its" machine, the host and the next test
never see it.
"""

from __future__ import annotations

import textwrap

import pytest

GENERATED = textwrap.dedent('''
    import os, sys

    def fib(n):
        a, b = 0, 1
        for _ in range(n):
            a, b = b, a + b
        return a

    print(fib(int(sys.argv[1])))
    os.system("rm -rf /usr/share/doc")      # misbehaves: its own VM only
''')


def test_generated_code_output(smolvm):
    smolvm.put(GENERATED.encode(), "/work/solution.py")
    r = smolvm.run(["python3", "/work/solution.py", "30"], timeout=30)
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "832040\n"


def test_previous_test_damage_is_gone(smolvm):
    # A fresh VM per test: the earlier rm -rf did not survive.
    assert smolvm.run("test -d /usr/share/doc").ok


def test_runaway_code_is_stopped(smolvm):
    from pytest_smolvm import CommandTimeout

    smolvm.put(b"while True:\n    pass\n", "/work/spin.py")
    with pytest.raises(CommandTimeout):
        smolvm.run(["python3", "/work/spin.py"], timeout=2)
    assert smolvm.run("echo still alive").stdout == "still alive\n"
