"""`image prune` and the kernels fetched for imported and declared images (images/kernel.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_prune_keeps_the_current_kernel_and_fetches_in_progress(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`image prune` drops fetched kernels of older recipes (images hold their own copies),
    never the current one, a fetch's work directory, or a kernel whose fetch lock is held."""
    from filelock import FileLock

    from pytest_smolvm.images.kernel import kernel_key, prune_kernels
    from pytest_smolvm.images.recipe import Recipe

    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "cache" / "kernels"
    current, old, busy, work = (root / kernel_key(Recipe()), root / "0123456789abcdef", root / "fedcba9876543210",
                                root / ".kernel-x1y2")
    for d in (current, old, busy, work):
        d.mkdir(parents=True)
        (d / "vmlinux").write_bytes(b"x")
    with FileLock(str(root / f".{busy.name}.lock")):
        assert prune_kernels(dry_run=True) == 1 and old.exists()
        assert prune_kernels() == 1
    assert sorted(d.name for d in root.iterdir() if d.is_dir()) == sorted([current.name, busy.name, work.name])
