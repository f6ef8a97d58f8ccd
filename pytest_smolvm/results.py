"""What a command run in the guest returns (its own module, so errors.py can name it
without importing the VM handle)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What ``run()`` returns. ``stdout``/``stderr`` are decoded UTF-8 (errors replaced);
    the raw bytes are in ``stdout_bytes``/``stderr_bytes``. A negative ``exit_code`` means the
    process was killed by that signal (as with :mod:`subprocess`)."""

    command: str
    exit_code: int
    stdout: str
    stderr: str
    duration: float
    stdout_bytes: bytes = b""
    stderr_bytes: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def truncated(self) -> bool:
        """True if either stream went over ``max_output`` and was cut."""
        return self.stdout_truncated or self.stderr_truncated

