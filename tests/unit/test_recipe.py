"""Unit tests of pytest_smolvm.images.recipe: digests, JSON form, stage-1 init script."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pytest_smolvm.images import recipe as recipe_mod
from pytest_smolvm.images.recipe import (
    BOOT_MODULES,
    DEFAULT_PACKAGES,
    NET_MODULES,
    Recipe,
    agent_sources,
    boot_digest,
    stage1_init,
)

# ---------------------------------------------------------------- digest


def test_digest_is_stable() -> None:
    assert Recipe().digest() == Recipe().digest()
    r = Recipe(packages=("a", "b"))
    assert r.digest() == r.digest()
    assert re.fullmatch(r"[0-9a-f]{16}", r.digest())


@pytest.mark.parametrize(
    "change",
    [
        {"packages": (*DEFAULT_PACKAGES, "git")},
        {"packages": DEFAULT_PACKAGES[:-1]},
        {"packages": tuple(reversed(DEFAULT_PACKAGES))},
        {"suite": "trixie"},
        {"kernel_package": "linux-image-amd64"},
        {"rootfs_mib": 2048},
    ],
    ids=["pkg-added", "pkg-removed", "pkg-reordered", "suite", "kernel", "size"],
)
def test_digest_changes_with_content(change: dict[str, object]) -> None:
    assert Recipe(**change).digest() != Recipe().digest()  # type: ignore[arg-type]


def test_digest_ignores_name() -> None:
    assert Recipe(name="other").digest() == Recipe().digest()
    assert Recipe(name="x", rootfs_mib=2048).digest() == Recipe(name="y", rootfs_mib=2048).digest()


def test_digest_changes_with_builder_version(monkeypatch: pytest.MonkeyPatch) -> None:
    before = Recipe().digest()
    monkeypatch.setattr(recipe_mod, "BUILDER_VERSION", recipe_mod.BUILDER_VERSION + 1)
    assert Recipe().digest() != before


def test_digest_list_and_tuple_packages_agree() -> None:
    # A recipe read back from JSON (lists) must name the same image as the original (tuples).
    as_list = Recipe(packages=list(DEFAULT_PACKAGES))  # type: ignore[arg-type]
    assert as_list.digest() == Recipe().digest()


# ---------------------------------------------------------------- JSON


def test_json_round_trip_through_text() -> None:
    r = Recipe(name="dev", suite="trixie", kernel_package="k", packages=("python3", "git"), rootfs_mib=3000)
    text = json.dumps(r.to_json())
    back = Recipe.from_json(json.loads(text))
    assert back == r
    assert isinstance(back.packages, tuple)
    assert back.digest() == r.digest()


def test_to_json_has_every_field() -> None:
    data = Recipe().to_json()
    assert set(data) == {f.name for f in dataclasses.fields(Recipe)}


def test_from_json_ignores_unknown_and_defaults_missing() -> None:
    back = Recipe.from_json({"name": "n", "rootfs_mib": 512, "built_by": "someone else"})
    assert back == Recipe(name="n", rootfs_mib=512)


# ---------------------------------------------------------------- boot layer digest


def test_boot_digest_stable() -> None:
    assert boot_digest() == boot_digest()
    assert re.fullmatch(r"[0-9a-f]{16}", boot_digest())


def test_boot_digest_follows_agent_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    real = agent_sources()
    before = boot_digest()
    changed = dict(real)
    changed["agent.c"] = real["agent.c"] + b"\n/* changed */\n"
    monkeypatch.setattr(recipe_mod, "agent_sources", lambda: changed)
    after = boot_digest()
    assert after != before
    added = {**real, "extra.py": b"x = 1\n"}
    monkeypatch.setattr(recipe_mod, "agent_sources", lambda: added)
    assert boot_digest() not in (before, after)
    monkeypatch.setattr(recipe_mod, "agent_sources", lambda: dict(real))
    assert boot_digest() == before


def test_boot_digest_distinguishes_file_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recipe_mod, "agent_sources", lambda: {"a": b"xy", "b": b"z"})
    one = boot_digest()
    monkeypatch.setattr(recipe_mod, "agent_sources", lambda: {"a": b"x", "b": b"yz"})
    assert boot_digest() != one


def test_boot_digest_follows_stage1(monkeypatch: pytest.MonkeyPatch) -> None:
    before = boot_digest()
    monkeypatch.setattr(recipe_mod, "STAGE1_INIT", recipe_mod.STAGE1_INIT + "# changed\n")
    assert boot_digest() != before


def test_agent_sources_are_the_package_files() -> None:
    sources = agent_sources()
    pkg = Path(recipe_mod.__file__).parent.parent / "guest"
    assert sorted(sources) == ["agent.c", "init.sh"]
    assert sources["agent.c"] == (pkg / "agent.c").read_bytes()
    assert recipe_mod.AGENT_PATH.encode() in sources["init.sh"]


def test_boot_digest_follows_compiler_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_smolvm.images import agentbin

    before = boot_digest()
    monkeypatch.setattr(agentbin, "CFLAGS", (*agentbin.CFLAGS, "-O0"))
    assert boot_digest() != before


# ---------------------------------------------------------------- stage 1 init


def _module_loop_words(script: str) -> list[str]:
    m = re.search(r"^for m in ([^;]*); do$", script, re.M)
    assert m, "no boot module loop"
    return m.group(1).split()


def _net_branch(script: str) -> str:
    m = re.search(r'\*" smolvm\.net=1 "\*\)(.*?)\besac\b', script, re.S)
    assert m, "no smolvm.net=1 branch"
    return m.group(1)


def test_stage1_has_no_placeholders() -> None:
    script = stage1_init().decode()
    assert "__MODULES__" not in script
    assert "__NET_MODULES__" not in script
    assert script.startswith("#!/bin/sh\n")


def test_stage1_boot_modules_in_order() -> None:
    assert _module_loop_words(stage1_init().decode()) == list(BOOT_MODULES)


def test_stage1_net_modules_only_in_net_branch() -> None:
    script = stage1_init().decode()
    branch = _net_branch(script)
    m = re.search(r"for m in ([^;]*);", branch)
    assert m
    assert m.group(1).split() == list(NET_MODULES)
    # Outside the branch no net module is named as a word.
    outside = script.replace(branch, "")
    words = set(re.findall(r"[A-Za-z0-9_]+", outside))
    assert not words & set(NET_MODULES)


def _run_module_section(cmdline: str) -> list[str]:
    """Run the module-loading part of stage 1 in a real shell with insmod stubbed out."""
    script = stage1_init().decode()
    start = script.index('cmdline=" $(cat /proc/cmdline) "')
    end = script.index("i=0\n")
    section = script[start:end].replace('cmdline=" $(cat /proc/cmdline) "', f'cmdline=" {cmdline} "')
    section = section.replace('case "$cmdline" in *" smolvm.canary=1 "*)',
                              'case "$cmdline" in *" smolvm.canary=1 "*) echo CANARY; exit 0;')
    prog = 'insmod() { echo "$1"; }\npoweroff() { exit 0; }\n' + section
    res = subprocess.run(["/bin/sh", "-c", prog], capture_output=True, text=True, timeout=10)
    assert res.returncode == 0, res.stderr
    return [line.rsplit("/", 1)[-1].removesuffix(".ko") for line in res.stdout.splitlines()]


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell")
def test_stage1_loads_modules_in_a_real_shell() -> None:
    assert _run_module_section("console=ttyS0 quiet") == list(BOOT_MODULES)
    assert _run_module_section("console=ttyS0 smolvm.net=1 quiet") == list(BOOT_MODULES + NET_MODULES)
    # The flag is matched as a whole word, not as a prefix.
    assert _run_module_section("console=ttyS0 smolvm.net=10") == list(BOOT_MODULES)
    assert _run_module_section("smolvm.net=1") == list(BOOT_MODULES + NET_MODULES)


def test_init_scripts_are_valid_shell() -> None:
    """A syntax error in an init script panics every guest at boot: check them with sh -n."""
    import shutil
    import subprocess

    from pytest_smolvm.images.recipe import STAGE2_INIT, stage1_init

    sh = shutil.which("busybox") or shutil.which("dash") or "/bin/sh"
    args = [sh, "sh", "-n"] if sh.endswith("busybox") else [sh, "-n"]
    for script in (stage1_init().decode(), STAGE2_INIT):
        res = subprocess.run(args, input=script, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr


#: The nftables expressions the network layer writes, and the module each needs when the
#: kernel builds it as a module (Debian's cloud kernel does): L1 of the nested KVM stage
#: loads exactly KVM_HOST_MODULES, so a new expression without its module fails only there.
_EXPRESSION_MODULES = {
    " redirect to ": "nft_redir", " masquerade": "nft_masq", "limit name ": "nft_limit",
    "ct count ": "nft_connlimit", " fib ": "nft_fib_inet", "counter name ": "nft_objref",
    "ct state ": "nft_ct", " reject": "nft_reject_inet", " dnat ": "nft_nat", " snat ": "nft_nat",
    " quota ": "nft_quota", " tproxy ": "nft_tproxy", " numgen ": "nft_numgen", " jhash ": "nft_hash",
}


def test_kvm_host_image_loads_a_module_for_every_nft_expression_the_network_layer_writes() -> None:
    import ipaddress

    from pytest_smolvm.images.recipe import KVM_HOST_MODULES
    from pytest_smolvm.network import policy

    written = policy.run_ruleset(ipaddress.IPv4Network("10.200.0.0/16")) + policy.uplink_ruleset(
        "t", "veth0", ipaddress.IPv4Address("10.255.0.2"))
    needed = {module for expression, module in _EXPRESSION_MODULES.items() if expression in written}
    assert {"nft_redir", "nft_masq", "nft_ct"} <= needed  # the table above still matches the rules
    assert needed - set(KVM_HOST_MODULES) == set()
