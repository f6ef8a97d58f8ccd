"""Moving prepared state between machines: ``checkpoint export KEY FILE`` / ``import FILE``.

An export is one gzip-compressed tar: ``manifest.json`` first, then ``state``,
``disk.qcow2`` and ``mem`` (the RAM file is sparse; its holes compress to almost nothing,
and import writes them back as holes). An import is treated as hostile until proven
otherwise, because QEMU's migration parser is attack surface: only those four regular
members are accepted, each no larger than its manifest says, and each file's size and
sha256 must match the manifest before it is published; the manifest's key must match this
host (QEMU version, accelerator, host CPU under KVM/HVF, image, VM shape), else the error
names the field. The sha256s catch corruption (a flipped byte), not a forger who rewrites
the manifest too: import only files your own CI wrote (a CI cache is as trusted as the
code it caches).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from filelock import FileLock, Timeout

from . import images
from .checkpoints import FILES, SHAPE_FIELDS, CheckpointError, shape_mismatch
from .drivers import default_driver
from .errors import ConfigError, ImageError
from .prepared import (
    BUILD_TIMEOUT,
    FORMAT,
    PreparedStore,
    cache_key,
    check_key,
    config_from_record,
    local_shape,
    write_sparse,
)

#: The most a manifest or a device-state file may be (bytes).
MANIFEST_MAX = 1 << 20
STATE_MAX = 64 << 20
_CHUNK = 1 << 20


def export(store: PreparedStore, digest: str, target: Path, *, level: int = 6) -> int:
    """Write entry ``digest`` (verified first) to ``target`` (tar.gz); returns its size."""
    meta = store.manifest(digest)
    if meta is None:
        raise CheckpointError(f"no cached checkpoint {digest} in {store.root}")
    cp = store.lookup(digest)
    assert cp is not None
    try:
        tmp = target.with_name(f".{target.name}.part-{os.getpid()}")
        with tarfile.open(tmp, "w:gz", compresslevel=level, format=tarfile.PAX_FORMAT) as tar:
            tar.add(cp.path / "manifest.json", arcname="manifest.json")
            for name in ("state", "disk.qcow2", "mem"):
                tar.add(cp.path / name, arcname=name)
        os.replace(tmp, target)
    finally:
        store.release(digest)
    return target.stat().st_size


def _member_file(tar: tarfile.TarFile, member: tarfile.TarInfo, expected: str) -> IO[bytes]:
    if member.name != expected or not member.isreg():
        raise CheckpointError(f"checkpoint archive: expected the regular file {expected!r}, found {member.name!r}")
    f = tar.extractfile(member)
    assert f is not None
    return f


def _read_manifest(tar: tarfile.TarFile) -> dict[str, Any]:
    member = tar.next()
    if member is None:
        raise CheckpointError("checkpoint archive is empty")
    if member.size > MANIFEST_MAX:
        raise CheckpointError(f"checkpoint archive: manifest.json is {member.size} bytes (over {MANIFEST_MAX})")
    try:
        meta = json.loads(_member_file(tar, member, "manifest.json").read())
    except ValueError as exc:
        raise CheckpointError(f"checkpoint archive: manifest.json is not JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint archive: format {meta.get('format') if isinstance(meta, dict) else '?'!r}"
                              f" is not this version's ({FORMAT}); build the prepared state again")
    return meta


def check_host(meta: Mapping[str, Any]) -> tuple[str, images.Image]:
    """(digest, image) of an archive's manifest on this host, or CheckpointError naming the
    field that differs (``-cpu host`` state does not move to another CPU)."""
    try:
        key = check_key(meta.get("key"))
        config = config_from_record(meta["config"])
        image = images.resolve(config.image)
        shape = local_shape(config, image, default_driver(config), str(meta["shape"]["ram"]))
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint archive: manifest lacks {exc}") from None
    except (ConfigError, ImageError) as exc:
        raise CheckpointError(f"checkpoint archive cannot be used on this host: {exc}") from None
    taken = meta["shape"]
    if taken.get("host_cpu") != shape.get("host_cpu") and (taken.get("host_cpu") or shape.get("host_cpu")):
        raise CheckpointError(f"checkpoint archive {key!r} was taken with -cpu host on another CPU "
                              f"({taken.get('host_cpu')!r}; this host: {shape.get('host_cpu')!r}): a checkpoint "
                              f"under KVM/HVF holds its CPU's features and does not move to a different CPU; "
                              f"build it on this host (or on CI runners with the same CPU)")
    mismatch = shape_mismatch(taken, shape)
    if mismatch:
        field = next((k for k in [*SHAPE_FIELDS, *sorted(set(taken) | set(shape))]
                      if taken.get(k) != shape.get(k)), "?")
        raise CheckpointError(f"checkpoint archive {key!r} does not match this host: field {field!r}: "
                              f"{mismatch.replace('for this VM', 'on this host')}")
    digest = cache_key(key, shape)
    if digest != meta.get("digest"):
        raise CheckpointError(f"checkpoint archive {key!r}: its digest {meta.get('digest')!r} is not the one "
                              f"its key and shape give on this host ({digest})")
    return digest, image


def _extract(tar: tarfile.TarFile, meta: Mapping[str, Any], tmp: Path) -> None:
    """The archive's files into ``tmp``, each checked against the manifest's size and sha256."""
    files = meta.get("files")
    if not isinstance(files, dict) or set(files) != set(FILES):
        raise CheckpointError(f"checkpoint archive: the manifest must list exactly {list(FILES)}")
    limits = {"state": STATE_MAX, "disk.qcow2": 2 * int(meta["disk_bytes"]) + (64 << 20),
              "mem": int(meta["config"]["memory_mib"]) << 20}
    for name in ("state", "disk.qcow2", "mem"):
        want = files[name]
        member = tar.next()
        if member is None:
            raise CheckpointError(f"checkpoint archive ends before {name}")
        if member.size != want["size"] or member.size > limits[name]:
            raise CheckpointError(f"checkpoint archive: {member.name} is {member.size} bytes, the manifest says "
                                  f"{want['size']} (at most {limits[name]})")
        h = hashlib.sha256()
        with open(tmp / name, "wb") as out:
            write_sparse(_hashed(_member_file(tar, member, name), h), out)
        if h.hexdigest() != want["sha256"]:
            raise CheckpointError(f"checkpoint archive: {name} does not match its sha256 in the manifest: the "
                                  f"file is corrupt or was changed; it was not imported")
    if tar.next() is not None:
        raise CheckpointError("checkpoint archive has members after mem")


def _hashed(f: IO[bytes], h: Any) -> Iterator[bytes]:
    for chunk in iter(lambda: f.read(_CHUNK), b""):
        h.update(chunk)
        yield chunk


def import_archive(store: PreparedStore, source: Path) -> tuple[str, str]:
    """Import the export ``source`` into ``store``; returns (key, digest). Nothing is
    published unless every check passes."""
    try:
        with tarfile.open(source, "r|gz") as tar:
            meta = _read_manifest(tar)
            digest, image = check_host(meta)
            try:
                with FileLock(str(store.root / f"{digest}.lock"), timeout=BUILD_TIMEOUT):
                    if store.manifest(digest) is None:
                        tmp = store.build_dir(digest)
                        try:
                            _extract(tar, meta, tmp)
                            _rebase(tmp / "disk.qcow2", image)
                            store.publish(tmp, digest, _local_manifest(meta, tmp, image))
                        finally:
                            shutil.rmtree(tmp, ignore_errors=True)
            except Timeout as exc:
                raise CheckpointError(f"another process holds {exc.lock_file}") from exc
    except (tarfile.TarError, zlib.error, EOFError, OSError) as exc:
        raise CheckpointError(f"checkpoint archive {source} is corrupt or unreadable ({exc}); it was not "
                              f"imported") from None
    return str(meta["key"]), digest


def _rebase(disk: Path, image: images.Image) -> None:
    """Point the (verified) disk layer at this host's copy of the image's root disk (same
    content: the image id is part of the key)."""
    res = subprocess.run(["qemu-img", "rebase", "-q", "-u", "-f", "qcow2", "-b", str(image.rootfs), "-F", "raw",
                          str(disk)], capture_output=True, text=True)
    if res.returncode != 0:
        raise CheckpointError(f"qemu-img could not point the imported disk at {image.rootfs}: {res.stderr.strip()}")


def _local_manifest(meta: Mapping[str, Any], tmp: Path, image: images.Image) -> dict[str, Any]:
    from .prepared import file_record

    files = dict(meta["files"])
    files["disk.qcow2"] = file_record(tmp / "disk.qcow2")  # its backing path is this host's now
    return {**meta, "files": files, "image_rootfs": str(image.rootfs), "imported": True}
