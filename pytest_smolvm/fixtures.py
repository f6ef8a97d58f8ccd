"""The fixtures: ``smolvm``, ``smolvm_session``, ``smolvm_factory``, ``smolvm_config``,
``smolvm_prepared``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, Protocol, cast

import pytest

from .checkpoints import Checkpoint
from .config import VMConfig, config_from_layers
from .drivers import Driver
from .errors import ConfigError
from .network.userns import unavailable as network_unavailable
from .prepared import prepare
from .vm import SmolVM

#: The name the plugin's per-session state is registered under (plugin.py registers it;
#: fixtures find it by name, so neither module imports the other's internals both ways).
PLUGIN_NAME = "smolvm-state"


class SessionState(Protocol):
    """What the fixtures need from the plugin's per-session state (plugin.SmolVMPlugin)."""

    def config_for_item(self, item: pytest.Item) -> VMConfig: ...
    def session_config(self) -> VMConfig: ...
    def ceiling_violation(self, cfg: VMConfig) -> str | None: ...
    def start_vm(self, request: pytest.FixtureRequest, cfg: VMConfig,
                 checkpoint: Checkpoint | None = None) -> SmolVM: ...
    def finish_vm(self, request: pytest.FixtureRequest, vm: SmolVM) -> None: ...
    def driver_for(self, cfg: VMConfig) -> Driver: ...


def _plugin(config: pytest.Config) -> SessionState:
    plugin = config.pluginmanager.get_plugin(PLUGIN_NAME)
    if plugin is None:  # pragma: no cover - registered in pytest_configure
        raise RuntimeError("pytest-smolvm plugin state is not registered")
    return cast(SessionState, plugin)


def apply_configure_hook(request: pytest.FixtureRequest, cfg: VMConfig) -> VMConfig:
    """Merge what ``pytest_smolvm_configure`` implementations returned (first called wins)."""
    results = request.config.hook.pytest_smolvm_configure(config=cfg, request=request)
    merged: dict[str, Any] = {}
    for res in results:
        if not isinstance(res, VMConfig):
            raise ConfigError(f"pytest_smolvm_configure returned {res!r}; expected a VMConfig or None")
        for f in dataclasses.fields(VMConfig):
            if getattr(res, f.name) != getattr(cfg, f.name):
                merged.setdefault(f.name, getattr(res, f.name))
    return cfg.replace(**merged) if merged else cfg


@pytest.fixture
def smolvm_config(request: pytest.FixtureRequest) -> VMConfig:
    """The resolved VMConfig the ``smolvm`` fixture will boot (marker > CLI > env > ini).

    Override it in a conftest to change what ``smolvm`` and ``smolvm_factory`` start.
    """
    cfg = _plugin(request.config).config_for_item(request.node)
    return apply_configure_hook(request, cfg)


@pytest.fixture
def smolvm(smolvm_config: VMConfig, request: pytest.FixtureRequest) -> Iterator[SmolVM]:
    """A fresh, booted VM with its own copy-on-write disk; destroyed after the test."""
    plugin = _plugin(request.config)
    vm = plugin.start_vm(request, smolvm_config)
    yield vm
    plugin.finish_vm(request, vm)


@pytest.fixture
def smolvm_factory(
    smolvm_config: VMConfig, request: pytest.FixtureRequest
) -> Iterator[Callable[..., SmolVM]]:
    """``smolvm_factory(**overrides)`` starts a VM from ``smolvm_config`` plus ``overrides``;
    every VM it made is destroyed after the test.

    ``smolvm_factory(checkpoint=cp, **overrides)`` starts a clone of ``cp`` (``vm.checkpoint()``)
    from the checkpoint's config plus ``overrides`` (markers do not apply: the clone has the
    prepared VM's shape). Its network policy may differ among those with a NIC, and is held
    under the run's ceiling like any other (a test asking for more is skipped)."""
    plugin = _plugin(request.config)
    made: list[SmolVM] = []

    def make(*, checkpoint: Checkpoint | None = None, **overrides: Any) -> SmolVM:
        if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
            raise ConfigError(f"invalid checkpoint={checkpoint!r} for smolvm_factory() in {request.node.nodeid}: "
                              f"expected what vm.checkpoint() returned")
        origin = smolvm_config if checkpoint is None else checkpoint.config
        base = {f.name: getattr(origin, f.name) for f in dataclasses.fields(VMConfig)}
        cfg = config_from_layers([("smolvm_config" if checkpoint is None else f"checkpoint {checkpoint.name}", base),
                                  (f"smolvm_factory() in {request.node.nodeid}", overrides)])
        reason = plugin.ceiling_violation(cfg)
        if reason:
            pytest.skip(reason)
        vm = plugin.start_vm(request, cfg, checkpoint)
        made.append(vm)
        return vm

    yield make
    for vm in reversed(made):
        plugin.finish_vm(request, vm)


@pytest.fixture(scope="session")
def smolvm_session(request: pytest.FixtureRequest) -> Iterator[SmolVM]:
    """One VM shared by every test of this session (of this xdist worker) that asks for it.

    Built from options, environment and ini only (markers are per test and do not apply).
    Tests share its disk and processes: use ``smolvm`` when isolation matters.
    """
    plugin = _plugin(request.config)
    cfg = apply_configure_hook(request, plugin.session_config())
    vm = plugin.start_vm(request, cfg)
    yield vm
    plugin.finish_vm(request, vm)


@pytest.fixture(scope="session")
def smolvm_prepared(request: pytest.FixtureRequest) -> Callable[..., Checkpoint]:
    """``smolvm_prepared(key, setup=fn, **overrides)`` returns a
    :class:`~pytest_smolvm.checkpoints.Checkpoint` of a VM (the session config plus
    ``overrides``) on which ``setup(vm)`` ran, cached across runs in
    ``<cache>/checkpoints``: ``setup`` runs only when no valid entry for ``key`` and this
    host's VM shape exists, once for all xdist workers and concurrent runs. Start clones with
    ``smolvm_factory(checkpoint=cp)``. Change ``key`` when what ``setup`` does changes (its
    source is not hashed)."""
    plugin = _plugin(request.config)

    def make(key: str, *, setup: Callable[[SmolVM], object], **overrides: Any) -> Checkpoint:
        base = apply_configure_hook(request, plugin.session_config())
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(VMConfig)}
        cfg = config_from_layers([("smolvm session config", fields), (f"smolvm_prepared({key!r})", overrides)])
        reason = plugin.ceiling_violation(cfg) or network_unavailable(cfg.network)
        if reason:
            pytest.skip(reason)
        return prepare(key, setup, cfg, driver=plugin.driver_for(cfg))

    return make
