"""The plugin's SIGTERM handler: installed only over the default action, in the main thread,
one-shot, and restored at unconfigure."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator

import pytest

from pytest_smolvm.plugin import SignalUnwinder, Terminated


@pytest.fixture
def default_sigterm() -> Iterator[None]:
    outer = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (this very run installed one)
    yield
    signal.signal(signal.SIGTERM, outer)


@pytest.mark.usefixtures("default_sigterm")
def test_sigterm_raises_once_then_the_default_action_is_back() -> None:
    unwinder = SignalUnwinder()
    unwinder.install()
    with pytest.raises(Terminated, match="SIGTERM received"):
        signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # a second one kills at once
    unwinder.restore()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert issubclass(Terminated, KeyboardInterrupt)  # pytest unwinds as for Ctrl-C


@pytest.mark.usefixtures("default_sigterm")
def test_restore_puts_the_default_back() -> None:
    unwinder = SignalUnwinder()
    unwinder.install()
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    unwinder.restore()
    unwinder.restore()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.usefixtures("default_sigterm")
def test_someone_elses_handler_or_ignore_is_left_alone() -> None:
    def theirs(signum: int, frame: object) -> None:
        pass

    for handler in (theirs, signal.SIG_IGN):
        signal.signal(signal.SIGTERM, handler)
        unwinder = SignalUnwinder()
        unwinder.install()
        assert signal.getsignal(signal.SIGTERM) is handler
        unwinder.restore()
        assert signal.getsignal(signal.SIGTERM) is handler


@pytest.mark.usefixtures("default_sigterm")
def test_not_installed_from_another_thread() -> None:
    unwinder = SignalUnwinder()
    t = threading.Thread(target=unwinder.install)
    t.start()
    t.join()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
