"""Where pytest-smolvm keeps things on the host."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Images and probe verdicts: ``$SMOLVM_CACHE_DIR``, else ``$XDG_CACHE_HOME/pytest-smolvm``."""
    env = os.environ.get("SMOLVM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "pytest-smolvm"


def runtime_dir() -> Path:
    """Per-run state (sockets, overlays, console logs): short, because of AF_UNIX path limits."""
    env = os.environ.get("SMOLVM_RUNTIME_DIR")
    return Path(env) if env else Path(f"/tmp/smolvm-{os.getuid()}")
