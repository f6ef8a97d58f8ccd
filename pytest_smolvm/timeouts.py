"""One setting for slow hosts: ``SMOLVM_TIMEOUT_SCALE`` multiplies the engine's own waits.

Scaled: the defaults of ``VMConfig.timeout`` and ``boot_timeout``, the KVM canary, a clone's
restore, guest setup and the grace the host gives a killed command's reply. Never scaled: a
timeout a caller passes explicitly (``run(..., timeout=1.5)`` means 1.5 s everywhere).
Nested virtualisation (KVM inside a TCG guest, ``scripts/run-kvm-nested``) is what it is for.
"""

from __future__ import annotations

import math
import os
from typing import Final

from .errors import ConfigError

TIMEOUT_SCALE_ENV: Final = "SMOLVM_TIMEOUT_SCALE"
MAX_SCALE: Final = 100.0


def timeout_scale() -> float:
    """The factor from ``SMOLVM_TIMEOUT_SCALE`` (1 when unset); ConfigError naming a bad one."""
    raw = os.environ.get(TIMEOUT_SCALE_ENV, "").strip()
    if not raw:
        return 1.0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 1.0 <= value <= MAX_SCALE):
        raise ConfigError(f"invalid {TIMEOUT_SCALE_ENV}={raw!r} (from the environment): expected a number "
                          f"from 1 to {MAX_SCALE:g}, the factor the engine's own timeouts are multiplied by")
    return value


def scaled(seconds: float) -> float:
    """``seconds`` times :func:`timeout_scale`."""
    return seconds * timeout_scale()
