"""``SMOLVM_IMAGE_PATH``: image caches shared read-only (another host's, over NFS), searched
after this host's own; never locked or written, whatever this host derives goes to its own."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_store import make_image

from pytest_smolvm.errors import ConfigError, ImageError
from pytest_smolvm.images import provision, store
from pytest_smolvm.images.recipe import Recipe, boot_digest


@pytest.fixture
def shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    local = tmp_path / "cache"
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(local))
    other = tmp_path / "nfs-images"
    monkeypatch.setenv("SMOLVM_IMAGE_PATH", os.pathsep.join([str(tmp_path / "missing"), str(other)]))
    store._load_cached.cache_clear()
    yield other
    store._load_cached.cache_clear()
    for p in [other, *other.rglob("*")]:  # let tmp_path's cleanup remove it
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)


def freeze(tree: Path) -> dict[str, float]:
    """Make ``tree`` read-only (as a read-only mount would be); its files' mtimes."""
    state = {str(p): p.lstat().st_mtime for p in tree.rglob("*")}
    for p in sorted(tree.rglob("*"), reverse=True):
        if p.is_dir() and not p.is_symlink():
            p.chmod(stat.S_IRUSR | stat.S_IXUSR)
    tree.chmod(stat.S_IRUSR | stat.S_IXUSR)
    return state


def test_named_image_is_found_in_a_shared_cache_and_nothing_is_written_there(
        shared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = []
    monkeypatch.setattr(store, "agent_binary", lambda arch: Path("/bin/true"))
    monkeypatch.setattr(store, "build_initramfs", lambda src, dst, agent: (made.append(dst), dst.write_bytes(b"cpio")))
    build = make_image(shared / "tools" / "abc123")
    (shared / "tools" / "current").symlink_to("abc123")
    before = freeze(shared)  # root ignores modes: the mtimes below show nothing was written
    image = store.resolve("tools")
    assert image.path == build.resolve()
    # The boot layer was derived into this host's cache, beside nothing of the shared one.
    assert made and made[0].is_relative_to(Path(os.environ["SMOLVM_CACHE_DIR"]) / "bootlayers")
    assert image.initrd == made[0] and image.initrd.name == f"boot-{boot_digest()}.cpio"
    assert {str(p): p.lstat().st_mtime for p in shared.rglob("*")} == before
    store._load_cached.cache_clear()
    assert store.resolve("tools").initrd == made[0] and len(made) == 1   # derived once


def test_a_boot_layer_the_shared_cache_has_is_used_from_there(shared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "build_initramfs", lambda *a: pytest.fail("must not derive"))
    build = make_image(shared / "default" / Recipe().digest())
    (build / f"boot-{boot_digest()}.cpio").write_bytes(b"cpio")
    freeze(shared)
    assert provision.default_built()
    image = store.resolve("default")
    assert image.initrd == build / f"boot-{boot_digest()}.cpio"


def test_the_local_cache_wins(shared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "build_initramfs", lambda src, dst, agent: dst.write_bytes(b"cpio"))
    monkeypatch.setattr(store, "agent_binary", lambda arch: Path("/bin/true"))
    make_image(shared / "tools" / "old")
    (shared / "tools" / "current").symlink_to("old")
    local = make_image(store.images_dir() / "tools" / "new")
    (store.images_dir() / "tools" / "current").symlink_to("new")
    assert store.resolve("tools").path == local.resolve()


def test_missing_everywhere_names_every_place_searched(shared: Path) -> None:
    with pytest.raises(ImageError) as info:
        store.resolve("nothere")
    assert str(store.images_dir()) in str(info.value) and str(shared) in str(info.value)
    assert not provision.default_built()


def test_a_shared_cache_others_could_write_is_refused(shared: Path) -> None:
    """A shared image cache that another local user could write (a world-writable directory on
    the way, e.g. SMOLVM_IMAGE_PATH=/tmp/images planted by someone else) could have its image
    swapped: refused with an error naming the directory, never booted."""
    build = make_image(shared / "default" / Recipe().digest())
    (build / f"boot-{boot_digest()}.cpio").write_bytes(b"cpio")
    assert store.resolve("default").path == build
    shared.chmod(0o777)
    store._load_cached.cache_clear()
    with pytest.raises(ConfigError, match=f"SMOLVM_IMAGE_PATH.*{shared}, which others can write"):
        store.resolve("default")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_a_shared_cache_another_user_owns_is_refused(shared: Path) -> None:
    build = make_image(shared / "default" / Recipe().digest())
    (build / f"boot-{boot_digest()}.cpio").write_bytes(b"cpio")
    os.chown(shared / "default", 12345, 12345)
    store._load_cached.cache_clear()
    with pytest.raises(ConfigError, match="belongs to uid 12345"):
        store.resolve("default")
