"""Debian packages read in Python (pytest_smolvm.images.deb): what a Mac uses instead of dpkg.
The packages here are made in the test (ar + tar); tests/integration/test_image_without_linux_tools.py
reads Debian's own."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from pytest_smolvm.errors import ImageError
from pytest_smolvm.images import build, deb


def tarball(files: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:  # type: ignore[call-overload]
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def ar(members: dict[str, bytes]) -> bytes:
    out = bytearray(deb.AR_MAGIC)
    for name, data in members.items():
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}".encode() + b"`\n" + data
        if len(data) % 2:
            out += b"\n"
    return bytes(out)


def make_deb(path: Path, package: str = "busybox-static", arch: str = "arm64",
             data: dict[str, bytes] | None = None, data_name: str = "data.tar.gz") -> Path:
    control = f"Package: {package}\nVersion: 1:1.35.0-4\nArchitecture: {arch}\n".encode()
    path.write_bytes(ar({"debian-binary": b"2.0\n", "control.tar.gz": tarball({"./control": control}),
                         data_name: tarball(data or {"./bin/busybox": b"\x7fELF-arm64", "./usr/share/doc/x": b"d"},
                                            "w:xz" if data_name.endswith(".xz") else "w:gz")}))
    return path


def test_control_and_selected_files(tmp_path: Path) -> None:
    package = make_deb(tmp_path / "bb.deb", data_name="data.tar.xz")
    assert deb.control(package)["Package"] == "busybox-static" and deb.control(package)["Architecture"] == "arm64"
    written = deb.extract(package, tmp_path / "out", lambda p: p == "bin/busybox")
    assert written == [tmp_path / "out/bin/busybox"]
    assert (tmp_path / "out/bin/busybox").read_bytes() == b"\x7fELF-arm64"
    assert not (tmp_path / "out/usr").exists()


def test_not_a_deb_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "kernel.deb"
    bad.write_bytes(b"PK\x03\x04 a zip")
    with pytest.raises(ImageError, match=f"{bad} is not a Debian package"):
        deb.control(bad)
    truncated = tmp_path / "cut.deb"
    truncated.write_bytes(make_deb(tmp_path / "whole.deb").read_bytes()[:200])
    with pytest.raises(ImageError, match="runs past the end of the file"):
        deb.extract(truncated, tmp_path / "out")


def test_a_member_outside_the_target_is_refused(tmp_path: Path) -> None:
    evil = make_deb(tmp_path / "evil.deb", data={"./../../etc/evil": b"x"})
    with pytest.raises(ImageError, match="would land outside the target"):
        deb.extract(evil, tmp_path / "out")
    assert not (tmp_path / "etc").exists()


def test_zstd_is_refused_by_name(tmp_path: Path) -> None:
    package = tmp_path / "z.deb"
    package.write_bytes(ar({"debian-binary": b"2.0\n", "control.tar.zst": b"(\xb5/\xfd", "data.tar.zst": b"x"}))
    with pytest.raises(ImageError, match="zstd-compressed"):
        deb.control(package)


def test_local_package_must_match_what_it_stands_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    amd = make_deb(tmp_path / "bb-amd64.deb", arch="amd64")
    monkeypatch.setenv(build.BUSYBOX_DEB_ENV, str(amd))
    with pytest.raises(ImageError, match=r"invalid SMOLVM_BUSYBOX_DEB=.*\(from the environment\): it is busybox-static "
                                         r"for amd64, not busybox-static for arm64"):
        build.local_deb(build.BUSYBOX_DEB_ENV, "arm64", "busybox-static")
    monkeypatch.setenv(build.BUSYBOX_DEB_ENV, str(tmp_path / "missing.deb"))
    with pytest.raises(ImageError, match="no such file"):
        build.local_deb(build.BUSYBOX_DEB_ENV, "arm64", "busybox-static")
    monkeypatch.setenv(build.BUSYBOX_DEB_ENV, str(make_deb(tmp_path / "bb.deb")))
    assert build.local_deb(build.BUSYBOX_DEB_ENV, "arm64", "busybox-static") == tmp_path / "bb.deb"
    monkeypatch.delenv(build.BUSYBOX_DEB_ENV)
    assert build.local_deb(build.BUSYBOX_DEB_ENV, "arm64", "busybox-static") is None
