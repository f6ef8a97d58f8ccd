"""``image build --print-digest``: the CI cache key, computed without building anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_smolvm import cli
from pytest_smolvm.images import build as build_mod
from pytest_smolvm.images.declared import key, load
from pytest_smolvm.images.provision import base_id
from pytest_smolvm.images.recipe import DEFAULT_PACKAGES, Recipe, arm64_recipe


@pytest.fixture(autouse=True)
def no_build(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("--print-digest must not build")

    monkeypatch.setattr(build_mod, "build", refuse)


def digest_of(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert cli.main(["image", "build", "--print-digest", *argv]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1, out
    return out.strip()


def test_default_is_the_default_recipes_digest(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    got = digest_of(capsys)
    assert got == Recipe().digest()
    assert len(got) == 16 and int(got, 16) >= 0


def test_include_and_arch_change_the_digest(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    custom = digest_of(capsys, "--name", "tools", "--include", "jq,curl")
    assert custom == Recipe(name="tools", packages=(*DEFAULT_PACKAGES, "jq", "curl")).digest()
    assert custom != Recipe().digest()
    assert digest_of(capsys, "--arch", "arm64") == arm64_recipe("default-arm64", packages=DEFAULT_PACKAGES).digest()


def test_declared_image_digest_follows_its_content(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("one\n")
    (tmp_path / "pyproject.toml").write_text(
        '[tool.smolvm.images.ds]\nfrom = "default"\nfiles = { "/opt/data" = "data" }\nrun = ["true"]\n')
    monkeypatch.chdir(tmp_path)
    first = digest_of(capsys, "--name", "ds")
    decl = load(tmp_path / "pyproject.toml")["ds"]
    assert first == key(decl, base_id(decl))
    (tmp_path / "data" / "a.txt").write_text("two\n")   # a changed data file is a new image
    assert digest_of(capsys, "--name", "ds") != first


def test_module_entry_point_prints_it_without_touching_the_cache() -> None:
    # CI computes the key as a user who cannot even create the (root's) cache directory.
    env = {**os.environ, "SMOLVM_CACHE_DIR": "/proc/no-such-cache"}
    res = subprocess.run([sys.executable, "-m", "pytest_smolvm", "image", "build", "--print-digest"],
                         capture_output=True, text=True, timeout=60, check=True, cwd="/", env=env)
    assert res.stdout.strip() == Recipe().digest()
