"""VMM drivers behind one Protocol (:mod:`.base`)."""

from __future__ import annotations

from ..config import VMConfig
from ..errors import ConfigError
from .base import Accel, Driver, Machine


def default_driver(config: VMConfig) -> Driver:
    """The built-in driver for ``config.backend`` (``auto`` means QEMU today)."""
    if config.backend in ("auto", "qemu"):
        from .qemu import QemuDriver

        return QemuDriver()
    raise ConfigError(f"invalid backend={config.backend!r}: the Firecracker driver is not available "
                      f"in this version; use backend='qemu'")


__all__ = ["Accel", "Driver", "Machine", "default_driver"]
