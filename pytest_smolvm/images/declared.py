"""Images declared in ``pyproject.toml`` (``[tool.smolvm.images.NAME]``): parsing and the key.

```toml
[tool.smolvm.images.ds]
from = "default"            # or "oci:DIR[:TAG]" / "docker-archive:FILE[:REF]"
apt = ["jq"]                # Debian packages (a Debian base: "default")
pip = ["numpy==2.1.3"]      # for the guest's Python
files = { "/opt/data" = "tests/data" }   # guest path = host path (relative to pyproject.toml)
run = ["useradd -m app"]    # commands run in the image at build time
size_mib = 2048             # rootfs size (optional; the base's by default)
```

Everything here is pure: a bad value is a :class:`ConfigError` naming the key and the
``pyproject.toml`` it came from. The key of a declaration is its content (the lists, the
base's identity, the digest of every ``files`` tree), so a changed list rebuilds the image and
an unchanged one never does. Building is :mod:`.provision`.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ..errors import ConfigError
from ..paths import check_name
from .recipe import BUILDER_VERSION, DEFAULT_PACKAGES, Recipe

KEYS: Final = ("from", "apt", "pip", "files", "run", "size_mib")
#: Debian package names (policy 5.6.1), optionally with an architecture or version.
APT_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?(=[A-Za-z0-9.+~:-]+)?")
MAX_ITEMS = 256
#: Bumped when what a declaration builds changes meaning (the key then changes).
DECLARED_VERSION: Final = 1


@dataclass(frozen=True)
class Declared:
    """One ``[tool.smolvm.images.NAME]`` table, validated; host paths are absolute."""

    name: str
    base: str
    apt: tuple[str, ...] = ()
    pip: tuple[str, ...] = ()
    files: tuple[tuple[str, str], ...] = ()  # (guest path, host path)
    run: tuple[str, ...] = ()
    size_mib: int | None = None
    pyproject: Path = Path("pyproject.toml")

    @property
    def has_steps(self) -> bool:
        return bool(self.pip or self.files or self.run or self.size_mib)

    def base_recipe(self) -> Recipe | None:
        """The Debian recipe of the base when it is ``default`` (with ``apt`` added)."""
        if self.base != "default":
            return None
        if not self.apt:
            return Recipe()
        return Recipe(name=f"{self.name}.base", packages=DEFAULT_PACKAGES + self.apt)


def find_pyproject(start: Path) -> Path | None:
    """The nearest ``pyproject.toml`` at or above ``start``."""
    for d in [start, *start.parents]:
        if (d / "pyproject.toml").is_file():
            return d / "pyproject.toml"
    return None


def load(pyproject: Path) -> dict[str, Declared]:
    """Every image declared in ``pyproject`` (none if it declares none)."""
    try:
        with open(pyproject, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {pyproject}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{pyproject} is not valid TOML: {exc}") from None
    tables = doc.get("tool", {}).get("smolvm", {}).get("images", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"invalid [tool.smolvm.images] in {pyproject}: expected a table of image tables")
    return {name: parse(name, table, pyproject) for name, table in tables.items()}


def _bad(name: str, key: str, pyproject: Path, why: str) -> ConfigError:
    where = f"[tool.smolvm.images.{name}]" + (f" {key}" if key else "")
    return ConfigError(f"invalid {where} in {pyproject}: {why}")


def _strings(name: str, key: str, value: object, pyproject: Path) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _bad(name, key, pyproject, f"expected a list of non-empty strings, got {value!r}"[:300])
    if len(value) > MAX_ITEMS:
        raise _bad(name, key, pyproject, f"at most {MAX_ITEMS} entries")
    return tuple(v.strip() for v in value)


def parse(name: str, table: object, pyproject: Path) -> Declared:
    """One declaration, validated (pure but for checking that ``files`` sources exist)."""
    try:
        check_name(name, "image name")
    except ConfigError as exc:
        raise _bad(name, "", pyproject, str(exc)) from None
    if name in ("default", "default-arm64"):
        raise _bad(name, "", pyproject, "the name is the built-in image's; choose another")
    if not isinstance(table, dict):
        raise _bad(name, "", pyproject, "expected a table")
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise _bad(name, unknown[0], pyproject, f"unknown key; expected {', '.join(KEYS)}")
    base = _base(name, table.get("from", "default"), pyproject)
    apt = _strings(name, "apt", table.get("apt", []), pyproject)
    for pkg in apt:
        if not APT_RE.fullmatch(pkg):
            raise _bad(name, "apt", pyproject, f"{pkg!r} is not a Debian package name")
    if apt and base != "default":
        raise _bad(name, "apt", pyproject, "apt packages go on a Debian base built here (from = \"default\"); "
                   "for an OCI base install them in the image itself (a Dockerfile RUN apt-get install)")
    pip = _strings(name, "pip", table.get("pip", []), pyproject)
    for req in pip:
        if req.startswith("-"):
            raise _bad(name, "pip", pyproject, f"{req!r}: options are not accepted, only requirements")
    return Declared(name, base, apt, pip, _files(name, table.get("files", {}), pyproject),
                    _strings(name, "run", table.get("run", []), pyproject),
                    _size(name, table.get("size_mib"), pyproject), pyproject)


def _base(name: str, value: object, pyproject: Path) -> str:
    if value == "default":
        return "default"
    if not isinstance(value, str) or not value.startswith(("oci:", "docker-archive:")):
        raise _bad(name, "from", pyproject, f"expected \"default\", \"oci:DIR[:TAG]\" or "
                   f"\"docker-archive:FILE[:REF]\", got {value!r}")
    from .oci import parse_source

    try:
        src = parse_source(value, pyproject.parent)
    except Exception as exc:  # ImageError: the source path does not exist
        raise _bad(name, "from", pyproject, str(exc)) from None
    return f"{src.transport}:{src.path}" + (f":{src.ref}" if src.ref else "")


def _files(name: str, value: object, pyproject: Path) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise _bad(name, "files", pyproject, "expected a table of guest path = host path")
    out = []
    for guest, host in sorted(value.items()):
        norm = posixpath.normpath(guest) if isinstance(guest, str) else ""
        if not guest.startswith("/") or norm != guest.rstrip("/") or norm == "/" or "\0" in guest:
            raise _bad(name, "files", pyproject, f"guest path {guest!r} must be absolute, normalised and not /")
        if not isinstance(host, str) or not host:
            raise _bad(name, "files", pyproject, f"{guest!r}: expected a host path, got {host!r}")
        path = (pyproject.parent / host).resolve()
        if not (path.is_dir() or path.is_file()):
            raise _bad(name, "files", pyproject, f"{guest!r}: host path {path} is not a file or directory")
        out.append((norm, str(path)))
    return tuple(out)


def _size(name: str, value: object, pyproject: Path) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 256 <= value <= 1 << 20:
        raise _bad(name, "size_mib", pyproject, f"expected MiB from 256, got {value!r}")
    return value


def file_digest(path: str) -> str:
    """A files source's content: a directory's tree digest, or a file's bytes and mode."""
    if os.path.isdir(path):
        from ..volumes import tree_digest

        return tree_digest(path)
    h = hashlib.sha256(f"{os.stat(path).st_mode & 0o7777}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:32]


def key(decl: Declared, base_id: str) -> str:
    """The declaration's content key, given its base image's identity."""
    blob = {"builder": BUILDER_VERSION, "declared": DECLARED_VERSION, "base": base_id, "pip": decl.pip,
            "files": [(g, file_digest(h)) for g, h in decl.files], "run": decl.run, "size_mib": decl.size_mib}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def describe(decl: Declared) -> dict[str, Any]:
    """The declaration as the manifest records it."""
    return {"from": decl.base, "apt": list(decl.apt), "pip": list(decl.pip),
            "files": {g: h for g, h in decl.files}, "run": list(decl.run), "size_mib": decl.size_mib,
            "pyproject": str(decl.pyproject)}
