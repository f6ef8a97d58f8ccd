"""The one exception tree of pytest-smolvm.

::

    SmolVMError
    ├── ConfigError        a bad value in a VM config, marker or option (names it and its source)
    ├── ImageError         guest image missing, corrupt or not buildable (says how to fix it)
    ├── BootError          the VM did not come up (carries the console tail)
    ├── GuestError         something went wrong talking to a running guest
    │   ├── CommandTimeout     run() exceeded its timeout; the guest process group was killed
    │   ├── CommandFailed      run(check=True) saw a non-zero exit; carries the result
    │   ├── GuestDied          the guest panicked, powered off or the VMM crashed mid-call
    │   ├── GuestFileError     put()/get() failed inside the guest (missing file, permissions)
    │   └── ProtocolError      the guest broke the control protocol (malformed/oversize frame)
    └── NetworkError       a network policy could not be applied

Third-party exceptions are mapped at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .vm import RunResult


class SmolVMError(Exception):
    """Base class of every error pytest-smolvm raises.

    ``infra`` is True when the failure is the infrastructure's (the VM did not boot, the
    VMM crashed, the agent stopped answering), not something the code under test did; the
    pytest plugin reports such failures as ERROR, not FAILED.
    """

    infra: bool = False


class ConfigError(SmolVMError, ValueError):
    """A configuration value is invalid; the message names the value and where it came from."""


class ImageError(SmolVMError):
    """The guest image is missing, corrupt or could not be built."""


class BootError(SmolVMError):
    """The VM failed to boot. ``console_tail`` holds the last lines of the guest console."""

    infra = True

    def __init__(self, message: str, console_tail: str = "") -> None:
        self.console_tail = console_tail
        if console_tail:
            message = f"{message}\n--- guest console (tail) ---\n{console_tail}"
        super().__init__(message)


class GuestError(SmolVMError):
    """Base class for failures while talking to a running guest."""


class CommandTimeout(GuestError, TimeoutError):
    """``run()`` exceeded its timeout. The guest process group was killed."""

    def __init__(
        self, message: str, *, command: str, timeout: float, stdout: str = "", stderr: str = "",
        infra: bool = False,
    ) -> None:
        super().__init__(message)
        self.infra = infra
        self.command = command
        self.timeout = timeout
        self.stdout = stdout
        self.stderr = stderr


class CommandFailed(GuestError):
    """``run(check=True)`` saw a non-zero exit code. ``result`` is the full :class:`RunResult`."""

    def __init__(self, result: RunResult) -> None:
        self.result = result
        tail = result.stderr[-2000:] if result.stderr else result.stdout[-2000:]
        super().__init__(
            f"command {result.command!r} exited with {result.exit_code}"
            + (f"\n--- output (tail) ---\n{tail}" if tail else "")
        )


class GuestDied(GuestError):
    """The guest stopped (panic, poweroff, VMM crash) while a call was in flight.

    ``infra`` is True when the VMM itself died (crash, or killed from outside), False when
    the guest powered off or panicked.
    """

    def __init__(self, message: str, console_tail: str = "", *, infra: bool = False) -> None:
        self.console_tail = console_tail
        self.infra = infra
        if console_tail:
            message = f"{message}\n--- guest console (tail) ---\n{console_tail}"
        super().__init__(message)


class GuestFileError(GuestError, OSError):
    """``put()``/``get()`` failed inside the guest."""


class ProtocolError(GuestError):
    """The guest sent something the control protocol does not allow."""


class NetworkError(SmolVMError):
    """A network policy could not be set up or torn down."""
