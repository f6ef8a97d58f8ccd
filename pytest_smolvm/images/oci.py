"""Read container images in skopeo's transport syntax: ``oci:DIR[:TAG]`` (an OCI image layout)
and ``docker-archive:FILE[:REF]`` (what ``docker save`` writes).

Everything read here is untrusted: JSON documents are size-bounded, blob digests must be
``sha256:<64 hex>`` (they become file names), every OCI blob is checked against its digest,
and each layer's uncompressed stream against the config's ``diff_id`` as it is applied.
Registries are reached by skopeo, not by us: ``skopeo copy docker://debian:12 oci:DIR:12``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import ImageError
from . import tarstream as ts

MAX_JSON = 4 << 20
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
INDEX_TYPES = ("application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json")
REF_NAME = "org.opencontainers.image.ref.name"
TRANSPORTS = ("oci", "docker-archive")


@dataclass(frozen=True)
class Source:
    """A parsed source string: transport, path (absolute) and optional tag or reference."""

    transport: str
    path: Path
    ref: str | None
    text: str


def parse_source(text: str, base: Path | None = None) -> Source:
    """``oci:DIR[:TAG]`` or ``docker-archive:FILE[:REF]``; relative paths are taken from
    ``base`` (default: the current directory)."""
    transport, sep, rest = text.partition(":")
    if not sep or transport not in TRANSPORTS or not rest:
        raise ImageError(f"invalid image source {text!r}: expected oci:DIR[:TAG] or docker-archive:FILE[:REF]")
    root = base or Path.cwd()
    if (root / rest).exists():  # a path that itself holds a ':', and no tag
        return Source(transport, (root / rest).absolute(), None, text)
    # The path ends at the first ':' after which what came before exists (a docker
    # reference such as repo:tag holds a ':' of its own).
    for at in (i for i, ch in enumerate(rest) if ch == ":"):
        if at and (root / rest[:at]).exists():
            return Source(transport, (root / rest[:at]).absolute(), rest[at + 1:] or None, text)
    raise ImageError(f"image source {text!r}: {root / rest.split(':', 1)[0]} does not exist")


@dataclass
class Layers:
    """What an image is made of: its config and how to open each layer blob, in order."""

    config: dict[str, Any]
    config_digest: str
    openers: list[tuple[str, Callable[[], BinaryIO]]] = field(default_factory=list)

    @property
    def diff_ids(self) -> list[str]:
        ids = (self.config.get("rootfs") or {}).get("diff_ids")
        if not isinstance(ids, list) or len(ids) != len(self.openers) or not all(
                isinstance(d, str) and DIGEST_RE.fullmatch(d) for d in ids):
            raise ImageError(f"image config {self.config_digest}: rootfs.diff_ids does not list one sha256 "
                             f"per layer ({len(self.openers)} layers)")
        return ids


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ImageError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ImageError(f"{what} is not a JSON object")
    return doc


def _digest(value: object, what: str) -> str:
    if not isinstance(value, str) or not DIGEST_RE.fullmatch(value):
        raise ImageError(f"{what} has digest {str(value)[:100]!r}; only sha256:<64 hex> is supported")
    return value


def read_layers(src: Source, arch: str = "amd64") -> Layers:
    """The config and layers of the ``linux/<arch>`` image ``src`` names (Debian's and OCI's
    architecture names agree for amd64 and arm64)."""
    layers = _oci(src, arch) if src.transport == "oci" else _docker_archive(src)
    found = layers.config.get("architecture")
    if isinstance(found, str) and found != arch:
        raise ImageError(f"image source {src.text!r} is a linux/{found} image, not linux/{arch}; "
                         f"import it with --arch {found}, or pick the {arch} image")
    return layers


# ---------------------------------------------------------------------- OCI layout

def _blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":", 1)[1]


def _verified_blob(layout: Path, digest: str, what: str) -> Path:
    path = _blob_path(layout, digest)
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    except OSError as exc:
        raise ImageError(f"{what}: cannot read blob {path}: {exc.strerror}") from None
    if "sha256:" + h.hexdigest() != digest:
        raise ImageError(f"{what}: blob {path} does not match its digest {digest} (corrupt or tampered)")
    return path


def _small_blob(layout: Path, digest: str, what: str) -> dict[str, Any]:
    path = _verified_blob(layout, digest, what)
    if path.stat().st_size > MAX_JSON:
        raise ImageError(f"{what}: {path} is over {MAX_JSON >> 20} MiB")
    return _json(path.read_bytes(), f"{what} ({path})")


def _pick(manifests: list[Any], ref: str | None, where: str) -> dict[str, Any]:
    if not manifests or not all(isinstance(m, dict) for m in manifests):
        raise ImageError(f"{where} lists no manifests")
    if ref is not None:
        hits = [m for m in manifests if (m.get("annotations") or {}).get(REF_NAME) == ref]
        if not hits:
            names = sorted(str((m.get("annotations") or {}).get(REF_NAME)) for m in manifests)
            raise ImageError(f"{where} has no image tagged {ref!r} (tags: {', '.join(names)})")
        return dict(hits[0])
    if len(manifests) > 1:
        names = sorted(str((m.get("annotations") or {}).get(REF_NAME)) for m in manifests)
        raise ImageError(f"{where} holds {len(manifests)} images; name one with :TAG (tags: {', '.join(names)})")
    return dict(manifests[0])


def _platform(manifests: list[Any], where: str, arch: str = "amd64") -> dict[str, Any]:
    for m in manifests:
        p = m.get("platform") or {} if isinstance(m, dict) else {}
        if p.get("os") == "linux" and p.get("architecture") == arch:
            return dict(m)
    raise ImageError(f"{where} has no linux/{arch} image")


def _oci(src: Source, arch: str = "amd64") -> Layers:
    layout = src.path
    if not (layout / "oci-layout").is_file() or not (layout / "index.json").is_file():
        raise ImageError(f"image source {src.text!r}: {layout} is not an OCI image layout "
                         f"(no oci-layout and index.json); make one with: skopeo copy docker://IMAGE oci:{layout}:TAG")
    index_path = layout / "index.json"
    if index_path.stat().st_size > MAX_JSON:
        raise ImageError(f"{index_path} is over {MAX_JSON >> 20} MiB")
    index = _json(index_path.read_bytes(), str(index_path))
    desc = _pick(list(index.get("manifests") or []), src.ref, str(index_path))
    for _ in range(4):  # an index may point at a per-platform index
        digest = _digest(desc.get("digest"), "a manifest")
        if desc.get("mediaType") not in INDEX_TYPES:
            break
        nested = _small_blob(layout, digest, "image index")
        desc = _platform(list(nested.get("manifests") or []), f"image index {digest}", arch)
    manifest = _small_blob(layout, digest, "image manifest")
    config_digest = _digest((manifest.get("config") or {}).get("digest"), "the image config")
    config = _small_blob(layout, config_digest, "image config")
    layers = Layers(config, config_digest)
    for i, layer in enumerate(manifest.get("layers") or []):
        d = _digest(layer.get("digest") if isinstance(layer, dict) else None, f"layer {i + 1}")
        layers.openers.append((d, _oci_opener(layout, d, f"layer {i + 1}")))
    return layers


def _oci_opener(layout: Path, digest: str, what: str) -> Callable[[], BinaryIO]:
    def open_() -> BinaryIO:
        return open(_verified_blob(layout, digest, what), "rb")
    return open_


# ---------------------------------------------------------------------- docker save

class _Slice:
    """``size`` bytes of ``f`` from ``offset``, as a read-only stream."""

    def __init__(self, path: Path, offset: int, size: int) -> None:
        self.f = open(path, "rb")  # noqa: SIM115 (closed by close())
        self.f.seek(offset)
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> _Slice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _archive_index(path: Path) -> dict[str, tuple[int, int]]:
    """Regular members of a docker-save tarball: name -> (data offset, size)."""
    budget = ts.Budget(path.stat().st_size + (1 << 20), 100_000)
    found: dict[str, tuple[int, int]] = {}
    with open(path, "rb") as f:
        stream = ts.Counted(f, budget, str(path))
        for m, _ in ts.members(stream, str(path)):
            if m.type == ts.REGULAR:
                found[m.name.removeprefix("./")] = (budget.bytes, m.size)
    return found


def _docker_archive(src: Source) -> Layers:
    members = _archive_index(src.path)
    def member_json(name: str, what: str) -> dict[str, Any] | list[Any]:
        if name not in members:
            raise ImageError(f"{src.path} has no {name} ({what}); is it a 'docker save' archive?")
        offset, size = members[name]
        if size > MAX_JSON:
            raise ImageError(f"{src.path}: {name} is over {MAX_JSON >> 20} MiB")
        with _Slice(src.path, offset, size) as s:
            try:
                return json.loads(s.read())  # type: ignore[no-any-return]
            except ValueError as exc:
                raise ImageError(f"{src.path}: {name} is not valid JSON: {exc}") from None
    manifest = member_json("manifest.json", "the image list")
    entries = [m for m in manifest if isinstance(m, dict)] if isinstance(manifest, list) else []
    if src.ref is not None:
        entries = [m for m in entries if src.ref in (m.get("RepoTags") or [])]
    if len(entries) != 1:
        tags = [t for m in (manifest if isinstance(manifest, list) else []) for t in (m.get("RepoTags") or [])]
        raise ImageError(f"{src.text!r}: {'no image matches' if src.ref else 'name one image with :REF; found'} "
                         f"{len(entries)} (tags: {', '.join(map(str, tags)) or 'none'})")
    entry = entries[0]
    config_name = str(entry.get("Config", ""))
    config = member_json(config_name, "the image config")
    if not isinstance(config, dict):
        raise ImageError(f"{src.path}: {config_name} is not a JSON object")
    layers = Layers(config, config_name)
    for i, name in enumerate(entry.get("Layers") or []):
        if str(name) not in members:
            raise ImageError(f"{src.path}: layer {i + 1} {str(name)[:200]!r} is not in the archive")
        offset, size = members[str(name)]
        layers.openers.append((str(name), _slice_opener(src.path, offset, size)))
    return layers


def _slice_opener(path: Path, offset: int, size: int) -> Callable[[], BinaryIO]:
    return lambda: _Slice(path, offset, size)  # type: ignore[return-value]


@contextmanager
def opened(opener: Callable[[], BinaryIO]) -> Iterator[BinaryIO]:
    f = opener()
    try:
        yield f
    finally:
        f.close()


def image_env(config: dict[str, Any]) -> dict[str, object]:
    """The parts of an image config worth keeping in our manifest (informational)."""
    inner = config.get("config") or {}
    keep = {k: inner.get(k) for k in ("Env", "Entrypoint", "Cmd", "WorkingDir", "User") if inner.get(k)}
    return {k: v for k, v in keep.items() if isinstance(v, (str, list))}


def layer_count_ok(n: int) -> None:
    if n == 0:
        raise ImageError("the image has no layers")
    if n > 256:
        raise ImageError(f"the image has {n} layers (at most 256)")
