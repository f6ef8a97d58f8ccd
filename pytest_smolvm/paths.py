"""Where pytest-smolvm keeps things on the host.

The runtime directory lives in a shared, world-writable place (``/tmp``) under a
predictable name, so another local user can create it first or plant symlinks in it. It
is therefore never trusted: :func:`runtime_dir` hands out only a directory that is really a
directory (not a symlink), owned by this user and closed to everyone else.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from .errors import ConfigError

#: Names of run and VM directories (``<runtime>/<run_id>/<vm>/``) as the engine makes them;
#: the reaper touches nothing else.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def cache_dir() -> Path:
    """Images and probe verdicts: ``$SMOLVM_CACHE_DIR``, else ``$XDG_CACHE_HOME/pytest-smolvm``."""
    env = os.environ.get("SMOLVM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "pytest-smolvm"


def runtime_dir() -> Path:
    """Per-run state (sockets, overlays, console logs): ``$SMOLVM_RUNTIME_DIR``, else
    ``/tmp/smolvm-<uid>`` (short, because of AF_UNIX path limits).

    Created 0700 if missing, and verified every time: raises :class:`ConfigError` (and
    writes nothing) if it is a symlink, not a directory, owned by another user, or
    writable by group or others.
    """
    env = os.environ.get("SMOLVM_RUNTIME_DIR")
    path = Path(env).expanduser().absolute() if env else Path(f"/tmp/smolvm-{os.getuid()}")
    _ensure_private_dir(path, "SMOLVM_RUNTIME_DIR" if env else "the default")
    return path


def check_name(value: str, what: str) -> str:
    """``value`` if it can name a run or VM directory, else a ConfigError naming it."""
    if not NAME_RE.fullmatch(value):
        raise ConfigError(f"invalid {what} {value!r}: it names a directory, so use 1-64 letters, digits, "
                          f"'.', '_' or '-', starting with a letter or digit")
    return value


def make_private_dirs(path: Path, base: Path) -> None:
    """Create ``path`` and its parents below ``base`` with mode 0700 (a run's and a VM's
    directory stay closed even if someone loosens ``base``). ``path`` must be new."""
    for parent in reversed(path.relative_to(base).parents[:-1]):
        try:
            os.mkdir(base / parent, 0o700)
        except FileExistsError:
            pass
    os.mkdir(path, 0o700)


def _ensure_private_dir(path: Path, source: str) -> None:
    fix = f"remove it (rm -rf {path}) or set SMOLVM_RUNTIME_DIR to a directory only you can write"
    _check_parent(path.parent, path, source)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot create the runtime directory {path} (from {source}): {exc}") from exc
    try:  # O_NOFOLLOW: a symlink fails here, whatever it points to
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        what = "a symlink" if path.is_symlink() else "not a directory" if path.exists() else str(exc)
        raise ConfigError(f"runtime directory {path} (from {source}) is {what}: another user may have "
                          f"planted it; {fix}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid():
            raise ConfigError(f"runtime directory {path} (from {source}) is owned by uid {st.st_uid}, not "
                              f"by you (uid {os.getuid()}): another user may have planted it; {fix}")
        if st.st_mode & 0o022:
            raise ConfigError(f"runtime directory {path} (from {source}) is writable by group or others "
                              f"(mode {stat.S_IMODE(st.st_mode):o}): they could plant files in it; {fix}")
        if st.st_mode & 0o077:  # ours, merely readable: older versions made it 0755
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def _check_parent(parent: Path, path: Path, source: str) -> None:
    """Refuse a parent where others could rename our directory away and put theirs in its
    place (writable by them, no sticky bit)."""
    try:
        st = os.stat(parent)
    except FileNotFoundError:
        parent.mkdir(parents=True, exist_ok=True)
        return
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise ConfigError(f"runtime directory {path} (from {source}) is in {parent}, which others can write "
                          f"without the sticky bit (mode {stat.S_IMODE(st.st_mode):o}), so they could "
                          f"replace it; use a directory below a private or sticky parent (like /tmp)")
