"""Pure parts of live output and spawn: the out/started reply parsers, the capped output
collector, the incremental decoding deliverer and the terminal line printer."""

from __future__ import annotations

from typing import Any

import pytest

from pytest_smolvm.errors import ProtocolError
from pytest_smolvm.guest import replies
from pytest_smolvm.process import MAX_QUEUED, CallbackFailed, Deliverer, Output
from pytest_smolvm.reporting import LiveOutput


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_parse_out_accepts_the_two_streams(stream: str) -> None:
    assert replies.parse_out({"op": "out", "id": 1, "stream": stream}) == stream


@pytest.mark.parametrize("stream", [None, "stdin", "STDOUT", 1, ["stdout"], "stdout\x1b[2J"])
def test_parse_out_rejects_anything_else(stream: Any) -> None:
    with pytest.raises(ProtocolError, match="stream"):
        replies.parse_out({"op": "out", "id": 1, "stream": stream})


@pytest.mark.parametrize("pid", [0, -1, 1 << 23, True, 1.0, "7", None])
def test_parse_started_rejects_bad_pids(pid: Any) -> None:
    with pytest.raises(ProtocolError, match="pid"):
        replies.parse_started({"op": "started", "id": 1, "pid": pid})


def test_parse_started() -> None:
    assert replies.parse_started({"op": "started", "id": 1, "pid": 4242}) == 4242


def test_output_caps_each_stream_and_flags_it() -> None:
    out = Output(10, deliver=False)
    out.add("stdout", b"12345678")
    out.add("stdout", b"abcdef")
    out.add("stderr", b"e")
    assert out.bytes("stdout") == b"12345678ab" and out.truncated == {"stdout": True, "stderr": False}
    out.add("stdout", b"more")   # nothing more is kept
    assert out.bytes("stdout") == b"12345678ab"
    merged = out.merged(replies.ExecReply(0, False, b"", b"!", False, False))
    assert (merged.stdout, merged.stderr, merged.stdout_truncated) == (b"12345678ab", b"e!", True)


def test_output_queue_is_bounded_when_the_consumer_lags() -> None:
    out = Output(1 << 20, deliver=True)
    for i in range(10 * MAX_QUEUED):
        out.add("stdout" if i % 2 else "stderr", b"x")   # alternating: no neighbour to merge with
    taken = out.take(0)
    assert len(taken) <= MAX_QUEUED
    assert sum(len(b) for _, b in taken) == 10 * MAX_QUEUED  # nothing lost
    assert out.take(0) == []


def test_output_queue_merges_neighbours_of_one_stream() -> None:
    out = Output(100, deliver=True)
    for chunk in (b"a", b"b", b"c"):
        out.add("stdout", chunk)
    out.add("stderr", b"e")
    out.add("stdout", b"d")
    assert out.take(0) == [("stdout", b"abc"), ("stderr", b"e"), ("stdout", b"d")]


def test_take_returns_at_the_end_without_waiting() -> None:
    out = Output(100, deliver=True)
    out.finish()
    assert out.take(30) == []


def test_deliverer_decodes_incrementally_and_finally() -> None:
    got: list[tuple[str, str]] = []
    d = Deliverer([lambda s, t: got.append((s, t))])
    d.feed([("stdout", b"\xc3"), ("stderr", b"err "), ("stdout", b"\xa9 ")])
    d.feed([("stdout", b"\xe2\x82")], final=True)   # an unfinished character at the end
    assert got == [("stderr", "err "), ("stdout", "é "), ("stdout", "\ufffd")]


def test_deliverer_wraps_a_callback_failure_and_flushes_printers() -> None:
    def boom(stream: str, text: str) -> None:
        raise ValueError("no")

    with pytest.raises(CallbackFailed) as info:
        Deliverer([boom]).feed([("stdout", b"x")])
    assert isinstance(info.value.error, ValueError)
    shown: list[str] = []
    printer = LiveOutput("vm1", shown.append)
    Deliverer([printer]).feed([("stdout", b"partial")], final=True)
    assert shown == ["[vm1] partial\n"]


def test_live_output_lines_prefixed_sanitised_and_redacted() -> None:
    shown: list[str] = []
    live = LiveOutput("vm7-ab", shown.append, redact=lambda t: t.replace("s3cret", "***"))
    live("stdout", "one\ntw")
    live("stderr", "\x1b]0;pwned\x07bad\u202e\n")
    live("stdout", "o s3cret\n")
    assert "".join(shown) == ("[vm7-ab] one\n"
                              "[vm7-ab stderr] \\x1b]0;pwned\\x07bad\\u202e\n"
                              "[vm7-ab] two ***\n")


def test_live_output_never_holds_more_than_a_line() -> None:
    shown: list[str] = []
    live = LiveOutput("vm", shown.append, max_line=10)
    live("stdout", "x" * 25)
    assert shown == ["[vm] xxxxxxxxxx\n[vm] xxxxxxxxxx\n"]
    live.flush()
    assert shown[-1] == "[vm] xxxxx\n"
    live("stdout", "\r\ncarriage\rreturn\n")
    assert shown[-1] == "[vm] \\x0d\n[vm] carriage\\x0dreturn\n"


def test_a_callback_that_is_not_callable_is_refused_before_anything_is_sent() -> None:
    from pytest_smolvm import ConfigError, SmolVM, VMConfig

    vm = SmolVM(VMConfig())  # never started: the check comes before any guest call
    with pytest.raises(ConfigError, match=r"invalid on_output=5 for run\(\)"):
        vm.run("true", on_output=5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"invalid on_output='x' for spawn\(\)"):
        vm.spawn("true", on_output="x")  # type: ignore[arg-type]
