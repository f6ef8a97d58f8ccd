"""Unit tests of pytest_smolvm.reporting.sanitize: guest text made safe for a terminal."""

from __future__ import annotations

import random

import pytest

from pytest_smolvm.reporting import sanitize, tail


def assert_safe(text: str) -> None:
    for ch in text:
        code = ord(ch)
        assert ch in "\n\t" or code >= 0x20, f"control character {ch!r} in {text!r}"
        assert not 0x7F <= code <= 0x9F, f"DEL/C1 character {ch!r} in {text!r}"


@pytest.mark.parametrize(
    ("raw", "visible"),
    [
        ("\x1b[31mred\x1b[0m", ["red"]),
        ("\x1b[2J\x1b[H", []),
        ("\x1b[?1049h", []),
        ("\x1b]0;pwned title\x07after", ["pwned title", "after"]),
        ("\x1b]8;;http://evil.example/\x1b\\click\x1b]8;;\x1b\\", ["click"]),
        ("lone \x1b escape", ["lone ", " escape"]),
        ("end\x1b", ["end"]),
        ("nul\x00byte", ["nul", "byte"]),
        ("bell\x07", ["bell"]),
        ("back\x08\x08\x08space", ["back", "space"]),
        ("over\rwrite", ["over", "write"]),
        ("csi\x9b31m c1", ["csi", "31m c1"]),
        ("del\x7f", ["del"]),
        ("\x1bP1$r\x1b\\", []),
        ("\x1b(0box\x1b(B", ["box"]),
        ("\x1bc reset", [" reset"]),
    ],
)
def test_dangerous_sequences_are_neutralised(raw: str, visible: list[str]) -> None:
    out = sanitize(raw)
    assert_safe(out)
    assert "\x1b" not in out
    for part in visible:  # the readable text survives
        assert part in out
    # And the neutralised characters are shown, not dropped, so nothing is hidden from the reader.
    assert len(out) >= len(raw.replace("\r\n", "\n"))


def test_escape_becomes_visible_hex() -> None:
    assert sanitize("\x1b[31m") == "\\x1b[31m"
    assert sanitize("a\x00b") == "a\\x00b"
    assert sanitize("\x9b") == "\\x9b"
    assert sanitize("\x1b]0;t\x07") == "\\x1b]0;t\\x07"


def test_crlf_becomes_lf_but_lone_cr_is_escaped() -> None:
    out = sanitize("line1\r\nline2\rX\r\n")
    assert out == "line1\nline2\\x0dX\n"


def test_keeps_newline_tab_and_unicode() -> None:
    text = "café 日本語 ✓ \U0001f600\n\tindented\nÆØÅ ß ü\n"
    assert sanitize(text) == text


def test_plain_text_unchanged() -> None:
    text = "".join(chr(c) for c in range(0x20, 0x7F)) + "\n\t"
    assert sanitize(text) == text


def test_empty() -> None:
    assert sanitize("") == ""


def test_fuzz_output_always_safe_and_idempotent() -> None:
    rng = random.Random(2024)
    alphabet = [chr(c) for c in range(0, 0xA0)] + ["é", "日", "\u2028", "\x1b[", "\x1b]", "\r\n"]
    for _ in range(1000):
        raw = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        out = sanitize(raw)
        assert_safe(out)
        assert sanitize(out) == out


def test_fuzz_safe_text_is_untouched() -> None:
    rng = random.Random(7)
    safe = [chr(c) for c in range(0x20, 0x7F)] + ["\n", "\t", "é", "日", "ÿ", "\u00a0", "\U0001f600"]
    for _ in range(300):
        text = "".join(rng.choice(safe) for _ in range(rng.randrange(0, 60)))
        assert sanitize(text) == text


def test_unterminated_osc_keeps_following_lines() -> None:
    out = sanitize("progress\x1b]junk\nline two\nline three\n")
    assert_safe(out)
    assert out.count("\n") == 3
    assert "line two\n" in out


def test_tail() -> None:
    assert tail("a\nb\nc\n", 2) == "b\nc"
    assert tail("one", 5) == "one"
    assert tail("", 3) == ""
