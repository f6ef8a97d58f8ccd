"""The one exception tree of pytest-smolvm.

::

    SmolVMError
    ├── ConfigError        a bad value in a VM config, marker or option (names it and its source)
    ├── ImageError         guest image missing, corrupt or not buildable (says how to fix it)
    ├── BootError          the VM did not come up (carries the console tail)
    ├── GuestError         something went wrong talking to a running guest
    │   ├── CommandTimeout     run() exceeded its timeout; the guest process group was killed
    │   ├── CommandFailed      run(check=True) saw a non-zero exit; carries the result
    │   ├── GuestTimeout       the guest agent did not answer put()/get() in time
    │   ├── GuestDied          the guest panicked, powered off or the VMM crashed mid-call
    │   ├── GuestFileError     put()/get() failed inside the guest (missing file, permissions)
    │   └── ProtocolError      the guest broke the control protocol (malformed/oversize frame)
    └── NetworkError       a network policy could not be applied
        └── NetworkUnavailable   this host or user cannot have that policy (the pytest
                                 layer skips the test with its one-line reason)

Third-party exceptions are mapped at the boundary with ``raise ... from exc``. Messages of
the errors a guest can influence are sanitised and bounded here, in their constructors
(:mod:`pytest_smolvm.reporting`): a hostile guest's output never acts on a reader's terminal.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from .reporting import clip, redact

if TYPE_CHECKING:
    from .results import RunResult

#: How much guest text (output tail, console tail) an exception message carries at most.
MESSAGE_TAIL = 2000
CONSOLE_TAIL = 8000


class SmolVMError(Exception):
    """Base class of every error pytest-smolvm raises.

    ``infra`` is True when the failure is the infrastructure's (the VM did not boot, the
    VMM or the host failed), not something the code under test did; the pytest plugin
    reports such failures as ERROR, not FAILED. A guest that stops answering is the code
    under test's doing (it may have stopped its own agent), so that is a FAILED test.
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
        super().__init__(_with_console(message, console_tail))


def _with_console(message: str, console_tail: str) -> str:
    message = clip(message, 4 * MESSAGE_TAIL)
    if console_tail:
        message = f"{message}\n--- guest console (tail) ---\n{clip(console_tail, CONSOLE_TAIL, end=True)}"
    return message


class GuestError(SmolVMError):
    """Base class for failures while talking to a running guest."""


class CommandTimeout(GuestError, TimeoutError):
    """``run()`` exceeded its timeout. The guest process group was killed."""

    def __init__(
        self, message: str, *, command: str, timeout: float, stdout: str = "", stderr: str = "",
        infra: bool = False,
    ) -> None:
        super().__init__(clip(message, 4 * MESSAGE_TAIL))
        self.infra = infra
        self.command = command
        self.timeout = timeout
        self.stdout = stdout
        self.stderr = stderr


class CommandFailed(GuestError):
    """``run(check=True)`` saw a non-zero exit code. ``result`` is the full :class:`RunResult`
    (raw output included); the message shows a sanitised tail with ``secrets`` masked."""

    def __init__(self, result: RunResult, *, secrets: Iterable[str] = ()) -> None:
        self.result = result
        secrets = tuple(secrets)
        output = redact(result.stderr or result.stdout, secrets)
        tail = clip(output, MESSAGE_TAIL, end=True) if output else ""
        super().__init__(
            f"command {clip(redact(result.command, secrets), 500)!r} exited with {result.exit_code}"
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
        super().__init__(_with_console(message, console_tail))


class GuestTimeout(GuestError, TimeoutError):
    """The guest agent did not answer a call (``put()``/``get()``) in time: the guest is
    overloaded, or the code under test stopped its agent. The channel stays usable."""

    def __init__(self, message: str) -> None:
        super().__init__(clip(message, 4 * MESSAGE_TAIL))


class GuestFileError(GuestError, OSError):
    """``put()``/``get()`` failed inside the guest."""


class ProtocolError(GuestError):
    """The guest sent something the control protocol does not allow."""

    def __init__(self, message: str) -> None:
        super().__init__(clip(message, 4 * MESSAGE_TAIL))


class NetworkError(SmolVMError):
    """A network policy could not be set up or torn down."""


class NetworkUnavailable(NetworkError):
    """This host does not let this user have the network policy asked for (e.g. no
    unprivileged user namespaces, no pasta): the message is one line naming the fix."""
