"""Images declared in pyproject.toml (images/declared.py): parsing, errors that name the key and
the file, and the content key (a changed list rebuilds, an unchanged one never does)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_smolvm import ConfigError
from pytest_smolvm.images import declared as dcl
from pytest_smolvm.images.provision import platform_args
from pytest_smolvm.images.recipe import DEFAULT_PACKAGES, Recipe


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "tests/data").mkdir(parents=True)
    (tmp_path / "tests/data/a.txt").write_text("a")
    (tmp_path / "tool.sh").write_text("#!/bin/sh\n")
    return tmp_path


def write(project: Path, body: str) -> Path:
    path = project / "pyproject.toml"
    path.write_text(f"[project]\nname = 'x'\n\n{body}")
    return path


def test_full_declaration(project: Path) -> None:
    path = write(project, """
[tool.smolvm.images.ds]
from = "default"
apt = ["jq", "libfoo1:amd64=1.2-3"]
pip = ["numpy==2.1.3", "six"]
files = { "/opt/data" = "tests/data", "/usr/local/bin/tool" = "tool.sh" }
run = ["useradd -m app"]
size_mib = 2048
""")
    decl = dcl.load(path)["ds"]
    assert decl == dcl.Declared(
        "ds", "default", ("jq", "libfoo1:amd64=1.2-3"), ("numpy==2.1.3", "six"),
        (("/opt/data", str(project / "tests/data")), ("/usr/local/bin/tool", str(project / "tool.sh"))),
        ("useradd -m app",), 2048, path)
    assert decl.base_recipe() == Recipe(name="ds.base", packages=(*DEFAULT_PACKAGES, "jq", "libfoo1:amd64=1.2-3"))


def test_no_declarations_and_defaults(project: Path) -> None:
    assert dcl.load(write(project, "[tool.other]\nx = 1\n")) == {}
    decl = dcl.load(write(project, "[tool.smolvm.images.plain]\n"))["plain"]
    assert (decl.base, decl.has_steps, decl.base_recipe()) == ("default", False, Recipe())


def test_oci_base_is_resolved_from_the_pyproject_directory(project: Path) -> None:
    (project / "layouts/deb").mkdir(parents=True)
    decl = dcl.load(write(project, '[tool.smolvm.images.c]\nfrom = "oci:layouts/deb:12"\n'))["c"]
    assert decl.base == f"oci:{project / 'layouts/deb'}:12"
    assert decl.base_recipe() is None


@pytest.mark.parametrize(("body", "message"), [
    ('[tool.smolvm.images.x]\npip = "six"', r"\[tool\.smolvm\.images\.x\] pip in .*pyproject\.toml: expected a list"),
    ("[tool.smolvm.images.x]\nrun = [1]", r"\] run in .*: expected a list of non-empty strings"),
    ('[tool.smolvm.images.x]\napt = ["jq; rm -rf /"]', r"\] apt in .*: 'jq; rm -rf /' is not a Debian package"),
    ('[tool.smolvm.images.x]\npip = ["--index-url=http://evil"]', r"\] pip in .*: .* options are not accepted"),
    ("[tool.smolvm.images.x]\nfrom = 'ubuntu'", r"\] from in .*: expected \"default\", \"oci:DIR"),
    ("[tool.smolvm.images.x]\nfrom = 'oci:nowhere:1'", r"\] from in .*: image source .* does not exist"),
    ("[tool.smolvm.images.x]\nfrom = 'oci:tests'\napt = ['jq']", r"\] apt in .*: apt packages go on a Debian base"),
    ("[tool.smolvm.images.x]\nfiles = { 'opt/x' = 'tool.sh' }", r"\] files in .*: guest path 'opt/x' must be"),
    ("[tool.smolvm.images.x]\nfiles = { '/opt/../etc' = 'tool.sh' }", r"guest path '/opt/\.\./etc' must be absolute"),
    ("[tool.smolvm.images.x]\nfiles = { '/opt/x' = 'nope' }", r"'/opt/x': host path .*/nope is not a file"),
    ("[tool.smolvm.images.x]\nsize_mib = 10", r"\] size_mib in .*: expected MiB from 256, got 10"),
    ("[tool.smolvm.images.x]\nfrm = 'default'", r"\] frm in .*: unknown key; expected from, apt, pip"),
    ("[tool.smolvm.images.default]\n", r"images\.default\] in .*: the name is the built-in image's"),
    ('[tool.smolvm.images."a/b"]\n', r"invalid image name 'a/b'"),
    ("[tool.smolvm]\nimages = 3", r"invalid \[tool\.smolvm\.images\] in .*: expected a table"),
    ("[tool.smolvm.images.x\n", r"pyproject\.toml is not valid TOML"),
])
def test_bad_values_name_the_key_and_the_file(project: Path, body: str, message: str) -> None:
    path = write(project, body)
    with pytest.raises(ConfigError, match=message) as err:
        dcl.load(path)
    assert str(path) in str(err.value)


def test_key_changes_with_the_lists_and_the_files_content_only(project: Path) -> None:
    def key(body: str) -> str:
        return dcl.key(dcl.load(write(project, f"[tool.smolvm.images.k]\n{body}"))["k"], "base1")

    same = key('pip = ["six"]\nfiles = { "/opt/d" = "tests/data" }')
    assert key('pip = ["six"]\nfiles = { "/opt/d" = "tests/data" }') == same
    assert key('pip = ["six", "attrs"]\nfiles = { "/opt/d" = "tests/data" }') != same
    assert key('pip = ["six"]\nfiles = { "/opt/e" = "tests/data" }') != same
    assert key('pip = ["six"]\nfiles = { "/opt/d" = "tests/data" }\nrun = ["true"]') != same
    (project / "tests/data/a.txt").write_text("changed")
    assert key('pip = ["six"]\nfiles = { "/opt/d" = "tests/data" }') != same
    decl = dcl.load(write(project, "[tool.smolvm.images.k]\n"))["k"]
    assert dcl.key(decl, "base1") != dcl.key(decl, "base2")


def test_pip_platforms_follow_the_guest_glibc() -> None:
    args = platform_args("glibc 2.36", "x86_64")
    assert args[:2] == ["--platform", "linux_x86_64"]
    assert "manylinux_2_36_x86_64" in args and "manylinux_2_37_x86_64" not in args
    assert "manylinux2014_x86_64" in args and "manylinux1_x86_64" in args
    assert platform_args("", "aarch64") == ["--platform", "linux_aarch64"]  # musl: plain linux wheels only


def test_apt_without_root_or_subordinate_ids_says_what_needs_root_and_the_rootless_ways(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_smolvm import ImageError
    from pytest_smolvm.images import build

    monkeypatch.setattr(build.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(build, "missing_tools", list)
    monkeypatch.setattr(build, "unshare_problem", lambda: "/etc/subuid gives me no subordinate ids")
    with pytest.raises(ImageError) as err:
        build.build(Recipe(name="ds.base", packages=(*DEFAULT_PACKAGES, "jq")))
    msg = str(err.value)
    assert "image 'ds.base' needs root (mmdebstrap's root mode)" in msg
    assert "mmdebstrap --mode=unshare, which cannot run here: /etc/subuid gives me no subordinate ids" in msg
    assert "usermod --add-subuids" in msg and "image import oci:DIR:TAG" in msg


def test_unshare_needs_subordinate_ids(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pytest_smolvm.images import build

    monkeypatch.setattr(build.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(build, "_user", lambda: "alice")
    real = Path.read_text

    def fake(path: Path, *a: object, **k: object) -> str:
        if str(path) == "/etc/subuid":
            return "bob:100000:65536\n"
        if str(path) == "/etc/subgid":
            return "alice:100000:65536\n"
        return real(path)
    monkeypatch.setattr(build.Path, "read_text", fake)
    assert build.unshare_problem() == "/etc/subuid gives alice no subordinate ids"


@pytest.mark.parametrize("answer", [
    "not json", "[]", '{"python": "3.11"}',
    '{"python": "3.11 --index-url=http://evil", "libc": "glibc 2.36", "machine": "x86_64"}',
    '{"python": "3.11", "libc": "glibc 2.36\\u001b[2J", "machine": "x86_64"}',
    '{"python": "3.11", "libc": "glibc 2.36", "machine": "x86_64 --extra"}',
])
def test_a_lying_guest_probe_is_refused(project: Path, answer: str) -> None:
    from pytest_smolvm import ImageError
    from pytest_smolvm.images.provision import parse_probe

    decl = dcl.load(write(project, "[tool.smolvm.images.p]\npip = ['six']\n"))["p"]
    with pytest.raises(ImageError, match=r"images\.p\] pip in .*: the image.s python3 described") as err:
        parse_probe(answer, decl)
    assert "\x1b" not in str(err.value)
    assert parse_probe('{"python": "3.12", "libc": "", "machine": "aarch64"}', decl)["machine"] == "aarch64"
