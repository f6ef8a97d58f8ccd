"""Regression tests of the arm64 image build's first contact (issue 22, bugs 1-3): the
kernel package named once with its architecture, a raw or gzipped arm64 Image, busybox of the
image's architecture; and the clear error where binfmt_misc cannot run arm64 programs."""

from __future__ import annotations

import gzip
import time
from pathlib import Path
from typing import Any

import pytest

from pytest_smolvm.errors import ImageError
from pytest_smolvm.images import build
from pytest_smolvm.images.recipe import Recipe, arm64_recipe

#: What ``apt-cache depends --important linux-image-cloud-arm64:arm64`` prints on an amd64 host.
DEPENDS_FOREIGN = """linux-image-cloud-arm64:arm64
  Depends: linux-image-6.1.0-57-cloud-arm64:arm64
"""
DEPENDS_NATIVE = """linux-image-cloud-amd64
  Depends: linux-image-6.1.0-57-cloud-amd64
"""


def arm64_image(size: int = 4096) -> bytes:
    """The head of an arm64 EFI-stub Image: ``MZ``, and ``ARM\\x64`` at offset 56."""
    head = bytearray(size)
    head[0:2] = b"MZ"
    head[56:60] = build.ARM64_IMAGE_MAGIC
    return bytes(head)


def elf(machine: int) -> bytes:
    head = bytearray(64)
    head[0:4] = b"\x7fELF"
    head[4], head[5] = 2, 1
    head[18:20] = machine.to_bytes(2, "little")
    return bytes(head)


def a_build(tmp_path: Path, recipe: Recipe) -> build._Build:
    b = build._Build(recipe, tmp_path / "final", tmp_path / "work", lambda _m: None, time.monotonic())
    b.work.mkdir()
    return b


@pytest.fixture
def amd64_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "_host_arch", lambda: "amd64")


def test_kernel_package_is_qualified_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, amd64_host: None) -> None:
    """Bug 1: apt-cache names the foreign dependency ``...:arm64`` already; apt-get was asked
    for ``linux-image-6.1.0-57-cloud-arm64:arm64:arm64`` ("Unable to locate package")."""
    calls: list[list[str]] = []

    def run(argv: list[str], what: str, progress: Any = None, **kw: Any) -> str:
        calls.append(argv)
        if argv[0] == "apt-cache":
            return DEPENDS_FOREIGN
        if argv[:2] == ["apt-get", "download"]:
            (Path(kw["cwd"]) / "linux-image-6.1.0-57-cloud-arm64_6.1.192-3_arm64.deb").write_bytes(b"!<arch>\n")
        return ""

    monkeypatch.setattr(build, "_run", run)
    b = a_build(tmp_path, arm64_recipe())
    build._download_kernel(b)
    assert calls[0] == ["apt-cache", "depends", "--important", "linux-image-cloud-arm64:arm64"]
    assert calls[1] == ["apt-get", "download", "linux-image-6.1.0-57-cloud-arm64:arm64"]
    assert b.kernel_package == "linux-image-6.1.0-57-cloud-arm64"


def test_concrete_kernel_package_parsing() -> None:
    assert build.concrete_kernel_package(DEPENDS_FOREIGN) == "linux-image-6.1.0-57-cloud-arm64"
    assert build.concrete_kernel_package(DEPENDS_NATIVE) == "linux-image-6.1.0-57-cloud-amd64"
    assert build.concrete_kernel_package("linux-image-cloud-arm64:arm64\n") is None


def test_host_packages_are_not_qualified(amd64_host: None) -> None:
    assert build.qualified("linux-image-cloud-amd64", "amd64") == "linux-image-cloud-amd64"
    assert build.qualified("busybox-static", "arm64") == "busybox-static:arm64"


def test_raw_arm64_image_is_used_as_it_is(tmp_path: Path) -> None:
    """Bug 2: bookworm's arm64 vmlinuz is an uncompressed EFI-stub Image; the builder said
    "Not a gzipped file (b'MZ')"."""
    vmlinuz = tmp_path / "vmlinuz-6.1.0-57-cloud-arm64"
    vmlinuz.write_bytes(arm64_image())
    build._extract_arm64_image(vmlinuz, tmp_path / "vmlinux")
    assert (tmp_path / "vmlinux").read_bytes() == arm64_image()


def test_gzipped_arm64_image_is_decompressed(tmp_path: Path) -> None:
    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(gzip.compress(arm64_image()))
    build._extract_arm64_image(vmlinuz, tmp_path / "vmlinux")
    assert (tmp_path / "vmlinux").read_bytes() == arm64_image()


@pytest.mark.parametrize("blob", [b"MZ" + bytes(100), b"\x7fELF" + bytes(100), gzip.compress(b"MZ" + bytes(100))],
                         ids=["raw-no-magic", "elf", "gzip-no-magic"])
def test_not_an_arm64_image_is_named(tmp_path: Path, blob: bytes) -> None:
    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(blob)
    with pytest.raises(ImageError, match="does not hold an arm64 Image") as info:
        build._extract_arm64_image(vmlinuz, tmp_path / "vmlinux")
    assert str(vmlinuz) in str(info.value)
    assert not (tmp_path / "vmlinux").exists()


def test_broken_gzip_is_named(tmp_path: Path) -> None:
    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(gzip.compress(arm64_image())[:50])
    with pytest.raises(ImageError, match="cannot decompress the arm64 kernel"):
        build._extract_arm64_image(vmlinuz, tmp_path / "vmlinux")


def test_arm64_busybox_comes_from_busybox_static_arm64(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        amd64_host: None) -> None:
    """Bug 3: the host's x86-64 /bin/busybox went into the arm64 initramfs."""
    calls: list[list[str]] = []

    def run(argv: list[str], what: str, progress: Any = None, **kw: Any) -> str:
        calls.append(argv)
        if argv[:2] == ["apt-get", "download"]:
            (Path(kw["cwd"]) / "busybox-static_1.35.0-4+b3_arm64.deb").write_bytes(b"!<arch>\n")
        if argv[0] == "dpkg-deb":
            (Path(argv[3]) / "bin").mkdir(parents=True)
            (Path(argv[3]) / "bin" / "busybox").write_bytes(elf(0xB7))
        return ""

    monkeypatch.setattr(build, "_run", run)
    b = a_build(tmp_path, arm64_recipe())
    busybox = build.busybox_for(b)
    assert calls[0] == ["apt-get", "download", "busybox-static:arm64"]
    assert busybox != build.BUSYBOX and busybox.is_relative_to(b.work)
    build.check_elf_arch(busybox, "arm64", "busybox")


def test_host_busybox_for_a_host_image(tmp_path: Path, amd64_host: None) -> None:
    assert build.busybox_for(a_build(tmp_path, Recipe())) == build.BUSYBOX


def test_busybox_of_another_architecture_is_refused(tmp_path: Path) -> None:
    x86 = tmp_path / "busybox"
    x86.write_bytes(elf(0x3E))
    with pytest.raises(ImageError, match=r"busybox .* is built for amd64, not for the image's architecture arm64"):
        build.check_elf_arch(x86, "arm64", "busybox")
    (tmp_path / "text").write_text("#!/bin/sh\n")
    with pytest.raises(ImageError, match="is not an ELF binary"):
        build.check_elf_arch(tmp_path / "text", "arm64", "busybox")


def test_missing_binfmt_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, amd64_host: None) -> None:
    monkeypatch.setattr(build, "BINFMT_DIR", tmp_path)
    why = build.binfmt_problem("arm64")
    assert why is not None
    assert str(tmp_path / "qemu-aarch64") in why and "(missing)" in why
    assert "apt-get install qemu-user-static" in why and "qemu-aarch64.conf" in why
    (tmp_path / "qemu-aarch64").write_text("disabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\n")
    assert "(disabled)" in (build.binfmt_problem("arm64") or "")
    (tmp_path / "qemu-aarch64").write_text("enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\n")
    assert build.binfmt_problem("arm64") is None
    assert build.binfmt_problem("amd64") is None


def test_build_refuses_before_doing_anything_without_binfmt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            amd64_host: None) -> None:
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "BINFMT_DIR", tmp_path)
    monkeypatch.setattr(build, "missing_tools", lambda: [])
    with pytest.raises(ImageError, match="cannot build image 'default-arm64': an arm64 image on this amd64 host"):
        build.build(arm64_recipe())
    assert not (tmp_path / "cache" / "images" / "default-arm64").exists()
