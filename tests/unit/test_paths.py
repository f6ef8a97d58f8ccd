"""paths.runtime_dir(): a verified, private runtime directory (real directories, real owners)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pytest_smolvm.errors import ConfigError
from pytest_smolvm.paths import runtime_dir

NOBODY = 65534


@pytest.fixture
def rt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "rt"
    monkeypatch.setenv("SMOLVM_RUNTIME_DIR", str(path))
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_created_private_and_owned_by_us(rt: Path) -> None:
    assert runtime_dir() == rt
    st = os.lstat(rt)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
    assert mode(rt) == 0o700


def test_default_is_per_uid_in_tmp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SMOLVM_RUNTIME_DIR", raising=False)
    path = runtime_dir()
    assert path == Path(f"/tmp/smolvm-{os.getuid()}")
    assert mode(path) == 0o700 and os.lstat(path).st_uid == os.getuid()


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another user needs root")
def test_dir_of_another_user_is_refused_and_untouched(rt: Path) -> None:
    rt.mkdir(mode=0o755)
    os.chown(rt, NOBODY, NOBODY)
    with pytest.raises(ConfigError) as info:
        runtime_dir()
    msg = str(info.value)
    assert str(rt) in msg and f"uid {NOBODY}" in msg and "SMOLVM_RUNTIME_DIR" in msg
    assert list(rt.iterdir()) == [] and mode(rt) == 0o755 and os.lstat(rt).st_uid == NOBODY


def test_symlink_is_refused_and_target_untouched(rt: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o755)
    rt.symlink_to(target)
    with pytest.raises(ConfigError) as info:
        runtime_dir()
    assert str(rt) in str(info.value) and "symlink" in str(info.value)
    assert list(target.iterdir()) == [] and mode(target) == 0o755


@pytest.mark.parametrize("bad_mode", [0o777, 0o770, 0o1777])
def test_group_or_world_writable_is_refused(rt: Path, bad_mode: int) -> None:
    rt.mkdir()
    os.chmod(rt, bad_mode)
    with pytest.raises(ConfigError) as info:
        runtime_dir()
    assert str(rt) in str(info.value) and "writable" in str(info.value)
    assert mode(rt) == bad_mode


def test_a_file_in_its_place_is_refused(rt: Path) -> None:
    rt.write_text("not a directory")
    with pytest.raises(ConfigError, match="not a directory"):
        runtime_dir()


def test_own_readable_dir_is_tightened(rt: Path) -> None:
    rt.mkdir(mode=0o755)   # what older versions created
    os.chmod(rt, 0o755)
    assert runtime_dir() == rt
    assert mode(rt) == 0o700


def test_parent_writable_by_others_without_sticky_bit_is_refused(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    parent = tmp_path / "open"
    parent.mkdir()
    os.chmod(parent, 0o777)
    monkeypatch.setenv("SMOLVM_RUNTIME_DIR", str(parent / "rt"))
    with pytest.raises(ConfigError, match="replace"):
        runtime_dir()
    assert not (parent / "rt").exists()
    os.chmod(parent, 0o1777)   # like /tmp: others cannot rename what is ours
    assert mode(runtime_dir()) == 0o700


def test_relative_env_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SMOLVM_RUNTIME_DIR", "rel-rt")
    assert runtime_dir() == tmp_path / "rel-rt"


# Found by review after the first round: only the direct parent was checked, and only its
# mode, so a parent (or any directory above) owned by another user, or reached through their
# symlink, let them swap the runtime directory for a link after the check.


@pytest.mark.parametrize("planted", ["ancestor", "symlinked-ancestor"])
def test_a_path_through_another_users_directory_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           planted: str) -> None:
    theirs = tmp_path / "theirs"
    (theirs / "evil").mkdir(parents=True)
    os.chown(theirs, NOBODY, NOBODY)        # mode 0755: not writable by others, but theirs
    base = theirs
    if planted == "symlinked-ancestor":
        base = tmp_path / "link"
        base.symlink_to(theirs)
    monkeypatch.setenv("SMOLVM_RUNTIME_DIR", str(base / "evil" / "rt"))
    with pytest.raises(ConfigError, match="belongs to uid 65534"):
        runtime_dir()
    assert not (theirs / "evil" / "rt").exists()


def test_symlinked_ancestors_of_our_own_are_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    monkeypatch.setenv("SMOLVM_RUNTIME_DIR", str(tmp_path / "alias" / "rt"))
    assert runtime_dir() == tmp_path / "real" / "rt"


def test_cache_dir_is_held_to_the_same_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_smolvm.paths import cache_dir

    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache" and mode(tmp_path / "cache") == 0o700
    os.chmod(tmp_path / "cache", 0o775)
    with pytest.raises(ConfigError, match=r"cache directory .* writable by group or others"):
        cache_dir()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(theirs))
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        cache_dir()
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(theirs / "sub"))
    with pytest.raises(ConfigError, match="belongs to uid 65534"):
        cache_dir()
