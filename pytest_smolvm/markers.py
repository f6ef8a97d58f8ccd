"""The ``smolvm(...)`` marker: its signature and its parsing into config layers."""

from __future__ import annotations

from typing import Any

import pytest

from .config import FIELD_NAMES, check_field
from .errors import ConfigError

MARKER_DOC = (
    "smolvm(vcpus=1, memory_mib=256, disk_mode='isolated', disk_size_mib=None, network='none', "
    "allow=[], image='default', timeout=30.0, env={}, ...): VM settings for the smolvm / "
    "smolvm_factory fixtures of this test; module and class marks apply too, the closest wins"
)


def marker_layers(item: pytest.Item) -> list[tuple[str, dict[str, Any]]]:
    """Config layers from every ``smolvm`` mark on ``item``, farthest (module) first.

    Raises :class:`ConfigError` naming the test and the bad value.
    """
    marks = list(item.iter_markers("smolvm"))  # closest first
    layers = []
    for mark in reversed(marks):
        where = f"marker on {item.nodeid}"
        if mark.args:
            raise ConfigError(f"{where}: smolvm() takes keyword arguments only, got positional {mark.args!r}")
        unknown = sorted(set(mark.kwargs) - FIELD_NAMES)
        if unknown:
            raise ConfigError(f"{where}: unknown smolvm() keyword(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(FIELD_NAMES))}")
        values = {}
        for key, value in mark.kwargs.items():
            try:
                values[key] = check_field(key, value)
            except ConfigError as exc:
                raise ConfigError(f"{exc} (from {where})") from None
        layers.append((where, values))
    return layers
