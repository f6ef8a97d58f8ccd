"""``pytest_smolvm_*`` hook specifications (added in ``pytest_addhooks``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .config import VMConfig
    from .drivers import Driver
    from .vm import SmolVM


def pytest_smolvm_configure(config: VMConfig, request: pytest.FixtureRequest) -> VMConfig | None:
    """Adjust a VM's config before boot: return ``config.replace(...)`` or None to keep it.

    Called for every VM the fixtures start, after markers and options are applied (for
    ``smolvm_factory``, before the factory's own keyword overrides). When several
    implementations change the same field, the one called first wins (``tryfirst`` first).
    The returned config is validated like any other.
    """


@pytest.hookspec(firstresult=True)
def pytest_smolvm_make_driver(config: VMConfig, pytestconfig: pytest.Config) -> Driver | None:
    """Return the driver that will run a VM with ``config`` (first non-None result wins).

    The built-in implementation is ``trylast`` and picks the backend from ``config.backend``;
    implement this hook to plug in your own :class:`~pytest_smolvm.drivers.Driver`.
    """


def pytest_smolvm_ready(vm: SmolVM, request: pytest.FixtureRequest) -> Any:
    """Called after a VM has booted and before the test that asked for it runs.

    Use it to provision the guest (``vm.put``, ``vm.run``); an exception here is a setup
    error of the test and the VM is destroyed.
    """
