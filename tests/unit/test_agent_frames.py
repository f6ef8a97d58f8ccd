"""The static agent's frame parser, fuzzed: hostile bytes from the host side of the channel.

The agent's C source is built here a second time with gcc's AddressSanitizer and
UndefinedBehaviorSanitizer (any out-of-bounds access, leak or overflow aborts it), and driven
two ways:
- ``--parse-frames`` (the very read_frame/JSON code the agent serves with) against
  protocol.decode, the host's reference: the same frames are accepted, with equal headers
  and body lengths, and the same stream is rejected;
- ``--serve-fd`` with garbage and mutated frames: it answers or stops (status 3), never
  crashes, and never acts on bytes after a frame it rejected.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from agentproc import recv_frame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_smolvm.guest import protocol
from pytest_smolvm.images.agentbin import compile_agent

SANITIZE = ("-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-Wall", "-Wextra",
            "-Werror", "-pthread")
ENV = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:exitcode=86",
       "UBSAN_OPTIONS": "halt_on_error=1:exitcode=87:print_stacktrace=1"}
SANITIZER_FAILURES = (86, 87)


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the sanitized agent (Debian: apt-get install gcc)")
    return compile_agent(tmp_path_factory.mktemp("asan") / "agent-asan", compiler="gcc", flags=SANITIZE)


# ---------------------------------------------------------------- the reference

def reference(stream: bytes) -> tuple[list[tuple[int, dict[str, Any]]], str]:
    """What protocol.decode makes of ``stream``: the frames, and how it ended (eof/error)."""
    src = io.BytesIO(stream)

    def read_exact(n: int) -> bytes:
        data = src.read(n)
        if len(data) < n:
            raise EOFError
        return data

    frames: list[tuple[int, dict[str, Any]]] = []
    while True:
        try:
            header, body = protocol.decode(read_exact, 1 << 30)
        except EOFError:
            return frames, "eof"
        except protocol.FrameError:
            return frames, "error"
        frames.append((len(body), header))


def agent_parse(binary: Path, stream: bytes) -> tuple[list[tuple[int, dict[str, Any]]], str]:
    res = subprocess.run([str(binary), "--parse-frames"], input=stream, capture_output=True, timeout=60, env=ENV)
    assert res.returncode not in SANITIZER_FAILURES, res.stderr.decode(errors="replace")[-4000:]
    assert res.returncode in (0, 3), (res.returncode, res.stderr[-2000:])
    frames = []
    for line in res.stdout.decode().splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "ok":
            size, _, text = rest.partition(" ")
            frames.append((int(size), json.loads(text)))
    return frames, "error" if res.returncode == 3 else "eof"


# ---------------------------------------------------------------- frames

SCALARS = (st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 63) - 1)
           | st.floats(allow_nan=False) | st.text())
VALUES = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(), kids, max_size=4),
                      max_leaves=12)
HEADERS = st.dictionaries(st.text(max_size=8), VALUES, max_size=5).map(lambda d: {"op": "ping", **d})


def raw_frame(header_text: bytes, body: bytes, *, blen: int | None = None) -> bytes:
    return protocol.PREFIX.pack(protocol.MAGIC, len(header_text), len(body) if blen is None else blen) \
        + header_text + body


@st.composite
def header_texts(draw: st.DrawFn) -> bytes:
    """JSON text of a header, well-formed or not: encoded by Python (ASCII or raw UTF-8), or
    hand-written edge cases, or any of those with a byte changed."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        text = draw(st.sampled_from(EDGE_CASES))
    else:
        header = draw(HEADERS)
        text = (json.dumps(header).encode() if kind == 1 else json.dumps(header, ensure_ascii=False).encode()
                if kind == 2 else json.dumps(header, indent=1).encode())
    if draw(st.booleans()) and text:
        pos = draw(st.integers(0, len(text) - 1))
        text = text[:pos] + bytes([draw(st.integers(0, 255))]) + text[pos + 1:]
    return text


EDGE_CASES = [
    b'{"op":"ping"}', b' {"op":"ping"}', b'{"op":"ping"} ', b'{"op":"ping",}', b'{"op":"ping" , "a" : [ 1 , 2 ] }',
    b'{"op":1}', b'[]', b'"op"', b'{"op":"ping","id":NaN}', b'{"op":"ping","id":Infinity}', b'{"op":"ping","x":1e309}',
    b'{"op":"ping","x":-0.0}', b'{"op":"ping","x":01}', b'{"op":"ping","x":1.}', b'{"op":"ping","x":.5}',
    b'{"op":"ping","x":1e}', b'{"op":"ping","x":-}', b'{"op":"ping","x":"\\ud83d\\ude00"}',
    b'{"op":"ping","x":"\\ud800"}', b'{"op":"ping","x":"\\udc00\\ud800"}', b'{"op":"ping","x":"\\u12"}',
    b'{"op":"ping","x":"\\x"}', b'{"op":"ping","x":"a\tb"}', b'{"op":"ping","x":"\x7f"}', b'{"op":"p\\u0000ng"}',
    b'{"op":"ping","op":"pong"}', b'{"op":"ping","x":"\xed\xa0\x80"}', b'{"op":"ping","x":"\xc0\x80"}',
    b'{"op":"ping","x":"\xf4\x90\x80\x80"}', b'{"op":"ping","x":"\xe2\x82"}', b'{"op":"ping","x":tru}',
    b'{"op":"ping","x":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}', b'{"op":"ping"',
    b'{"op":"ping","x":{"y":}}', b'{"op":"ping",1:2}', b'{"op"  :  "ping"}', b'{\n"op":"ping"\r\n}',
]


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    """Several frames in a row, the last possibly cut short or with a bad prefix."""
    out = b""
    for _ in range(draw(st.integers(1, 4))):
        out += raw_frame(draw(header_texts()), draw(st.binary(max_size=16)))
    tail = draw(st.sampled_from(["none", "cut", "magic", "hlen0", "hlen-big", "blen-big"]))
    if tail == "cut":
        out = out[:draw(st.integers(0, len(out)))]
    elif tail == "magic":
        out += b"XV" + out[2:12]
    elif tail == "hlen0":
        out += protocol.PREFIX.pack(protocol.MAGIC, 0, 0)
    elif tail == "hlen-big":
        out += protocol.PREFIX.pack(protocol.MAGIC, protocol.MAX_HEADER + 1, 0)
    elif tail == "blen-big":
        out += raw_frame(b'{"op":"ping"}', b"", blen=(1 << 30) + 1)
    return out


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=streams())
def test_agent_parses_frames_like_the_host(sanitized: Path, stream: bytes) -> None:
    expected = reference(stream)
    got = agent_parse(sanitized, stream)
    assert got[1] == expected[1], f"agent {got[1]}, protocol.decode {expected[1]} for {stream!r:.600}"
    # == is exact but for 1e5 == 100000: the agent writes an integral float as an integer.
    assert got[0] == expected[0], f"{got[0]!r:.400} != {expected[0]!r:.400}"


@pytest.mark.parametrize("text", EDGE_CASES)
def test_edge_cases_like_the_host(sanitized: Path, text: bytes) -> None:
    stream = raw_frame(text, b"body")
    assert agent_parse(sanitized, stream) == reference(stream)


@pytest.mark.parametrize("text", [
    b'{"op":"ping","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"op":"ping","x":' + b'{"a":' * 10_000 + b"1" + b"}" * 10_000 + b"}",
    b'{"op":"ping","id":' + b"9" * 5000 + b"}",
    b'{"op":"ping","x":"' + b"\\u0041" * 10_000 + b'"}',
])
def test_hostile_headers_are_bounded(sanitized: Path, text: bytes) -> None:
    """Deep nesting is refused (not a stack overflow); long numbers and strings are fine."""
    text = text[:protocol.MAX_HEADER]
    frames, end = agent_parse(sanitized, raw_frame(text, b""))
    assert (frames, end) == ([], "error") or len(frames) == 1


# ---------------------------------------------------------------- the serving loop

class Served:
    def __init__(self, binary: Path, cwd: Path) -> None:
        self.sock, guest = socket.socketpair()
        self.proc = subprocess.Popen([str(binary), "--serve-fd", str(guest.fileno())], pass_fds=[guest.fileno()],
                                     cwd=cwd, env=ENV, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        guest.close()
        self.sock.settimeout(20)

    def finish(self) -> tuple[int, bytes]:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        _, err = self.proc.communicate(timeout=60)
        self.sock.close()
        return self.proc.returncode, err


SAFE_OPS = [{"op": "ping"}, {"op": "hello"}, {"op": "frob"}, {"op": "get", "path": "/nonexistent-smolvm/x"},
            {"op": "get", "path": "/proc/self/stat", "max": 5}]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.sampled_from(SAFE_OPS), min_size=1, max_size=4), garbage=st.binary(max_size=64),
       flip=st.integers(0, 200))
def test_serve_answers_or_stops_never_crashes(sanitized: Path, tmp_path: Path, ops: list[dict[str, Any]],
                                              garbage: bytes, flip: int) -> None:
    frames = [protocol.encode({**op, "id": i}) for i, op in enumerate(ops, 1)]
    stream = bytearray(b"".join(frames) + garbage)
    if flip < len(stream):
        stream[flip] ^= 0x5A
    served = Served(sanitized, tmp_path)
    served.sock.sendall(bytes(stream))
    expected, end = reference(bytes(stream))
    replies = []
    for _ in expected:
        try:
            replies.append(recv_frame(served.sock)[0])
        except (EOFError, OSError):
            break
    code, err = served.finish()
    assert code not in SANITIZER_FAILURES, err.decode(errors="replace")[-4000:]
    assert code == (3 if end == "error" else 0), (code, err[-1000:])
    # One reply per frame the reference accepts (exec-free ops answer in order), none after.
    assert [r.get("id") for r in replies] == [h.get("id") for _, h in expected]


def test_serve_exec_under_sanitizers(sanitized: Path, tmp_path: Path) -> None:
    """The exec path (threads, vfork, pidfd, pipes, caps, timeout) with the sanitizers on."""
    served = Served(sanitized, tmp_path)
    reqs = [({"argv": ["sh", "-c", "head -c 300000 /dev/zero; echo e >&2"], "max_output": 1000}, b"",
             (0, bytes(1000) + b"e\n")),
            ({"argv": ["cat"], "env": {"A": "b"}, "cwd": str(tmp_path)}, b"x" * 200_000, (0, b"x" * 200_000)),
            ({"argv": ["sleep", "10"], "timeout": 0.2}, b"", (-9, b"")),
            ({"argv": ["nonexistent-smolvm"]}, b"",
             (127, b"smolvm: cannot execute nonexistent-smolvm: command not found\n"))]
    for i, (req, stdin, expected) in enumerate(reqs, 1):
        served.sock.sendall(protocol.encode({"op": "exec", "id": i, **req}, stdin))
        header, body = recv_frame(served.sock)
        assert header["id"] == i and header["op"] == "result", header
        assert (header["exit_code"], body) == expected
    code, err = served.finish()
    assert code == 0, err.decode(errors="replace")[-4000:]
