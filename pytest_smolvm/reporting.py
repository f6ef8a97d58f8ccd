"""Text for humans: sanitising guest output before it reaches a terminal or a report, and
masking secrets (pure).

Everything a guest can influence (command output, agent error strings, console lines) goes
through :func:`sanitize` (or :func:`clip`, which also bounds it) before it is put into an
exception message, a report section or the terminal; the raw bytes stay on the result objects.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

# CSI / OSC / other ESC sequences, then any C0/C1 control character except \n and \t.
_ESCAPES = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b\n]*(\x07|\x1b\\)?|[@-Z\\-_])")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Bidirectional overrides/isolates and marks ("Trojan Source", CVE-2021-42574), invisible
# separators and BOM: they reorder or hide what a reader sees without being visible themselves.
_INVISIBLE = re.compile("[\u061c\u200b\u200e\u200f\u2028-\u202e\u2060\u2066-\u2069\ufeff]")
#: Secrets shorter than this are not masked in free text: "1" would turn every digit into ***.
MIN_SECRET = 4
MASK = "***"


def sanitize(text: str) -> str:
    """Make guest-produced text safe to print: terminal escape sequences, control characters
    and bidi/invisible format characters become visible ``\\xNN``/``\\uNNNN`` escapes instead
    of acting on the reader's terminal. Idempotent."""
    text = text.replace("\r\n", "\n")
    text = _ESCAPES.sub(lambda m: repr(m.group(0))[1:-1], text)
    text = _CONTROLS.sub(lambda m: f"\\x{ord(m.group(0)):02x}", text)
    return _INVISIBLE.sub(lambda m: f"\\u{ord(m.group(0)):04x}", text)


def clip(text: str, limit: int, *, end: bool = False) -> str:
    """:func:`sanitize` ``text`` and keep at most ``limit`` characters of it (its start, or
    with ``end=True`` its end), saying how much was left out."""
    if len(text) <= limit:
        return sanitize(text)
    cut = f"[... {len(text) - limit} more characters]"
    if end:
        return f"{cut}{sanitize(text[-limit:])}"
    return f"{sanitize(text[:limit])}{cut}"


def redact(text: str, secrets: Iterable[str]) -> str:
    """Replace every secret in ``text`` by ``***``, as written and as Python's ``repr`` shows
    it (tracebacks show locals through repr). Values under :data:`MIN_SECRET` characters stay."""
    forms: set[str] = set()
    for secret in secrets:
        if len(secret) >= MIN_SECRET:
            forms.update((secret, repr(secret)[1:-1], repr(secret.encode(errors="replace"))[2:-1]))
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, MASK)
    return text


def tail(text: str, lines: int = 40, max_line: int = 1000) -> str:
    """The last ``lines`` lines of ``text``, each cut to ``max_line`` characters (guest text
    can hold a line of any length)."""
    out = []
    for line in text[-lines * (max_line + 1) * 4:].splitlines()[-lines:]:
        out.append(line if len(line) <= max_line else line[:max_line] + f" [... line cut at {max_line} chars]")
    return "\n".join(out)


class LiveOutput:
    """An ``on_output`` callback that shows a VM's command output as it arrives, one line at a
    time, each line :func:`sanitize`-d, passed through ``redact`` and prefixed with the VM's
    name: ``[vm3-ab12] text`` (stderr: ``[vm3-ab12 stderr] text``). A line longer than
    ``max_line`` characters is shown in pieces, so a guest never makes it hold more than that;
    :meth:`flush` shows what is left of unfinished lines (called when a command ends)."""

    def __init__(self, name: str, write: Callable[[str], None], redact: Callable[[str], str] = str,
                 max_line: int = 4096) -> None:
        self.name = name
        self.write = write
        self.redact = redact
        self.max_line = max_line
        self._partial = {"stdout": "", "stderr": ""}

    def __call__(self, stream: str, text: str) -> None:
        *lines, rest = (self._partial[stream] + text).split("\n")
        while len(rest) > self.max_line:
            lines.append(rest[:self.max_line])
            rest = rest[self.max_line:]
        self._partial[stream] = rest
        self._show(stream, lines)

    def flush(self) -> None:
        for stream, rest in self._partial.items():
            if rest:
                self._partial[stream] = ""
                self._show(stream, [rest])

    def _show(self, stream: str, lines: list[str]) -> None:
        if lines:
            label = self.name if stream == "stdout" else f"{self.name} {stream}"
            self.write("".join(f"[{label}] {sanitize(self.redact(line))}\n" for line in lines))


def redacted_repr(env: Mapping[str, str]) -> str:
    """An environment as a traceback may show it: the names, every value ``***``."""
    return "{" + ", ".join(f"{k!r}: '***'" for k in env) + "}"
