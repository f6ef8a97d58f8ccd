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


def other_arch() -> str:
    return "arm64" if agentbin.host_arch() == "amd64" else "amd64"


def test_without_a_cross_compiler_the_error_names_both_fixes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 22, bug 4: agent_binary("arm64") refused on amd64 ("cross-compiling is not
    supported"); now it cross-compiles, and only without any cross compiler says how to get one."""
    monkeypatch.setattr(agentbin.shutil, "which", lambda _name: None)
    monkeypatch.setattr(agentbin.importlib.util, "find_spec", lambda _name: None)
    other = other_arch()
    with pytest.raises(ImageError, match=f"cannot build the {other} guest agent") as info:
        agentbin.agent_binary(other)
    assert f"musl-dev:{other}" in str(info.value) and "pip install ziglang" in str(info.value)


def test_bad_toolchain_setting_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(agentbin.TOOLCHAIN_ENV, "clang")
    with pytest.raises(ImageError, match=r"invalid SMOLVM_AGENT_TOOLCHAIN='clang' \(from the environment\)"):
        agentbin.toolchain("arm64")
    with pytest.raises(ImageError, match="invalid guest architecture 'riscv64'"):
        agentbin.toolchain("riscv64")


def elf_machine(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[18:20], "little")


@pytest.mark.parametrize("kind", ["gcc-cross", "zig"])
def test_cross_compiles_a_static_agent_for_the_other_architecture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   kind: str) -> None:
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(agentbin.TOOLCHAIN_ENV, kind)
    other = other_arch()
    try:
        tc = agentbin.toolchain(other)
    except ImageError as exc:
        pytest.skip(f"no {kind} toolchain here: {exc}")
    binary = agentbin.agent_binary(other)
    assert elf_machine(binary) == {"amd64": 0x3E, "arm64": 0xB7}[other]
    assert not segment_types(binary.read_bytes()) & {PT_INTERP, PT_DYNAMIC}, "not a static binary"
    assert binary.name == f"smolvm-agent-{agentbin.agent_digest(other)}"
    assert tc.kind in tc.identity() and other in tc.identity()


def test_the_toolchain_is_part_of_the_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's key and, for a cross-built agent, the boot layer's: a new compiler gives new ones."""
    from pytest_smolvm.images.recipe import boot_digest

    assert agentbin.boot_key() == "" and boot_digest(agentbin.boot_key()) == boot_digest()
    fake = agentbin.Toolchain("zig", "arm64", ("zig", "cc"), ("-target", "aarch64-linux-musl"))
    monkeypatch.setattr(agentbin, "toolchain", lambda arch=None: fake)
    monkeypatch.setattr(agentbin, "_version_line", lambda command: "0.17.1")
    zig = agentbin.boot_key("arm64")
    assert "zig" in zig and "0.17.1" in zig
    monkeypatch.setattr(agentbin, "_version_line", lambda command: "0.18.0")
    assert agentbin.boot_key("arm64") != zig
    assert boot_digest(agentbin.boot_key("arm64")) not in (boot_digest(zig), boot_digest())
    digest = agentbin.agent_digest("arm64")
    monkeypatch.setattr(agentbin, "_version_line", lambda command: "0.17.1")
    assert agentbin.agent_digest("arm64") != digest
