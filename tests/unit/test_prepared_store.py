"""Prepared-state cache: its key, config record, sparse writes and the archive's first
refusals (pure or on local files; the real-VM path is tests/integration/test_prepared.py)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from pytest_smolvm import CheckpointError, ConfigError, VMConfig
from pytest_smolvm.prepared import (
    FORMAT,
    PreparedStore,
    cache_key,
    check_key,
    config_from_record,
    config_record,
    write_sparse,
)
from pytest_smolvm.prepared_archive import import_archive

SHAPE = {"backend": "qemu", "qemu": "7.2.22", "accel": "tcg", "image": "abc-def", "vcpus": 1, "memory_mib": 256,
         "cpu": None, "disk_size_mib": None, "nic": False, "aslr": None, "volumes": [], "ram": "mem"}


def test_cache_key_covers_key_and_every_shape_field_but_ram() -> None:
    base = cache_key("app-v3", SHAPE)
    assert base == cache_key("app-v3", dict(reversed(list(SHAPE.items()))))  # order does not matter
    assert cache_key("app-v3", {**SHAPE, "ram": "builtin"}) == base  # how the build VM booted
    assert cache_key("app-v4", SHAPE) != base
    for field, other in (("qemu", "8.2.0"), ("accel", "kvm"), ("image", "abc-xyz"), ("memory_mib", 512),
                         ("host_cpu", "GenuineIntel/6/85")):
        assert cache_key("app-v3", {**SHAPE, field: other}) != base, field


@pytest.mark.parametrize("bad", ["", "../x", "a b", "x" * 65, "-lead", None, 3])
def test_bad_keys_are_refused(bad: object) -> None:
    with pytest.raises(ConfigError, match="invalid prepared-state key"):
        check_key(bad)


def test_config_record_round_trips_and_refuses_unknown_fields() -> None:
    cfg = VMConfig(memory_mib=512, vcpus=2, network="none")
    back = config_from_record(json.loads(json.dumps(config_record(cfg))))
    assert (back.memory_mib, back.vcpus, back.network, back.image) == (512, 2, "none", "default")
    with pytest.raises(ConfigError, match="unknown config field"):
        config_from_record({**config_record(cfg), "env": {"A": "1"}})


def test_write_sparse_leaves_holes_for_zero_chunks(tmp_path: Path) -> None:
    chunks = [b"\0" * (1 << 20)] * 8 + [b"x" * 4096]
    with open(tmp_path / "f", "wb") as f:
        assert write_sparse(iter(chunks), f) == 8 * (1 << 20) + 4096
    st = (tmp_path / "f").stat()
    assert st.st_size == 8 * (1 << 20) + 4096 and st.st_blocks * 512 < 1 << 20
    assert (tmp_path / "f").read_bytes()[-4096:] == b"x" * 4096


def _archive(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def test_archive_must_start_with_a_regular_manifest_of_this_format(tmp_path: Path) -> None:
    store = PreparedStore(tmp_path / "store")
    store.root.mkdir()
    link = tarfile.TarInfo("manifest.json")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
    cases = [
        ([(link, b"")], "expected the regular file 'manifest.json'"),
        ([(tarfile.TarInfo("../mem"), b"x")], "expected the regular file 'manifest.json', found '../mem'"),
        ([(tarfile.TarInfo("manifest.json"), json.dumps({"format": FORMAT + 1}).encode())], "is not this version"),
        ([(tarfile.TarInfo("manifest.json"), b"{nope")], "not JSON"),
    ]
    for i, (members, message) in enumerate(cases):
        with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(".", r"\.")):
            import_archive(store, _archive(tmp_path / f"a{i}.tgz", members))
    garbage = tmp_path / "garbage.tgz"
    garbage.write_bytes(b"\x1f\x8b" + b"\xff" * 100)
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        import_archive(store, garbage)
    assert sorted(p.name for p in store.root.iterdir()) == []  # nothing published, nothing half-written
