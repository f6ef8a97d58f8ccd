"""SnapshotStore.lookup when another process discards the snapshot while it is verified
(the suite's corruption tests do, beside pool tests in another xdist worker)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pytest_smolvm import snapshots


def make_snapshot(root: Path, key: str) -> Path:
    d = root / key
    d.mkdir(parents=True)
    files = {}
    for name in ("mem", "state", snapshots.DISK_FILES[0]):
        data = name.encode() * 10
        (d / name).write_bytes(data)
        files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (d / "meta.json").write_text(json.dumps({"files": files}))
    return d


def test_lookup_verifies_a_whole_snapshot(tmp_path: Path) -> None:
    store = snapshots.SnapshotStore(tmp_path)
    assert store.lookup("k") is None
    d = make_snapshot(tmp_path, "k")
    assert store.lookup("k") == d


def test_snapshot_removed_during_verification_is_a_snapshot_error(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    store = snapshots.SnapshotStore(tmp_path)
    d = make_snapshot(tmp_path, "k")
    real = snapshots.sha256_file

    def racing(path: Path) -> str:
        (d / "mem").unlink(missing_ok=True)  # another process discards it just now
        return real(path)

    monkeypatch.setattr(snapshots, "sha256_file", racing)
    with pytest.raises(snapshots.SnapshotError, match="changed while it was verified"):
        store.lookup("k")
