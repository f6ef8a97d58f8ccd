"""Unit tests of pytest_smolvm.images.store: resolving and verifying built images."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_smolvm.errors import ImageError
from pytest_smolvm.images import store
from pytest_smolvm.images.recipe import BOOT_MODULES, NET_MODULES, Recipe, boot_digest
from pytest_smolvm.images.store import BUILD_HINT, resolve

ROOTFS_MIB = 1  # what the manifest claims; resolve() reports it, it does not check it


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = tmp_path / "cache"
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(root))
    store._load_cached.cache_clear()
    yield root
    store._load_cached.cache_clear()


def make_image(path: Path, *, digest: str = "0123456789abcdef") -> Path:
    """A hand-made image directory that passes every check resolve() makes."""
    (path / "modules").mkdir(parents=True)
    (path / "vmlinux").write_bytes(b"\x7fELF" + b"\x02\x01\x01" + bytes(200))
    rootfs = bytearray(4096)
    rootfs[1080:1082] = b"\x53\xef"
    (path / "rootfs.ext4").write_bytes(bytes(rootfs))
    (path / "busybox").write_bytes(b"\x7fELF busybox")
    for mod in BOOT_MODULES + NET_MODULES:
        (path / "modules" / f"{mod}.ko").write_bytes(b"\x7fELF " + mod.encode())
    (path / "ssh_host_ed25519_key.pub").write_text("ssh-ed25519 AAAAfake root@smolvm\n")
    files = {str(f.relative_to(path)): {"size": f.stat().st_size, "sha256": "0" * 64}
             for f in sorted(path.rglob("*")) if f.is_file()}
    manifest = {"name": path.name, "digest": digest, "rootfs_mib": ROOTFS_MIB,
                "kernel_release": "6.1.0-fake", "files": files}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def expect_image_error(target: str, *needles: str) -> str:
    store._load_cached.cache_clear()
    with pytest.raises(ImageError) as info:
        resolve(target)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


# ---------------------------------------------------------------- nothing built


def test_default_not_built(cache: Path) -> None:
    msg = expect_image_error("default", BUILD_HINT, "'default'")
    assert "python -m pytest_smolvm image build" in msg
    assert not (cache / "images" / "default").exists()  # resolve never builds


def test_default_older_build_is_mentioned(cache: Path) -> None:
    name_dir = cache / "images" / "default"
    old = make_image(name_dir / "olddigest00000000")
    (name_dir / "current").symlink_to(old.name)
    expect_image_error("default", BUILD_HINT, str(old))


def test_unknown_name(cache: Path) -> None:
    msg = expect_image_error("nosuch", "'nosuch'", f"{BUILD_HINT} --name nosuch")
    assert str(cache / "images") in msg


@pytest.mark.parametrize("kind", ["empty-dir", "missing-dir"])
def test_path_without_manifest(tmp_path: Path, kind: str) -> None:
    d = tmp_path / "notanimage"
    if kind == "empty-dir":
        d.mkdir()
    expect_image_error(str(d), "manifest.json", str(d))


def test_relative_path_is_treated_as_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_image(tmp_path / "rel")
    monkeypatch.chdir(tmp_path)
    image = resolve("./rel")
    assert image.path == (tmp_path / "rel").resolve()


# ---------------------------------------------------------------- a good image


def test_resolve_good_image_by_path(tmp_path: Path) -> None:
    path = make_image(tmp_path / "img", digest="feedfacefeedface")
    image = resolve(str(path))
    assert image.path == path.resolve()
    assert image.kernel == path.resolve() / "vmlinux"
    assert image.rootfs == path.resolve() / "rootfs.ext4"
    assert image.rootfs_mib == ROOTFS_MIB
    assert image.digest == "feedfacefeedface"
    assert image.kernel_release == "6.1.0-fake"
    assert image.ssh_host_key_pub == "ssh-ed25519 AAAAfake root@smolvm"
    # The boot layer was derived from the base and cached next to it.
    assert image.initrd == path.resolve() / f"boot-{boot_digest()}.cpio"
    assert image.initrd.read_bytes().startswith(b"070701")
    assert [p.name for p in path.glob("boot-*.cpio")] == [image.initrd.name]
    assert image.id == f"feedfacefeedface-{boot_digest()}"


def test_boot_layer_not_rebuilt_when_present(tmp_path: Path) -> None:
    path = make_image(tmp_path / "img")
    first = resolve(str(path)).initrd
    first.write_bytes(b"070701 marker")  # an existing boot layer is reused as is
    store._load_cached.cache_clear()
    assert resolve(str(path)).initrd.read_bytes() == b"070701 marker"


def test_resolve_is_cached_until_manifest_changes(tmp_path: Path) -> None:
    path = make_image(tmp_path / "img")
    a = resolve(str(path))
    assert resolve(str(path)) is a
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["digest"] = "aaaaaaaaaaaaaaaa"
    (path / "manifest.json").write_text(json.dumps(manifest))
    st = (path / "manifest.json").stat()
    os.utime(path / "manifest.json", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert resolve(str(path)).digest == "aaaaaaaaaaaaaaaa"


def test_resolve_default_by_recipe_digest(cache: Path) -> None:
    path = make_image(cache / "images" / "default" / Recipe().digest(), digest=Recipe().digest())
    image = resolve("default")
    assert image.name == "default"
    assert image.path == path
    assert image.digest == Recipe().digest()


def test_resolve_named_image_through_current_link(cache: Path) -> None:
    name_dir = cache / "images" / "mine"
    path = make_image(name_dir / "abcdabcdabcdabcd")
    (name_dir / "current").symlink_to(path.name)
    image = resolve("mine")
    assert image.name == "mine"
    assert image.path == path.resolve()


def test_dangling_current_link_is_not_built(cache: Path) -> None:
    name_dir = cache / "images" / "mine"
    name_dir.mkdir(parents=True)
    (name_dir / "current").symlink_to("gone")
    expect_image_error("mine", "'mine'", "--name mine")


# ---------------------------------------------------------------- corruption


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    path = make_image(tmp_path / "img")
    resolve(str(path))  # good before we break it
    return path


def test_wrong_size(image_dir: Path) -> None:
    with open(image_dir / "rootfs.ext4", "ab") as f:
        f.write(b"x")
    msg = expect_image_error(str(image_dir), "--force", str(image_dir / "rootfs.ext4"))
    assert "4097" in msg
    assert "4096" in msg


def test_truncated_module(image_dir: Path) -> None:
    (image_dir / "modules" / "virtio_net.ko").write_bytes(b"")
    expect_image_error(str(image_dir), "--force", str(image_dir / "modules" / "virtio_net.ko"))


def test_kernel_not_elf(image_dir: Path) -> None:
    kernel = image_dir / "vmlinux"
    data = bytearray(kernel.read_bytes())
    data[:4] = b"MZ\x00\x00"  # same size, wrong magic
    kernel.write_bytes(bytes(data))
    msg = expect_image_error(str(image_dir), "--force", str(kernel))
    assert "ELF" in msg


def test_rootfs_without_ext4_magic(image_dir: Path) -> None:
    rootfs = image_dir / "rootfs.ext4"
    data = bytearray(rootfs.read_bytes())
    data[1080:1082] = b"\x00\x00"
    rootfs.write_bytes(bytes(data))
    msg = expect_image_error(str(image_dir), "--force", str(rootfs))
    assert "ext4" in msg


@pytest.mark.parametrize("rel", ["vmlinux", "rootfs.ext4", "busybox", "modules/virtio_blk.ko"])
def test_missing_file(image_dir: Path, rel: str) -> None:
    (image_dir / rel).unlink()
    msg = expect_image_error(str(image_dir), "--force", str(image_dir / rel))
    assert "missing" in msg


def test_unreadable_manifest(image_dir: Path) -> None:
    (image_dir / "manifest.json").write_text("{not json")
    expect_image_error(str(image_dir), "--force", "manifest")


def test_corrupt_named_image_hint_names_image(cache: Path) -> None:
    name_dir = cache / "images" / "mine"
    path = make_image(name_dir / "abcdabcdabcdabcd")
    (name_dir / "current").symlink_to(path.name)
    (path / "busybox").unlink()
    expect_image_error("mine", f"{BUILD_HINT} --name mine --force", "busybox")


def test_corrupt_default_hint_has_no_name(cache: Path) -> None:
    path = make_image(cache / "images" / "default" / Recipe().digest())
    (path / "vmlinux").write_bytes(b"\x00" * (path / "vmlinux").stat().st_size)
    msg = expect_image_error("default", f"{BUILD_HINT} --force")
    assert "--name" not in msg


def test_failed_check_leaves_no_boot_layer(image_dir: Path) -> None:
    for cpio in image_dir.glob("boot-*.cpio"):
        cpio.unlink()
    (image_dir / "busybox").unlink()
    expect_image_error(str(image_dir), "--force")
    assert list(image_dir.glob("boot-*.cpio")) == []
    assert [p.name for p in image_dir.iterdir() if p.name.endswith(".tmp")] == []


def test_list_images(cache: Path) -> None:
    assert store.list_images() == []
    a = make_image(cache / "images" / "a" / "1111111111111111")
    (cache / "images" / "a" / "current").symlink_to(a.name)
    broken = cache / "images" / "b" / "2222222222222222"
    broken.mkdir(parents=True)
    (broken / "manifest.json").write_text("{")
    rows = store.list_images()
    assert [(name, path) for name, path, _ in rows] == [("a", a), ("b", broken)]
    assert rows[0][2]["digest"] == "0123456789abcdef"
    assert "error" in rows[1][2]
