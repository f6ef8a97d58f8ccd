"""Text for humans: sanitising guest output before it reaches a terminal or a report (pure)."""

from __future__ import annotations

import re

# CSI / OSC / other ESC sequences, then any C0/C1 control character except \n and \t.
_ESCAPES = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b\n]*(\x07|\x1b\\)?|[@-Z\\-_])")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def sanitize(text: str) -> str:
    """Make guest-produced text safe to print: terminal escape sequences and control
    characters become visible ``\\xNN`` escapes instead of acting on the reader's terminal."""
    text = text.replace("\r\n", "\n")
    text = _ESCAPES.sub(lambda m: repr(m.group(0))[1:-1], text)
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group(0)):02x}", text)


def tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])
