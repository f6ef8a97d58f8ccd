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
import sys
from pathlib import Path

from .errors import ConfigError

#: Names of run and VM directories (``<runtime>/<run_id>/<vm>/``) as the engine makes them;
#: the reaper touches nothing else.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def cache_dir() -> Path:
    """Images, snapshots, retained disks and probe verdicts: ``$SMOLVM_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/pytest-smolvm`` (``~/.cache/pytest-smolvm``).

    Everything in it is trusted (QEMU opens it before dropping root), so it is held to the
    runtime directory's rules: created 0700, ours, not writable by others, and on a path
    (symlinks resolved) that only we or root can change."""
    env = os.environ.get("SMOLVM_CACHE_DIR")
    if env:
        path, source = Path(env).expanduser(), "SMOLVM_CACHE_DIR"
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        path = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "pytest-smolvm"
        source = "XDG_CACHE_HOME" if xdg else "the default"
    path = _secure_parent(Path(os.path.abspath(path)), "cache directory", source)
    _ensure_private_dir(path, source, "cache directory", "SMOLVM_CACHE_DIR")
    return path


def default_runtime_dir() -> Path:
    """Where :func:`runtime_dir` is when ``SMOLVM_RUNTIME_DIR`` is not set (not created here)."""
    return Path(f"/tmp/smolvm-{os.getuid()}")


def runtime_dir() -> Path:
    """Per-run state (sockets, overlays, console logs): ``$SMOLVM_RUNTIME_DIR``, else
    ``/tmp/smolvm-<uid>`` (short, because of AF_UNIX path limits).

    Created 0700 if missing, and verified every time: raises :class:`ConfigError` (and
    writes nothing) if it is a symlink, not a directory, owned by another user, or
    writable by group or others.
    """
    env = os.environ.get("SMOLVM_RUNTIME_DIR")
    path = Path(env).expanduser().absolute() if env else default_runtime_dir()
    source = "SMOLVM_RUNTIME_DIR" if env else "the default"
    path = _secure_parent(path, "runtime directory", source)
    _ensure_private_dir(path, source, "runtime directory", "SMOLVM_RUNTIME_DIR")
    return path


def sun_path_max() -> int:
    """``sun_path``'s size, the terminating NUL included: 108 bytes on Linux, 104 on macOS and the BSDs."""
    return 108 if sys.platform.startswith("linux") else 104


def check_socket_path(path: Path, what: str) -> Path:
    """``path`` if an AF_UNIX socket can be bound there, else a ConfigError naming it, the
    limit and the fix (a shorter ``SMOLVM_RUNTIME_DIR``, or a shorter VM name)."""
    limit = sun_path_max()
    size = len(os.fsencode(path)) + 1
    if size > limit:
        raise ConfigError(f"the {what} socket path {path} is {size - 1} bytes, over the {limit - 1} an AF_UNIX "
                          f"socket path can have on {sys.platform}; set SMOLVM_RUNTIME_DIR to a shorter directory "
                          f"(the default, /tmp/smolvm-<uid>, is short) or give the VM a shorter name")
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


def _secure_parent(path: Path, what: str, source: str) -> Path:
    """``path`` with its parent's symlinks resolved, after checking that no one but us or
    root can change any directory on the way to it (OpenSSH's safe-path rule): each one is
    owned by us or root, and writable by others only with the sticky bit (like /tmp), where
    the next one must again be ours or root's. Missing parents are created 0700."""
    parent = Path(os.path.realpath(path.parent))
    for part in [*reversed(parent.parents), parent]:
        try:
            st = os.stat(part)
        except FileNotFoundError:
            try:
                os.mkdir(part, 0o700)
            except OSError as exc:
                raise ConfigError(f"cannot create {part} for the {what} {path} (from {source}): {exc}") from exc
            continue
        _check_component(part, st, what, path, source)
    return parent / path.name


def _check_component(part: Path, st: os.stat_result, what: str, path: Path, source: str) -> None:
    """The safe-path rule for one directory on the way to ``path`` (see :func:`_secure_parent`)."""
    if st.st_uid not in (0, os.getuid()):
        raise ConfigError(f"{what} {path} (from {source}) is below {part}, which belongs to uid "
                          f"{st.st_uid}: that user could swap what is in it; use a path that only "
                          f"you or root own")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise ConfigError(f"{what} {path} (from {source}) is below {part}, which others can write "
                          f"without the sticky bit (mode {stat.S_IMODE(st.st_mode):o}), so they could "
                          f"replace what is in it; use a directory below a private or sticky parent "
                          f"(like /tmp)")


def check_safe_path(path: Path, what: str, source: str) -> Path:
    """``path`` (an existing directory read but never written, e.g. a shared image cache),
    resolved, after checking it and every directory above it with the safe-path rule: no
    one but us or root can swap what it holds. Raises :class:`ConfigError` naming the culprit."""
    real = Path(os.path.realpath(path))
    for part in [*reversed(real.parents), real]:
        try:
            st = os.stat(part)
        except OSError as exc:
            raise ConfigError(f"{what} {path} (from {source}) cannot be used: {exc}") from None
        _check_component(part, st, what, path, source)
    return real


def _ensure_private_dir(path: Path, source: str, what: str, env: str) -> None:
    fix = f"remove it (rm -rf {path}) or set {env} to a directory only you can write"
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot create the {what} {path} (from {source}): {exc}") from exc
    try:  # O_NOFOLLOW: a symlink fails here, whatever it points to
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        kind = "a symlink" if path.is_symlink() else "not a directory" if path.exists() else str(exc)
        raise ConfigError(f"{what} {path} (from {source}) is {kind}: another user may have "
                          f"planted it; {fix}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid():
            raise ConfigError(f"{what} {path} (from {source}) is owned by uid {st.st_uid}, not "
                              f"by you (uid {os.getuid()}): another user may have planted it; {fix}")
        if st.st_mode & 0o022:
            raise ConfigError(f"{what} {path} (from {source}) is writable by group or others "
                              f"(mode {stat.S_IMODE(st.st_mode):o}): they could plant files in it; {fix}")
        if st.st_mode & 0o077:  # ours, merely readable: older versions made it 0755
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
