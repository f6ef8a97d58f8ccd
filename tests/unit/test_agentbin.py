"""The builder of the static guest agent (pytest_smolvm.images.agentbin): a real musl-gcc
compile, keyed by content, published atomically, failing with errors that say what to do."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pytest_smolvm.errors import ImageError
from pytest_smolvm.images import agentbin

PT_INTERP, PT_DYNAMIC = 3, 2


def segment_types(elf: bytes) -> set[int]:
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    return {struct.unpack_from("<I", elf, phoff + i * phentsize)[0] for i in range(phnum)}


def test_digest_follows_source_and_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    before = agentbin.agent_digest()
    source = agentbin.agent_source()
    monkeypatch.setattr(agentbin, "agent_source", lambda: source + b"\n/* changed */\n")
    changed = agentbin.agent_digest()
    assert changed != before
    monkeypatch.setattr(agentbin, "compiler_version", lambda compiler="": "musl-gcc (other) 99.0")
    assert agentbin.agent_digest() not in (before, changed)


def test_binary_is_built_once_static_and_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(tmp_path / "cache"))
    first = agentbin.agent_binary()
    assert first.name == f"smolvm-agent-{agentbin.agent_digest()}"
    assert first.stat().st_mode & 0o111
    elf = first.read_bytes()
    assert elf[:4] == b"\x7fELF"
    assert not segment_types(elf) & {PT_INTERP, PT_DYNAMIC}, "not a static binary"
    assert len(elf) < 512 * 1024
    stamp = first.stat().st_mtime_ns
    assert agentbin.agent_binary() == first and first.stat().st_mtime_ns == stamp  # cached, not rebuilt
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary left behind


def test_compile_error_is_an_image_error_with_the_compiler_output(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agentbin, "agent_source", lambda: b"int main(void) { int unused; return 0; }\n")
    target = tmp_path / "out" / "agent"
    with pytest.raises(ImageError, match="unused") as info:  # -Werror: a warning fails the build
        agentbin.compile_agent(target)
    assert "compiling the guest agent" in str(info.value)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_missing_compiler_says_how_to_install_it(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="musl-tools") as info:
        agentbin.compile_agent(tmp_path / "agent", compiler="smolvm-no-such-cc")
    assert "smolvm-no-such-cc" in str(info.value)
    with pytest.raises(ImageError, match="apt-get install musl-tools"):
        agentbin.compiler_version("smolvm-no-such-cc")


def test_prune_keeps_only_this_versions_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(tmp_path / "cache"))
    current = agentbin.agent_binary()
    old = current.with_name("smolvm-agent-0123456789abcdef")
    old.write_bytes(b"old")
    other = current.with_name("unrelated")
    other.write_bytes(b"x")
    assert agentbin.prune_binaries(dry_run=True) == 1 and old.exists()
    assert agentbin.prune_binaries() == 1
    assert sorted(p.name for p in current.parent.iterdir()) == sorted([current.name, "unrelated"])


def test_another_architecture_is_refused_clearly() -> None:
    other = "arm64" if agentbin.platform.machine() == "x86_64" else "amd64"
    with pytest.raises(ImageError, match=f"an {other} image needs it built on an {other} host"):
        agentbin.agent_binary(other)
