"""Live output and background processes in real microVMs: run(on_output=...) gets chunks
while the command runs, spawn() handles (wait, poll, kill, stdin, output so far, output cap),
run() working while spawns stream, and spawned processes dying with their VM."""

from __future__ import annotations

import signal
import threading
import time

import pytest
from helpers import REAL_CACHE, qemu_processes
from test_hostile import STEAL_PORT

from pytest_smolvm import CommandTimeout, GuestError, Process, ProtocolError, SmolVM, SmolVMError
from pytest_smolvm.guest import protocol

# ---------------------------------------------------------------- run(on_output=...)


def test_on_output_gets_chunks_before_the_command_exits(smolvm_session: SmolVM) -> None:
    seen: list[tuple[float, str, str]] = []
    t0 = time.monotonic()
    r = smolvm_session.run("echo one; echo warn >&2; sleep 1.5; echo two",
                           on_output=lambda stream, text: seen.append((time.monotonic(), stream, text)))
    done = time.monotonic()
    assert (r.exit_code, r.stdout, r.stderr) == (0, "one\ntwo\n", "warn\n")
    assert "".join(t for _, s, t in seen if s == "stdout") == "one\ntwo\n"
    assert "".join(t for _, s, t in seen if s == "stderr") == "warn\n"
    first_at, _, first = seen[0]
    assert first == "one\n" and done - first_at > 1.0, (first_at - t0, done - t0)   # live, not at the end


def test_on_output_never_splits_a_character_and_result_keeps_bytes(smolvm_session: SmolVM) -> None:
    texts: list[str] = []
    r = smolvm_session.run(r"printf '\303'; sleep 0.5; printf '\251 \377\n'",
                           on_output=lambda stream, text: texts.append(text))
    assert "".join(texts) == "é \ufffd\n" and texts[0].startswith("é")   # the lead byte waited
    assert r.stdout_bytes == b"\xc3\xa9 \xff\n"


def test_on_output_that_raises_kills_the_command(smolvm_session: SmolVM) -> None:
    class Stop(Exception):
        pass

    def stop(stream: str, text: str) -> None:
        raise Stop(text)

    t0 = time.monotonic()
    with pytest.raises(Stop, match="go"):
        smolvm_session.run("echo go; exec sleep 31", on_output=stop)
    assert time.monotonic() - t0 < 15
    assert smolvm_session.run(["pgrep", "-f", "sleep 31"]).exit_code == 1     # killed, group and all
    assert smolvm_session.transcript[-2].outcome == "killed: on_output raised"


def test_on_output_respects_the_cap_and_timeout(smolvm_session: SmolVM) -> None:
    got: list[str] = []
    r = smolvm_session.run("head -c 200000 /dev/zero | tr '\\0' x", max_output=5000,
                           on_output=lambda s, t: got.append(t))
    assert len("".join(got)) == 5000 and r.stdout_truncated and len(r.stdout) == 5000
    got.clear()
    with pytest.raises(CommandTimeout) as info:
        smolvm_session.run("echo before; sleep 30", timeout=1, on_output=lambda s, t: got.append(t))
    assert got == ["before\n"] and info.value.stdout == "before\n"


# ---------------------------------------------------------------- spawn()


def test_spawned_loop_streams_while_run_works(smolvm_session: SmolVM) -> None:
    p = smolvm_session.spawn("i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.1; done")
    assert p.pid and p.poll() is None and p.exit_code is None
    for i in range(3):                                            # other commands meanwhile
        assert smolvm_session.run(f"echo meanwhile {i}").stdout == f"meanwhile {i}\n"
    deadline = time.monotonic() + 20
    while p.stdout.count("\n") < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert p.stdout.startswith("tick 0\ntick 1\ntick 2\n")
    p.kill(signal.SIGTERM)
    r = p.wait(10)
    assert r.exit_code == -signal.SIGTERM and p.exit_code == -signal.SIGTERM
    assert r.stdout.startswith("tick 0\n")
    p.kill()                                                     # once it exited: nothing happens


def test_spawned_server_answers_while_the_test_runs_commands(smolvm_session: SmolVM) -> None:
    with smolvm_session.spawn(["python3", "-m", "http.server", "8765", "--bind", "127.0.0.1"],
                              cwd="/etc") as server:
        fetch = ("import time, urllib.request\n"
                 "for _ in range(200):\n"
                 "    try: print(urllib.request.urlopen('http://127.0.0.1:8765/hostname').read().decode()); break\n"
                 "    except OSError: time.sleep(0.1)\n")
        r = smolvm_session.run(["python3", "-c", fetch], timeout=60)
        assert r.stdout.strip() == smolvm_session.run("cat /etc/hostname").stdout.strip()
        assert server.poll() is None
    assert server.wait(10).exit_code == -signal.SIGKILL            # the with block killed it
    assert "GET /hostname" in server.stderr


def test_concurrent_runs_from_threads(smolvm_session: SmolVM) -> None:
    results: dict[int, str] = {}

    def worker(i: int) -> None:
        results[i] = smolvm_session.run(f"sleep 0.3; echo {i}").stdout

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {i: f"{i}\n" for i in range(4)}
    assert time.monotonic() - t0 < 4 * 0.3 + 3                   # they ran side by side


def test_wait_timeout_does_not_kill(smolvm_session: SmolVM) -> None:
    p = smolvm_session.spawn("sleep 30")
    t0 = time.monotonic()
    with pytest.raises(CommandTimeout, match="not killed"):
        p.wait(timeout=0.5)
    assert 0.4 < time.monotonic() - t0 < 5
    assert p.poll() is None
    p.kill()
    assert p.wait(10).exit_code == -signal.SIGKILL


def test_stdin_writes_reach_the_process(smolvm_session: SmolVM) -> None:
    head = smolvm_session.spawn("head -n1")
    head.write_stdin("first\nsecond\n")
    assert head.wait(10).stdout == "first\n"
    cat = smolvm_session.spawn(["cat"], input=b"given ")
    cat.write_stdin(b"then ")
    cat.write_stdin("more")
    cat.close_stdin()
    r = cat.wait(10)
    assert (r.exit_code, r.stdout) == (0, "given then more")
    with pytest.raises(GuestError, match="exited"):
        cat.write_stdin("late")
    cat.close_stdin()                                 # closing again is harmless, as with Popen
    sleeper = smolvm_session.spawn("exec sleep 30 <&-")   # closes its stdin itself...
    sleeper.close_stdin()
    with pytest.raises(GuestError, match="stdin is closed"):
        sleeper.write_stdin("x")                      # ...and ours is closed now
    sleeper.kill()


def test_flooding_spawn_is_capped(smolvm_session: SmolVM) -> None:
    p = smolvm_session.spawn("yes flood", max_output=10_000)
    deadline = time.monotonic() + 20
    while len(p.stdout_bytes) < 10_000 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert len(p.stdout_bytes) == 10_000
    assert smolvm_session.run("echo still answering").ok
    p.kill()
    r = p.wait(10)
    assert len(r.stdout_bytes) == 10_000 and r.stdout_truncated


def test_spawn_of_missing_command_exits_127(smolvm_session: SmolVM) -> None:
    p = smolvm_session.spawn(["smolvm-no-such-program"])
    r = p.wait(10)
    assert r.exit_code == 127 and "smolvm-no-such-program" in r.stderr


def test_closing_the_vm_kills_its_spawned_processes(smolvm_factory: object) -> None:
    vm = smolvm_factory()  # type: ignore[operator]
    p = vm.spawn("sleep 300")
    q = vm.spawn("cat")
    pid = vm.pid
    vm.close()
    assert pid not in qemu_processes()
    for proc in (p, q):
        with pytest.raises(SmolVMError, match="killed with the VM"):
            proc.wait(5)


def test_live_output_under_s_in_a_real_vm(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(REAL_CACHE))   # pytester moved HOME
    pytester.makepyfile(r"""
        import sys, time

        def test_live(smolvm, monkeypatch):
            writes = []
            real = sys.stdout
            class Stamped:
                def write(self, text):
                    writes.append((time.monotonic(), text))
                    return real.write(text)
                def flush(self):
                    real.flush()
            monkeypatch.setattr(sys, "stdout", Stamped())
            smolvm.run("echo live-one; printf '\033[31mred\n'; sleep 1.5; echo live-two >&2")
            done = time.monotonic()
            first = next(t for t, text in writes if "] live-one" in text)
            assert done - first > 1.0
            p = smolvm.spawn("echo from-spawn")
            p.wait(10)
    """)
    result = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*[[]vm*[]] live-one", r"[[]vm*[]] \x1b[[]31mred", "[[]vm* stderr[]] live-two",
                                 "[[]vm*:[0-9]*[]] from-spawn"])
    assert "\x1b" not in result.stdout.str()


def test_spawn_on_output_runs_in_its_own_thread(smolvm_session: SmolVM) -> None:
    got: list[tuple[str, str, str]] = []
    p = smolvm_session.spawn("echo a; sleep 0.3; echo b >&2",
                             on_output=lambda s, t: got.append((threading.current_thread().name, s, t)))
    r = p.wait(10)
    assert [(s, t) for _, s, t in got] == [("stdout", "a\n"), ("stderr", "b\n")]   # all delivered by wait()
    assert all(name.startswith("smolvm-spawn-") for name, _, _ in got)
    assert r.stdout == "a\n"


def test_spawn_on_output_that_raises_kills_it_and_wait_reraises(smolvm_session: SmolVM) -> None:
    def picky(stream: str, text: str) -> None:
        raise LookupError(f"unexpected {text.strip()}")

    p = smolvm_session.spawn("echo surprise; exec sleep 32", on_output=picky)
    with pytest.raises(LookupError, match="unexpected surprise"):
        p.wait(15)
    deadline = time.monotonic() + 10
    while p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert p.exit_code == -signal.SIGKILL
    assert smolvm_session.run(["pgrep", "-f", "sleep 32"]).exit_code == 1


# ---------------------------------------------------------------- a hostile guest forging frames


def _forge(vm: SmolVM, frames: bytes) -> Process:
    """Have a guest process steal the agent's channel and write ``frames`` into it
    (tests/integration/test_hostile.py's technique)."""
    vm.put(frames, "/root/frames.bin")
    # It writes only once the host has the agent's last frame (the spawn's "started", then the
    # put of /root/go) and a second more: bytes the agent sent meanwhile would interleave with
    # the forged ones and break the framing for a reason of their own (seen under nested KVM).
    # It exits once everything is written: the agent reports that exit after the last forged
    # byte, so a caller that waits for it sends its next request into a quiet channel.
    write_all = ("while not os.path.exists('/root/go'):\n    __import__('time').sleep(0.05)\n"
                 "__import__('time').sleep(1)\n"
                 "data = open(sys.argv[1], 'rb').read()\nwhile data:\n    data = data[os.write(fd, data):]\n"
                 "os._exit(0)\n")
    script = STEAL_PORT.replace("os.write(fd, bytes.fromhex(sys.argv[1]))\n", write_all)
    assert write_all in script
    vm.put(script.encode(), "/root/steal.py")
    stealer = vm.spawn(["python3", "/root/steal.py", "/root/frames.bin"])
    vm.put(b"", "/root/go")
    return stealer


def test_forged_out_frame_with_a_bad_stream_poisons_the_channel(smolvm: SmolVM) -> None:
    p = smolvm.spawn("sleep 60")
    _forge(smolvm, protocol.encode({"op": "out", "id": p._pending.id, "stream": "stdin"}, b"x"))  # type: ignore[union-attr]
    with pytest.raises(ProtocolError, match="stream"):
        p.wait(60)
    with pytest.raises(ProtocolError):      # nothing more from this guest is trusted
        smolvm.run("true")


def test_forged_output_flood_is_capped_on_the_host(smolvm: SmolVM) -> None:
    p = smolvm.spawn("sleep 60", max_output=100_000)
    rid = p._pending.id  # type: ignore[union-attr]
    stealer = _forge(smolvm, b"".join(protocol.encode({"op": "out", "id": rid, "stream": "stdout"}, b"f" * 65536)
                                      for _ in range(100)))   # 6.4 MiB of "output" the process never wrote
    # Until the stealer is done, a request's reply would interleave with its bytes (under
    # nested KVM the 6.4 MiB took longer than a fixed pause).
    assert stealer.wait(timeout=300).exit_code == 0
    assert len(p.stdout_bytes) == 100_000
    assert smolvm.run("echo still served").stdout == "still served\n"
    p.kill()
    r = p.wait(10)
    assert r.stdout_truncated and len(r.stdout_bytes) == 100_000
