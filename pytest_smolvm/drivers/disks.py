"""Root disks every driver shares: the size check and the one writable ``shared`` disk."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from filelock import FileLock

from ..config import VMConfig
from ..errors import ConfigError
from ..images import Image
from ..paths import cache_dir


def checked_disk_size(config: VMConfig, image: Image) -> int | None:
    """``config.disk_size_mib``, refused (ConfigError) when smaller than the image."""
    size = config.disk_size_mib
    if size is not None and size < image.rootfs_mib:
        raise ConfigError(f"invalid disk_size_mib={size}: smaller than image {image.name!r} "
                          f"({image.rootfs_mib} MiB); use at least {image.rootfs_mib}")
    return size


def shared_disk(image: Image, size_mib: int | None) -> Path:
    """The one writable disk ``disk_mode='shared'`` VMs of ``image`` use (a copy, never the cache)."""
    d = cache_dir() / "shared"
    d.mkdir(parents=True, exist_ok=True)
    target = d / f"{image.name}-{image.digest}.ext4"
    with FileLock(str(target) + ".lock", timeout=300):
        if not target.exists():
            tmp = target.with_suffix(".tmp")
            subprocess.run(["cp", "--sparse=always", str(image.rootfs), str(tmp)], check=True)
            os.replace(tmp, target)
        if size_mib is not None and target.stat().st_size < size_mib << 20:
            os.truncate(target, size_mib << 20)
    return target
