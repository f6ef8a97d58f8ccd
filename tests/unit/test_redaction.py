"""Guest text and secrets on their way to humans: what exception messages, reprs and
validation errors may show (pure; the real-VM proofs are in tests/integration/test_security_guest.py)."""

from __future__ import annotations

import pickle
import socket
import threading
from pathlib import Path

import pytest

from pytest_smolvm import RunResult, VMConfig, reporting
from pytest_smolvm.errors import BootError, CommandFailed, CommandTimeout, ConfigError, GuestDied, ProtocolError
from pytest_smolvm.reporting import sanitize

SECRET = "s3cr3t-Tok3n-value"
HOSTILE = "\x1b]0;pwned\x07\x1b[2J\u202eevil\u2066"
DANGEROUS = ("\x1b", "\x07", "\u202e", "\u2066", "\x9b")


def assert_harmless(text: str) -> None:
    for ch in DANGEROUS:
        assert ch not in text, f"{ch!r} reached {text!r}"


# ---------------------------------------------------------------- sanitize / clip / redact


@pytest.mark.parametrize("ch", ["\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067",
                                "\u2068", "\u2069", "\u200e", "\u200f", "\u061c", "\u2028", "\u2029"])
def test_bidi_and_line_separators_are_shown_escaped(ch: str) -> None:
    out = sanitize(f"if admin{ch} then")
    assert ch not in out
    assert f"\\u{ord(ch):04x}" in out
    assert sanitize(out) == out


def test_clip_bounds_guest_text_and_says_so() -> None:
    text = "x" * 100_000
    head = reporting.clip(text, 100)
    assert head.startswith("x" * 100) and len(head) < 200 and "99900 more characters" in head
    tail = reporting.clip("a" * 50 + "END", 10, end=True)
    assert tail.endswith("a" * 7 + "END") and "43 more characters" in tail
    assert reporting.clip("short", 100) == "short"


def test_clip_sanitises_after_cutting() -> None:
    out = reporting.clip(HOSTILE * 1000, 50)
    assert_harmless(out)
    assert len(out) < 50 * 6 + 60


def test_redact_masks_values_raw_and_in_repr_form() -> None:
    quoted = "it's\\a secret"
    text = f"TOKEN={SECRET} and {quoted!r} and {SECRET.encode()!r}"
    out = reporting.redact(text, [SECRET, quoted, "1"])
    assert SECRET not in out and "it\\'s" not in out and "it's" not in out
    assert out.count("***") == 3


def test_redact_leaves_short_values_alone() -> None:
    # A one-character value would turn every digit of a report into ***.
    assert reporting.redact("exit 1 after 12 s", ["1", "12"]) == "exit 1 after 12 s"


# ---------------------------------------------------------------- env in config


def test_vmconfig_repr_shows_env_keys_not_values() -> None:
    cfg = VMConfig(env={"TOKEN": SECRET, "PLAIN": "x"})
    assert SECRET not in repr(cfg) and SECRET not in str(cfg.env)
    assert "'TOKEN': '***'" in repr(cfg)
    assert cfg.env["TOKEN"] == SECRET and dict(cfg.env) == {"TOKEN": SECRET, "PLAIN": "x"}
    with pytest.raises(TypeError):
        cfg.env["X"] = "y"  # type: ignore[index]
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_pprint_and_saferepr_of_env_stay_redacted() -> None:
    import pprint

    from _pytest._io.saferepr import saferepr

    cfg = VMConfig(env={"TOKEN": SECRET})
    for shown in (pprint.pformat(cfg), pprint.pformat({"env": cfg.env}), saferepr(cfg), saferepr([cfg.env])):
        assert SECRET not in shown
    assert "'TOKEN': '***'" in pprint.pformat(cfg)


@pytest.mark.parametrize("env", [
    {"TOKEN": 12345678},
    {"TOKEN": f"{SECRET}\0"},
    f"TOKEN={SECRET}",
    ["TOKEN", SECRET],
    {"TOKEN": [SECRET]},
])
def test_env_validation_errors_never_show_values(env: object) -> None:
    with pytest.raises(ConfigError) as info:
        VMConfig(env=env)  # type: ignore[arg-type]
    msg = str(info.value)
    assert "env" in msg
    assert SECRET not in msg and "12345678" not in msg


# ---------------------------------------------------------------- exception messages


def _result(stdout: bytes, stderr: bytes, command: str = "make test") -> RunResult:
    return RunResult(command=command, exit_code=3, stdout=stdout.decode(errors="replace"),
                     stderr=stderr.decode(errors="replace"), duration=0.1, stdout_bytes=stdout,
                     stderr_bytes=stderr)


def test_command_failed_message_is_sanitised_bounded_and_keeps_raw_result() -> None:
    raw = HOSTILE.encode() * 100_000
    exc = CommandFailed(_result(b"", raw))
    assert_harmless(str(exc))
    assert len(str(exc)) < 20_000
    assert exc.result.stderr_bytes == raw       # the test still gets every byte


def test_command_failed_message_masks_secrets() -> None:
    exc = CommandFailed(_result(f"TOKEN={SECRET}\n".encode(), b"", command=f"echo {SECRET}"), secrets=[SECRET])
    assert SECRET not in str(exc)
    assert "***" in str(exc)


@pytest.mark.parametrize("make", [
    lambda: BootError(f"no boot: {HOSTILE}", HOSTILE * 50_000),
    lambda: GuestDied(f"died: {HOSTILE}", HOSTILE * 50_000),
    lambda: ProtocolError(f"bad: {HOSTILE}"),
    lambda: CommandTimeout(f"slow: {HOSTILE}", command=HOSTILE, timeout=1.0),
])
def test_guest_facing_errors_sanitise_and_bound_their_message(make: object) -> None:
    exc = make()  # type: ignore[operator]
    assert_harmless(str(exc))
    assert len(str(exc)) < 50_000


def test_cli_shell_shows_guest_output_escaped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_smolvm import cli
    from pytest_smolvm.guest import protocol

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "ctl.sock"))
    server.listen(1)

    def agent() -> None:  # answers hello, then one exec with hostile output
        conn, _ = server.accept()
        with conn:
            reader = conn.makefile("rb")
            for _ in range(2):
                req, _ = protocol.decode(reader.read, 1 << 20)
                body = HOSTILE.encode() if req["op"] == "exec" else b""
                conn.sendall(protocol.encode({"op": "result" if body else "hello", "id": req["id"], "exit_code": 1,
                                              "stdout_len": len(body)}, body))

    thread = threading.Thread(target=agent, daemon=True)
    thread.start()
    lines = iter(["cat evil"])

    def no_more(_prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", no_more)
    assert cli.main(["shell", str(tmp_path)]) == 0
    thread.join(5)
    server.close()
    out = capsys.readouterr().out
    assert_harmless(out)
    assert "\\x1b]0;pwned" in out and "\\u202e" in out and "[exit 1]" in out
