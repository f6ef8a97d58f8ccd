"""Unit tests of pytest_smolvm.settings: session layers, network ceiling."""

from __future__ import annotations

import pytest

from pytest_smolvm.config import VMConfig, config_from_layers
from pytest_smolvm.errors import ConfigError
from pytest_smolvm.settings import OPTIONS, exceeds_ceiling, network_ceiling, session_layers


def build(cli: dict[str, object] | None = None, env: dict[str, str] | None = None,
          ini: dict[str, object] | None = None) -> VMConfig:
    return config_from_layers(session_layers(cli or {}, env or {}, ini or {}))


# ---------------------------------------------------------------- precedence


def test_cli_beats_env_beats_ini() -> None:
    cfg = build(cli={"vcpus": "4"}, env={"SMOLVM_VCPUS": "3"}, ini={"vcpus": "2"})
    assert cfg.vcpus == 4


def test_env_beats_ini() -> None:
    cfg = build(env={"SMOLVM_VCPUS": "3"}, ini={"vcpus": "2"})
    assert cfg.vcpus == 3


def test_ini_beats_default() -> None:
    cfg = build(ini={"vcpus": "2", "memory_mib": "512"})
    assert (cfg.vcpus, cfg.memory_mib) == (2, 512)


def test_each_field_from_the_best_layer() -> None:
    cfg = build(
        cli={"image": "cliimg"},
        env={"SMOLVM_MEMORY_MIB": "384", "SMOLVM_IMAGE": "envimg"},
        ini={"memory_mib": "512", "accel": "tcg", "image": "iniimg"},
    )
    assert cfg.image == "cliimg"
    assert cfg.memory_mib == 384
    assert cfg.accel == "tcg"


@pytest.mark.parametrize("empty", [None, ""])
def test_empty_values_are_ignored(empty: object) -> None:
    cfg = build(cli={"vcpus": empty}, env={"SMOLVM_VCPUS": "3"}, ini={"vcpus": "2"})
    assert cfg.vcpus == 3
    cfg = build(cli={"vcpus": empty}, env={"SMOLVM_VCPUS": ""}, ini={"vcpus": "2"})
    assert cfg.vcpus == 2
    assert session_layers({"vcpus": empty}, {"SMOLVM_VCPUS": ""}, {"vcpus": empty}) == []


def test_unrelated_environment_is_ignored() -> None:
    layers = session_layers({}, {"PATH": "/bin", "HOME": "/root", "vcpus": "9"}, {})
    assert layers == []


def test_layers_are_lowest_precedence_first() -> None:
    layers = session_layers({"vcpus": "4"}, {"SMOLVM_VCPUS": "3"}, {"vcpus": "2"})
    sources = [src for src, _ in layers]
    assert sources == ["ini option smolvm_vcpus", "environment variable SMOLVM_VCPUS",
                       "command line --smolvm-vcpus"]
    assert [vals["vcpus"] for _, vals in layers] == [2, 3, 4]  # validated and converted


def test_every_option_is_readable_from_env() -> None:
    good = {"network": "isolated", "vcpus": "2", "memory_mib": "300", "accel": "tcg",
            "backend": "qemu", "image": "other", "snapshot": "false", "lifetime": "60", "uplink": "inet0",
            "dns_upstream": "192.0.2.53, 192.0.2.54:5353"}
    assert {o.field for o in OPTIONS} == set(good)
    env = {o.env: good[o.field] for o in OPTIONS}
    cfg = build(env=env)
    assert (cfg.network, cfg.vcpus, cfg.memory_mib, cfg.accel, cfg.backend, cfg.image, cfg.snapshot,
            cfg.lifetime, cfg.uplink) == ("isolated", 2, 300, "tcg", "qemu", "other", False, 60.0, "inet0")
    assert cfg.dns_upstream == ("192.0.2.53:53", "192.0.2.54:5353")


# ---------------------------------------------------------------- errors name their source


def test_bad_env_value_names_variable() -> None:
    with pytest.raises(ConfigError) as info:
        session_layers({}, {"SMOLVM_VCPUS": "zero"}, {})
    msg = str(info.value)
    assert "environment variable SMOLVM_VCPUS" in msg
    assert "'zero'" in msg


def test_bad_ini_value_names_option() -> None:
    with pytest.raises(ConfigError) as info:
        session_layers({}, {}, {"vcpus": "0"})
    msg = str(info.value)
    assert "ini option smolvm_vcpus" in msg
    assert "vcpus=0" in msg


def test_bad_cli_value_names_flag() -> None:
    with pytest.raises(ConfigError) as info:
        session_layers({"vcpus": "-3"}, {}, {})
    msg = str(info.value)
    assert "--smolvm-vcpus" in msg
    assert "vcpus=-3" in msg


def test_bad_value_reported_even_if_overridden() -> None:
    # A broken lower layer is an error, not silently shadowed.
    with pytest.raises(ConfigError, match="SMOLVM_MEMORY_MIB"):
        session_layers({"memory_mib": "512"}, {"SMOLVM_MEMORY_MIB": "1"}, {})


def test_bad_network_from_env() -> None:
    with pytest.raises(ConfigError, match="environment variable SMOLVM_NETWORK"):
        session_layers({}, {"SMOLVM_NETWORK": "wifi"}, {})


# ---------------------------------------------------------------- network ceiling


def test_ceiling_from_cli() -> None:
    layers = session_layers({"network": "isolated"}, {}, {})
    assert network_ceiling(layers) == ("isolated", "command line --smolvm-network")


def test_ceiling_from_env() -> None:
    layers = session_layers({}, {"SMOLVM_NETWORK": "NAT"}, {})
    assert network_ceiling(layers) == ("nat", "environment variable SMOLVM_NETWORK")


def test_ceiling_cli_beats_env() -> None:
    layers = session_layers({"network": "none"}, {"SMOLVM_NETWORK": "nat"}, {"network": "isolated"})
    assert network_ceiling(layers) == ("none", "command line --smolvm-network")


def test_ceiling_never_from_ini() -> None:
    layers = session_layers({}, {}, {"network": "isolated"})
    assert network_ceiling(layers) is None
    # ... but ini still sets the default policy.
    assert config_from_layers(layers).network == "isolated"


def test_ceiling_env_wins_over_ini() -> None:
    layers = session_layers({}, {"SMOLVM_NETWORK": "isolated"}, {"network": "none"})
    assert network_ceiling(layers) == ("isolated", "environment variable SMOLVM_NETWORK")


def test_no_ceiling_without_network_option() -> None:
    assert network_ceiling(session_layers({"vcpus": "2"}, {"SMOLVM_IMAGE": "x"}, {})) is None


# ---------------------------------------------------------------- exceeds_ceiling


def test_exceeds_no_ceiling() -> None:
    assert exceeds_ceiling("nat", (), None) is None


@pytest.mark.parametrize(
    ("network", "allow", "cap"),
    [
        ("none", (), "none"),
        ("none", (), "isolated"),
        ("isolated", (), "isolated"),
        ("isolated", (), "nat"),
        ("nat", ("198.51.100.0/24",), "nat"),
        ("nat", (), "nat"),
    ],
)
def test_within_ceiling(network: str, allow: tuple[str, ...], cap: str) -> None:
    assert exceeds_ceiling(network, allow, (cap, "command line --smolvm-network")) is None


@pytest.mark.parametrize(
    ("network", "allow", "cap"),
    [
        ("isolated", (), "none"),
        ("nat", (), "none"),
        ("nat", (), "isolated"),
        ("nat", ("198.51.100.0/24",), "isolated"),
        ("nat", ("198.51.100.0/24",), "none"),
    ],
)
def test_above_ceiling(network: str, allow: tuple[str, ...], cap: str) -> None:
    source = "environment variable SMOLVM_NETWORK"
    reason = exceeds_ceiling(network, allow, (cap, source))
    assert reason is not None
    assert repr(network) in reason
    assert repr(cap) in reason
    assert source in reason
    for cidr in allow:
        assert cidr in reason


def test_nat_with_allow_is_below_plain_nat() -> None:
    # A ceiling can only be a policy, never "nat with allow", so nat+allow fits under nat,
    # while plain nat does not fit under anything lower.
    assert exceeds_ceiling("nat", ("10.0.0.0/8",), ("nat", "cli")) is None
    assert exceeds_ceiling("nat", (), ("isolated", "cli")) is not None
    assert exceeds_ceiling("nat", ("10.0.0.0/8",), ("isolated", "cli")) is not None


def test_ceiling_end_to_end_from_layers() -> None:
    layers = session_layers({}, {"SMOLVM_NETWORK": "isolated"}, {})
    ceiling = network_ceiling(layers)
    assert exceeds_ceiling("isolated", (), ceiling) is None
    reason = exceeds_ceiling("nat", (), ceiling)
    assert reason is not None
    assert "SMOLVM_NETWORK" in reason


def test_pool_size_follows_the_same_precedence_and_names_its_source() -> None:
    from pytest_smolvm.settings import pool_size

    assert pool_size({}, {}, {}) == 1
    assert pool_size({}, {}, {"pool": "3"}) == 3
    assert pool_size({}, {"SMOLVM_POOL": "2"}, {"pool": "3"}) == 2
    assert pool_size({"pool": "0"}, {"SMOLVM_POOL": "2"}, {"pool": "3"}) == 0
    with pytest.raises(ConfigError, match=r"invalid pool size '-1' \(from environment variable SMOLVM_POOL\)"):
        pool_size({}, {"SMOLVM_POOL": "-1"}, {})
    with pytest.raises(ConfigError, match="command line --smolvm-pool"):
        pool_size({"pool": "many"}, {}, {})
