"""Read-only volumes: validation, content-addressed images, argv, snapshot key (no VM here)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pytest_smolvm import volumes
from pytest_smolvm.config import VMConfig, check_field, config_from_layers
from pytest_smolvm.drivers.qemu import QemuDriver, qemu_argv
from pytest_smolvm.drivers.spec import MachineSpec
from pytest_smolvm.errors import ConfigError
from pytest_smolvm.images import Image
from pytest_smolvm.pool import config_key
from pytest_smolvm.volumes import Volume, check_volumes, guest_mounts, qemu_volume_args

needs_mkfs = pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs mkfs.ext4 (e2fsprogs)")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "f.txt").write_text("hello\n")
    (d / "link").symlink_to("sub/f.txt")
    return d


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    c = tmp_path / "cache"
    c.mkdir(mode=0o700)
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(c))
    return c


def _ext4(path: Path, source: Path) -> Path:
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(source), str(path), "8M"], check=True)
    return path


# ---------------------------------------------------------------- validation


def test_the_spellings_agree(data: Path) -> None:
    want = (Volume(str(data), "/mnt/data"),)
    assert check_volumes({"/mnt/data": str(data)}) == want
    assert check_volumes({"/mnt/data/": data}) == want
    assert check_volumes([f"{data}:/mnt/data"]) == want
    assert check_volumes(f"{data}:/mnt/data") == want
    assert check_volumes([(str(data), "/mnt/data")]) == want
    assert check_volumes(want) == want  # idempotent, as config layers re-check values
    assert check_field("volumes", want) == want
    for empty in (None, "", (), [], {}):
        assert check_volumes(empty) == ()


def test_relative_sources_are_made_absolute_and_volumes_sorted(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(data.parent)
    vols = check_volumes({"/srv/b": "data/sub", "/srv/a": "data"})
    assert vols == (Volume(str(data), "/srv/a"), Volume(str(data / "sub"), "/srv/b"))


@pytest.mark.parametrize(("target", "says"), [
    ("relative/path", "must be an absolute path"),
    ("/", "cannot mount over /"),
    ("/etc", "cannot mount over /etc"),
    ("/usr/", "cannot mount over /usr"),
    ("/proc/x", "cannot mount over /proc/x"),
    ("/run/smolvm", "cannot mount over /run/smolvm"),
    ("/dev", "cannot mount over /dev"),
    ("/mnt/../etc", "normalised path (such as '/etc')"),
    ("/mnt//data", "normalised path (such as '/mnt/data')"),
    ("/mnt/./d", "normalised path"),
])
def test_bad_mount_points_are_named(data: Path, target: str, says: str) -> None:
    with pytest.raises(ConfigError, match="invalid volumes=") as info:
        check_volumes({target: str(data)})
    assert says in str(info.value) and repr(target) in str(info.value)


def test_overlapping_or_duplicate_mount_points_are_refused(data: Path) -> None:
    with pytest.raises(ConfigError, match="mount points /mnt/a and /mnt/a/b overlap"):
        check_volumes({"/mnt/a": str(data), "/mnt/a-x": str(data), "/mnt/a/b": str(data)})
    with pytest.raises(ConfigError, match="overlap"):
        check_volumes([f"{data}:/mnt/a", f"{data}:/mnt/a"])


def test_bad_sources_are_named(tmp_path: Path, data: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError, match=rf"invalid volumes='{missing}': host path {missing} cannot be used: "
                                          r"No such file or directory"):
        check_volumes({"/mnt/x": str(missing)})
    not_ext4 = tmp_path / "data.bin"
    not_ext4.write_bytes(b"\0" * 4096)
    with pytest.raises(ConfigError, match="is not an ext4 image"):
        check_volumes({"/mnt/x": str(not_ext4)})
    with pytest.raises(ConfigError, match="neither a directory nor an image file"):
        check_volumes({"/mnt/x": "/dev/null"})
    with pytest.raises(ConfigError, match="expected 'HOST:GUEST'"):
        check_volumes(["no-colon-here"])
    with pytest.raises(ConfigError, match="expected"):
        check_volumes(42)
    with pytest.raises(ConfigError, match="at most 16"):
        check_volumes({f"/mnt/{i}": str(data) for i in range(17)})


def test_errors_say_where_the_value_came_from(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"invalid volumes=.*cannot be used.*\(from marker on test_x\)"):
        config_from_layers([("marker on test_x", {"volumes": {"/mnt/x": str(tmp_path / "nope")}})])
    with pytest.raises(ConfigError, match=r"invalid volumes='/etc'.*\(in VMConfig\)"):
        VMConfig(volumes={"/etc": str(tmp_path)})


def test_configs_with_volumes_have_a_pool_key(data: Path) -> None:
    cfg = VMConfig(volumes={"/mnt/data": str(data)})
    assert config_key(cfg) != config_key(VMConfig())
    assert cfg == VMConfig(volumes=[f"{data}:/mnt/data"]) and hash(cfg.volumes)


# ---------------------------------------------------------------- images


def test_tree_digest_follows_content_modes_and_links(data: Path) -> None:
    first = volumes.tree_digest(str(data))
    assert volumes.tree_digest(str(data)) == first
    (data / "sub" / "f.txt").write_text("HELLO\n")
    second = volumes.tree_digest(str(data))
    assert second != first
    os.chmod(data / "sub" / "f.txt", 0o600)
    third = volumes.tree_digest(str(data))
    assert third != second
    (data / "link").unlink()
    (data / "link").symlink_to("elsewhere")
    assert volumes.tree_digest(str(data)) != third


def test_special_files_are_refused(data: Path) -> None:
    os.mkfifo(data / "fifo")
    with pytest.raises(ConfigError, match="fifo is not a file, directory or symlink"):
        volumes.tree_digest(str(data))


def test_image_sizes_are_powers_of_two() -> None:
    assert volumes.image_size_mib(volumes._Tree("x", 3, 12_000)) == 64
    assert volumes.image_size_mib(volumes._Tree("x", 10, 100 << 20)) == 128
    assert volumes.image_size_mib(volumes._Tree("x", 10, 300 << 20)) == 512


@needs_mkfs
def test_a_directory_is_imaged_once_by_content(data: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vol = check_volumes({"/mnt/data": str(data)})[0]
    image = volumes.prepare(vol)
    assert image.parent == cache / "volumes" and image.suffix == ".ext4"
    assert (image.stat().st_mode & 0o777) == 0o600
    with open(image, "rb") as f:
        f.seek(1080)
        assert f.read(2) == b"\x53\xef"
    listing = subprocess.run(["debugfs", "-R", "cat /sub/f.txt", str(image)], capture_output=True, text=True)
    assert listing.stdout == "hello\n"
    built: list[str] = []
    monkeypatch.setattr(volumes, "_mkfs", lambda *a: built.append("again"))
    assert volumes.prepare(vol) == image and built == []
    copy = data.parent / "copy"
    shutil.copytree(data, copy, symlinks=True)
    assert volumes.prepare(Volume(str(copy), "/mnt/data")) == image  # same content, same image


@needs_mkfs
def test_an_image_file_is_attached_as_it_is(data: Path, tmp_path: Path, cache: Path) -> None:
    image = _ext4(tmp_path / "data.ext4", data)
    vol = check_volumes({"/mnt/data": str(image)})[0]
    assert volumes.prepare(vol) == image
    assert volumes.volume_sizes([vol]) == [8 << 20]
    fds = volumes.open_volumes([vol])
    try:
        assert len(fds) == 1 and os.fstat(fds[0]).st_size == 8 << 20
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.write(fds[0], b"x")  # read-only: QEMU can only read what it is given
    finally:
        os.close(fds[0])


@needs_mkfs
def test_a_source_changing_while_imaged_is_not_cached(data: Path, cache: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real = volumes._mkfs

    def mkfs_then_edit(source: str, target: Path, tree: volumes._Tree) -> None:
        real(source, target, tree)
        (data / "sub" / "f.txt").write_text("changed meanwhile\n")

    monkeypatch.setattr(volumes, "_mkfs", mkfs_then_edit)
    with pytest.raises(ConfigError, match="changed while it was being imaged"):
        volumes.prepare(Volume(str(data), "/mnt/data"))
    assert not [p for p in (cache / "volumes").iterdir() if p.suffix in (".ext4", ".tmp")]


# ---------------------------------------------------------------- argv, agent request, snapshot key


def test_volume_args_are_read_only_descriptors() -> None:
    argv = qemu_volume_args([7, 9])
    assert argv == [
        "-add-fd", "fd=7,set=2,opaque=smolvm-vol0",
        "-drive", "id=vol0,file=/dev/fdset/2,format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=vol0,serial=smolvm-vol0",
        "-add-fd", "fd=9,set=3,opaque=smolvm-vol1",
        "-drive", "id=vol1,file=/dev/fdset/3,format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=vol1,serial=smolvm-vol1",
    ]


def test_volumes_come_after_the_root_disk(tmp_path: Path) -> None:
    """The guest names virtio disks in argv order; the initramfs mounts /dev/vda as root."""
    argv = qemu_argv(MachineSpec(binary="qemu", accel="tcg", vcpus=1, memory_mib=256, kernel=tmp_path / "k",
                                 initrd=tmp_path / "i", cmdline="quiet", control=tmp_path / "ctl",
                                 disk=tmp_path / "d.qcow2", volume_fds=(8,)))
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device" and "virtio-blk" in argv[i + 1]]
    assert devices == ["virtio-blk-device,drive=root", "virtio-blk-device,drive=vol0,serial=smolvm-vol0"]


def test_guest_mounts_match_the_serials(data: Path) -> None:
    vols = check_volumes({"/mnt/b": str(data), "/mnt/a": str(data)})
    assert guest_mounts(vols) == [
        {"serial": "smolvm-vol0", "target": "/mnt/a", "options": "ro,noload,nosuid,nodev"},
        {"serial": "smolvm-vol1", "target": "/mnt/b", "options": "ro,noload,nosuid,nodev"},
    ]


def _image(tmp_path: Path) -> Image:
    return Image(name="default", path=tmp_path, kernel=tmp_path / "vmlinux", initrd=tmp_path / "boot-x.cpio",
                 rootfs=tmp_path / "rootfs.ext4", rootfs_mib=1024, digest="d" * 16, kernel_release="6.1",
                 ssh_host_key_pub="")


@needs_mkfs
def test_snapshot_key_covers_volume_sizes_not_contents(data: Path, tmp_path: Path, cache: Path) -> None:
    driver = QemuDriver(binary=str(tmp_path / "no-such-qemu"))
    image = _image(tmp_path)
    plain = driver.snapshot_key(VMConfig(accel="tcg"), image)
    one = driver.snapshot_key(VMConfig(accel="tcg", volumes={"/mnt/data": str(data)}), image)
    assert one != plain
    (data / "sub" / "f.txt").write_text("other content, same image size\n")
    assert driver.snapshot_key(VMConfig(accel="tcg", volumes={"/mnt/data": str(data)}), image) == one
    small = _ext4(tmp_path / "small.ext4", data)
    assert driver.snapshot_key(VMConfig(accel="tcg", volumes={"/mnt/data": str(small)}), image) != one
    two = VMConfig(accel="tcg", volumes={"/mnt/data": str(data), "/mnt/more": str(data)})
    assert driver.snapshot_key(two, image) not in (one, plain)


@needs_mkfs
def test_prune_removes_cached_images(data: Path, cache: Path) -> None:
    image = volumes.prepare(Volume(str(data), "/mnt/data"))
    assert volumes.prune_images(dry_run=True) == 1 and image.exists()
    assert volumes.prune_images() == 1 and not image.exists()
    assert volumes.prepare(Volume(str(data), "/mnt/data")) == image and image.exists()  # rebuilt on demand
