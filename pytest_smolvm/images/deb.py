"""Read a Debian package (``.deb``) in Python: no ``dpkg``, no ``apt``, so a Mac can take the
guest kernel, its modules and busybox from Debian's packages.

A ``.deb`` is an ``ar`` archive (``!<arch>\\n``, then 60-byte member headers) holding
``debian-binary``, ``control.tar.*`` and ``data.tar.*``; the tarballs are xz, gzip, bzip2 or
uncompressed (``tarfile`` reads them all; zstd, which Debian does not use for these packages,
is refused by name). Only regular files are extracted, inside the target; a member that
would land outside it is an error.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from ..errors import ImageError

AR_MAGIC = b"!<arch>\n"
AR_HEADER = 60
#: The most a control file may hold (they are a few KiB).
MAX_CONTROL = 1 << 20


def members(deb: Path) -> dict[str, tuple[int, int]]:
    """``ar`` member name -> (offset, size) of ``deb``; ImageError naming the file if it is not one."""
    out: dict[str, tuple[int, int]] = {}
    try:
        size = deb.stat().st_size
        with open(deb, "rb") as f:
            if f.read(len(AR_MAGIC)) != AR_MAGIC:
                raise ImageError(f"{deb} is not a Debian package (no ar archive magic)")
            pos = len(AR_MAGIC)
            while pos + AR_HEADER <= size:
                f.seek(pos)
                head = f.read(AR_HEADER)
                if head[58:60] != b"`\n":
                    raise ImageError(f"{deb}: corrupt ar member header at offset {pos}")
                name = head[:16].decode("ascii", "replace").strip().rstrip("/")
                length = int(head[48:58].decode("ascii").strip() or "0")
                if pos + AR_HEADER + length > size:
                    raise ImageError(f"{deb}: ar member {name!r} runs past the end of the file")
                out[name] = (pos + AR_HEADER, length)
                pos += AR_HEADER + length + (length & 1)
    except OSError as exc:
        raise ImageError(f"cannot read the Debian package {deb}: {exc}") from exc
    except ValueError as exc:
        raise ImageError(f"{deb}: corrupt ar member header: {exc}") from exc
    return out


class _Slice:
    """A read-only window onto part of a file, for tarfile's stream mode."""

    def __init__(self, f: BinaryIO, offset: int, size: int) -> None:
        self.f, self.left = f, size
        f.seek(offset)

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        return data


def _tarball(deb: Path, prefix: str) -> tuple[str, int, int]:
    found = [(name, *where) for name, where in members(deb).items() if name.startswith(prefix)]
    if not found:
        raise ImageError(f"{deb} has no {prefix}* member: is it a Debian package?")
    name = found[0][0]
    if name.endswith(".zst"):
        raise ImageError(f"{deb}: {name} is zstd-compressed, which this reader does not support; "
                         f"extract it with dpkg-deb instead")
    return found[0]


def _open(deb: Path, f: BinaryIO, prefix: str) -> tarfile.TarFile:
    name, offset, size = _tarball(deb, prefix)
    mode = {".xz": "r|xz", ".gz": "r|gz", ".bz2": "r|bz2"}.get(PurePosixPath(name).suffix, "r|")
    try:
        return tarfile.open(fileobj=_Slice(f, offset, size), mode=mode)  # type: ignore[call-overload,no-any-return]
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ImageError(f"{deb}: cannot read {name}: {exc}") from exc


def control(deb: Path) -> dict[str, str]:
    """The package's control fields (``Package``, ``Version``, ``Architecture``...)."""
    with open(deb, "rb") as f, _open(deb, f, "control.tar") as tar:
        for member in tar:
            if member.isfile() and PurePosixPath(member.name).name == "control" and member.size <= MAX_CONTROL:
                text = (tar.extractfile(member) or _empty()).read().decode("utf-8", "replace")
                return dict(re.findall(r"^([A-Za-z0-9-]+):[ \t]*(.*)$", text, re.M))
    raise ImageError(f"{deb} has no control file")


def _empty() -> BinaryIO:
    import io

    return io.BytesIO()


def _inside(dest: Path, name: str, deb: Path) -> Path:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise ImageError(f"{deb}: member {name!r} would land outside the target")
    return dest.joinpath(*rel.parts)


def extract(deb: Path, dest: Path, want: Callable[[str], bool] = lambda _p: True) -> list[Path]:
    """Extract the regular files of ``deb``'s data whose path (``boot/vmlinuz-...``, no
    leading ``./``) ``want`` accepts into ``dest``, with their directories (links and devices
    are never written). Returns the files written."""
    written: list[Path] = []
    try:
        with open(deb, "rb") as f, _open(deb, f, "data.tar") as tar:
            for member in tar:
                path = member.name[2:] if member.name.startswith("./") else member.name
                if not path or not member.isfile() or not want(path):
                    continue
                target = _inside(dest, path, deb)
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                assert src is not None
                with open(target, "wb") as out:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
                os.chmod(target, member.mode & 0o755)
                written.append(target)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ImageError(f"cannot extract {deb}: {exc}") from exc
    return written
