"""The static guest agent in a real VM: what it is, how it protects itself, and what it does
for a guest that lacks what the Python agent needed (no shell, no Python)."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

import pytest

from pytest_smolvm import ImageError, SmolVM
from pytest_smolvm.images.recipe import AGENT_PATH

PT_DYNAMIC, PT_INTERP = 2, 3

FIND_AGENT = f"for p in /proc/[0-9]*; do [ \"$(readlink $p/exe)\" = {AGENT_PATH} ] && echo ${{p#/proc/}}; done"


def program_header_types(elf: bytes) -> set[int]:
    assert elf[:4] == b"\x7fELF" and elf[4] == 2, "not a 64-bit ELF"
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    return {struct.unpack_from("<I", elf, phoff + i * phentsize)[0] for i in range(phnum)}


def test_agent_is_one_static_binary(smolvm: SmolVM) -> None:
    types = program_header_types(smolvm.get(AGENT_PATH))
    assert PT_INTERP not in types and PT_DYNAMIC not in types, "the agent needs a dynamic loader"
    pids = smolvm.run(FIND_AGENT).stdout.split()
    assert len(pids) == 1, pids
    assert smolvm.run(["cat", f"/proc/{pids[0]}/cmdline"]).stdout == AGENT_PATH + "\0"


def test_agent_is_protected_and_commands_are_not(smolvm: SmolVM) -> None:
    pid = smolvm.run(FIND_AGENT).stdout.split()[0]
    agent = smolvm.run(f"cat /proc/{pid}/oom_score_adj /proc/{pid}/cgroup; cut -d' ' -f19 /proc/{pid}/stat")
    assert agent.stdout.split() == ["-1000", "0::/smolvm", "-20"]
    own = smolvm.run("cat /proc/self/oom_score_adj /proc/self/cgroup; cut -d' ' -f19 /proc/self/stat")
    assert own.stdout.split() == ["0", "0::/smolvm", "0"]


def test_shell_string_without_a_shell_fails_clearly(smolvm: SmolVM) -> None:
    smolvm.run(["/run/smolvm/busybox", "rm", "/usr/bin/sh"], check=True)
    t0 = time.monotonic()
    # The agent answers at once (exit 127, "smolvm: cannot execute /bin/sh: ..."), and run()
    # turns that into the caller's error (vm.NO_SHELL).
    with pytest.raises(ImageError, match="has no /bin/sh, so the shell string 'echo never' cannot run"):
        smolvm.run("echo never", timeout=10)
    assert time.monotonic() - t0 < 5
    assert smolvm.run(["/run/smolvm/busybox", "echo", "argv works"]).stdout == "argv works\n"


def test_agent_needs_no_python(smolvm: SmolVM) -> None:
    smolvm.run(["/run/smolvm/busybox", "sh", "-c", "rm -f /usr/bin/python3*; ! command -v python3"], check=True)
    smolvm.put(b"payload", "/root/a/b.txt", mode=0o600)
    assert smolvm.get("/root/a/b.txt") == b"payload"
    r = smolvm.run(["cat"], input=b"through stdin", env={"K": "v"}, cwd="/root/a")
    assert (r.exit_code, r.stdout) == (0, "through stdin")
    assert smolvm.run(["/run/smolvm/busybox", "sh", "-c", 'echo "$K $(pwd)"'], env={"K": "v"},
                      cwd="/root/a").stdout == "v /root/a\n"


def test_setup_makes_each_clone_unique_and_current(smolvm: SmolVM, smolvm_factory: Callable[..., SmolVM]) -> None:
    other = smolvm_factory()
    ids = []
    for vm in (smolvm, other):
        r = vm.run("uname -n; cat /etc/hostname /etc/machine-id; date +%s; head -c 16 /dev/urandom | od -An -tx1")
        uname, hostname, machine_id, now, *rand = r.stdout.split()
        assert uname == hostname == f"smolvm-{vm.name}"
        assert len(machine_id) == 32 and int(machine_id, 16) >= 0
        assert abs(int(now) - time.time()) < 5, "the guest clock was not set"
        ids.append((machine_id, "".join(rand)))
    assert ids[0][0] != ids[1][0] and ids[0][1] != ids[1][1]
