"""Unit tests of pytest_smolvm.config: VMConfig validation, replace(), layers."""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping

import pytest

from pytest_smolvm.config import (
    FIELD_NAMES,
    VMConfig,
    check_field,
    config_from_layers,
    network_rank,
)
from pytest_smolvm.errors import ConfigError, SmolVMError

# ---------------------------------------------------------------- defaults


def test_defaults_are_valid_and_conservative() -> None:
    cfg = VMConfig()
    # Validation is idempotent on the defaults: re-checking every field changes nothing.
    for f in dataclasses.fields(cfg):
        assert check_field(f.name, getattr(cfg, f.name)) == getattr(cfg, f.name), f.name
    # The safe choices: no network, no allow-list, a private disk, empty env.
    assert cfg.network == "none"
    assert cfg.allow == ()
    assert cfg.disk_mode == "isolated"
    assert dict(cfg.env) == {}
    assert cfg.aslr is None
    assert cfg.retain_disk_on_delete is False
    assert cfg.vcpus >= 1
    assert cfg.timeout > 0
    assert math.isfinite(cfg.boot_timeout)


def test_config_is_frozen() -> None:
    cfg = VMConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.vcpus = 4  # type: ignore[misc]


def test_config_error_is_a_value_error_and_smolvm_error() -> None:
    with pytest.raises(ValueError, match="vcpus") as info:
        VMConfig(vcpus=0)
    assert isinstance(info.value, SmolVMError)


# ---------------------------------------------------------------- string coercion


@pytest.mark.parametrize(
    ("field", "raw", "expected"),
    [
        ("vcpus", "2", 2),
        ("vcpus", " 4 ", 4),
        ("memory_mib", "384", 384),
        ("memory_mib", 512, 512),
        ("disk_size_mib", "2048", 2048),
        ("disk_size_mib", None, None),
        ("timeout", "1.5", 1.5),
        ("timeout", "10", 10.0),
        ("timeout", 3, 3.0),
        ("boot_timeout", "120", 120.0),
        ("max_output", "1024", 1024),
        ("network", "NAT", "nat"),
        ("network", " isolated ", "isolated"),
        ("disk_mode", "Shared", "shared"),
        ("accel", "TCG", "tcg"),
        ("backend", "qemu", "qemu"),
        ("retain_disk_on_delete", "true", True),
        ("retain_disk_on_delete", "yes", True),
        ("retain_disk_on_delete", "1", True),
        ("retain_disk_on_delete", "false", False),
        ("retain_disk_on_delete", "off", False),
        ("aslr", "true", True),
        ("aslr", "0", False),
        ("aslr", None, None),
        ("image", "  myimage ", "myimage"),
    ],
)
def test_string_values_are_coerced(field: str, raw: object, expected: object) -> None:
    kwargs = {field: raw}
    cfg = VMConfig(**kwargs)  # type: ignore[arg-type]
    value = getattr(cfg, field)
    assert value == expected
    assert type(value) is type(expected)


def test_allow_string_is_split_and_normalised() -> None:
    cfg = VMConfig(network="nat", allow="198.51.100.7/24, 10.0.0.0/8  2001:db8::1/32")  # type: ignore[arg-type]
    assert cfg.allow == ("198.51.100.0/24", "10.0.0.0/8", "2001:db8::/32")


def test_allow_list_of_single_addresses() -> None:
    cfg = VMConfig(network="nat", allow=["192.0.2.1"])  # type: ignore[arg-type]
    assert cfg.allow == ("192.0.2.1/32",)


# ---------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("field", "bad", "shown"),
    [
        ("memory_mib", -1, "memory_mib=-1"),
        ("memory_mib", 127, "memory_mib=127"),
        ("memory_mib", "lots", "memory_mib='lots'"),
        ("vcpus", 0, "vcpus=0"),
        ("vcpus", True, "vcpus=True"),
        ("vcpus", False, "vcpus=False"),
        ("vcpus", "1.5", "vcpus='1.5'"),
        ("vcpus", 2.0, "vcpus=2.0"),
        ("vcpus", None, "vcpus=None"),
        ("disk_mode", "x", "disk_mode='x'"),
        ("disk_mode", 1, "disk_mode=1"),
        ("disk_size_mib", 10, "disk_size_mib=10"),
        ("network", "wifi", "network='wifi'"),
        ("timeout", 0, "timeout=0"),
        ("timeout", -2.5, "timeout=-2.5"),
        ("timeout", math.nan, "timeout=nan"),
        ("timeout", math.inf, "timeout=inf"),
        ("timeout", "nan", "timeout=nan"),
        ("timeout", "inf", "timeout=inf"),
        ("timeout", True, "timeout=True"),
        ("timeout", "soon", "timeout='soon'"),
        ("boot_timeout", 0.0, "boot_timeout=0.0"),
        ("accel", "xen", "accel='xen'"),
        ("backend", "vbox", "backend='vbox'"),
        ("max_output", 0, "max_output=0"),
        ("retain_disk_on_delete", "maybe", "retain_disk_on_delete='maybe'"),
        ("retain_disk_on_delete", 1, "retain_disk_on_delete=1"),
        ("aslr", "sometimes", "aslr='sometimes'"),
        ("image", "   ", "image='   '"),
        ("image", 5, "image=5"),
    ],
)
def test_bad_values_name_field_and_value(field: str, bad: object, shown: str) -> None:
    kwargs = {field: bad}
    with pytest.raises(ConfigError) as info:
        VMConfig(**kwargs)  # type: ignore[arg-type]
    assert shown in str(info.value)


def test_allow_bad_entry_names_item() -> None:
    with pytest.raises(ConfigError) as info:
        VMConfig(network="nat", allow=["not a cidr!"])  # type: ignore[arg-type]
    msg = str(info.value)
    assert "allow=" in msg
    assert "not a cidr!" in msg


def test_allow_not_a_list() -> None:
    with pytest.raises(ConfigError, match="allow=42"):
        VMConfig(network="nat", allow=42)  # type: ignore[arg-type]


@pytest.mark.parametrize("network", ["none", "isolated"])
def test_allow_requires_nat(network: str) -> None:
    with pytest.raises(ConfigError) as info:
        VMConfig(network=network, allow=["198.51.100.0/24"])  # type: ignore[arg-type]
    msg = str(info.value)
    assert "198.51.100.0/24" in msg
    assert repr(network) in msg
    assert "nat" in msg


def test_allow_empty_without_nat_is_fine() -> None:
    assert VMConfig(network="isolated", allow=[]).allow == ()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("env", "shown"),
    [
        ({"A": 1}, "int"),
        ({"A": None}, "NoneType"),
        ({"A=B": "x"}, "A=B"),
        ({"": "x"}, "''"),
        ({1: "x"}, "1"),
        ({"A": "x\0y"}, "'A'"),
        ("A=1", "str"),  # values (and what might be one) are never shown
        (["A", "1"], "list"),
    ],
)
def test_bad_env(env: object, shown: str) -> None:
    with pytest.raises(ConfigError) as info:
        VMConfig(env=env)  # type: ignore[arg-type]
    msg = str(info.value)
    assert "env" in msg
    assert shown in msg


# ---------------------------------------------------------------- env is frozen and copied


def test_env_is_read_only_mapping_proxy() -> None:
    cfg = VMConfig(env={"A": "1"})
    assert isinstance(cfg.env, Mapping) and repr(cfg.env) == "{'A': '***'}"
    with pytest.raises(TypeError):
        cfg.env["B"] = "2"  # type: ignore[index]
    assert dict(cfg.env) == {"A": "1"}


def test_env_is_copied_from_caller() -> None:
    mine = {"A": "1"}
    cfg = VMConfig(env=mine)
    mine["A"] = "changed"
    mine["B"] = "2"
    assert dict(cfg.env) == {"A": "1"}


def test_env_copied_from_mapping_proxy_too() -> None:
    backing = {"A": "1"}
    cfg = VMConfig(env=types.MappingProxyType(backing))
    backing["A"] = "changed"
    assert cfg.env["A"] == "1"


def test_replace_env_copies_too() -> None:
    mine = {"X": "y"}
    cfg = VMConfig().replace(env=mine)
    mine["X"] = "z"
    assert dict(cfg.env) == {"X": "y"}


# ---------------------------------------------------------------- replace


def test_replace_validates_and_coerces() -> None:
    base = VMConfig()
    new = base.replace(vcpus="2", memory_mib="384", network="nat")
    assert (new.vcpus, new.memory_mib, new.network) == (2, 384, "nat")
    # The original is untouched.
    assert (base.vcpus, base.network) == (VMConfig().vcpus, "none")


def test_replace_rejects_bad_value() -> None:
    with pytest.raises(ConfigError, match="vcpus=0"):
        VMConfig().replace(vcpus=0)


def test_replace_rejects_allow_without_nat() -> None:
    with pytest.raises(ConfigError, match="allow"):
        VMConfig().replace(allow=["198.51.100.0/24"])


def test_replace_rejects_unknown_fields() -> None:
    with pytest.raises(ConfigError) as info:
        VMConfig().replace(cpus=2, ram=3)
    msg = str(info.value)
    assert "cpus" in msg
    assert "ram" in msg


def test_configs_compare_by_value() -> None:
    assert VMConfig(vcpus="2", env={"A": "1"}) == VMConfig(vcpus=2, env={"A": "1"})
    assert VMConfig(vcpus=2) != VMConfig(vcpus=3)


# ---------------------------------------------------------------- network rank


def test_network_rank_ordering() -> None:
    none = VMConfig(network="none").network_rank
    isolated = VMConfig(network="isolated").network_rank
    nat_allow = VMConfig(network="nat", allow=["198.51.100.0/24"]).network_rank  # type: ignore[arg-type]
    nat = VMConfig(network="nat").network_rank
    assert none < isolated < nat_allow < nat


def test_network_rank_function_matches_property() -> None:
    assert network_rank("nat", ["10.0.0.0/8"]) == VMConfig(network="nat", allow=["10.0.0.0/8"]).network_rank  # type: ignore[arg-type]
    assert network_rank("nat") == VMConfig(network="nat").network_rank
    assert network_rank("nat", ()) > network_rank("nat", ("10.0.0.0/8",))


# ---------------------------------------------------------------- check_field


def test_check_field_unknown_lists_known() -> None:
    with pytest.raises(ConfigError) as info:
        check_field("colour", "red")
    msg = str(info.value)
    assert "'colour'" in msg
    assert "vcpus" in msg


def test_field_names_cover_dataclass() -> None:
    assert {f.name for f in dataclasses.fields(VMConfig)} == set(FIELD_NAMES)
    for name in FIELD_NAMES:  # every field is validated, none falls through to "unknown"
        check_field(name, getattr(VMConfig(), name))


@pytest.mark.parametrize(
    ("field", "raw", "expected"),
    [
        ("snapshot", "no", False),
        ("snapshot", True, True),
        ("lifetime", None, None),
        ("lifetime", "", None),
        ("lifetime", "none", None),
        ("lifetime", "2.5", 2.5),
        ("uplink", None, None),
        ("uplink", "root", None),
        ("uplink", " ROOT ", None),
        ("uplink", "", None),
        ("uplink", " ci-ns ", "ci-ns"),
        ("egress_kib_per_s", "512", 512),
        ("egress_conns_per_s", 5, 5),
    ],
)
def test_check_field_normalises(field: str, raw: object, expected: object) -> None:
    value = check_field(field, raw)
    assert value == expected
    assert type(value) is type(expected)


# One rejection per field, message in full: the text users see, whatever dispatches it.
@pytest.mark.parametrize(
    ("field", "bad", "message"),
    [
        ("vcpus", "x", "invalid vcpus='x': expected an integer"),
        ("memory_mib", 1, "invalid memory_mib=1: must be >= 128"),
        ("disk_mode", "x", "invalid disk_mode='x': expected one of isolated, shared"),
        ("disk_size_mib", 10, "invalid disk_size_mib=10: must be >= 64"),
        ("network", "wifi", "invalid network='wifi': expected one of none, isolated, nat"),
        ("allow", 42, "invalid allow=42: expected a list of CIDRs and DNS names such as "
                  "['198.51.100.0/24', 'pypi.org', '*.pythonhosted.org']"),
        ("image", "", "invalid image='': expected an image name (e.g. 'default') or a path to an image directory"),
        ("timeout", 0, "invalid timeout=0: must be > 0"),
        ("boot_timeout", "x", "invalid boot_timeout='x': expected a number of seconds"),
        ("env", [], "invalid env (a list, not shown: env values are secret): "
                    "expected a mapping of str to str such as {'TOKEN': '...'}"),
        ("accel", "xen", "invalid accel='xen': expected one of auto, kvm, hvf, tcg"),
        ("backend", "vbox", "invalid backend='vbox': expected one of auto, qemu, firecracker"),
        ("max_output", 0, "invalid max_output=0: must be >= 1"),
        ("retain_disk_on_delete", "maybe", "invalid retain_disk_on_delete='maybe': expected true or false"),
        ("aslr", "sometimes", "invalid aslr='sometimes': expected true or false"),
        ("snapshot", None, "invalid snapshot=None: expected true or false"),
        ("snapshot", "maybe", "invalid snapshot='maybe': expected true or false"),
        ("lifetime", 0, "invalid lifetime=0: must be > 0"),
        ("lifetime", "x", "invalid lifetime='x': expected a number of seconds"),
        ("uplink", "bad name!", "invalid uplink='bad name!': expected 'root' or the name of a network namespace "
                                "(ip netns list)"),
        ("uplink", 3, "invalid uplink=3: expected 'root' or the name of a network namespace (ip netns list)"),
        ("egress_kib_per_s", 0, "invalid egress_kib_per_s=0: must be >= 1"),
        ("egress_conns_per_s", "many", "invalid egress_conns_per_s='many': expected an integer"),
        ("dns_upstream", "resolver.example", "invalid dns_upstream entry 'resolver.example': expected an IPv4 "
                                             "address with an optional port, such as 192.0.2.53 or 192.0.2.53:5353"),
        ("dns_upstream", "192.0.2.1:0", "invalid dns_upstream entry '192.0.2.1:0': port 0 is out of range"),
        ("allow", ["a.*.example"], "invalid allow='a.*.example': not a network (198.51.100.0/24) or a DNS name "
                                   "(pypi.org, *.pythonhosted.org); a wildcard is allowed only as a leading '*.'"),
        ("allow", ["*.org"], "invalid allow='*.org': a wildcard must name a domain with a dot "
                             "('*.example.org', not '*.org')"),
        ("colour", "red", "unknown setting 'colour'; known: accel, allow, aslr, backend, boot_timeout, cpu, disk_mode, "
                          "disk_size_mib, dns_upstream, egress_conns_per_s, egress_kib_per_s, env, image, lifetime, "
                          "max_output, memory_mib, network, retain_disk_on_delete, secrets, snapshot, timeout, uplink, "
                          "vcpus, volumes"),
    ],
)
def test_check_field_messages(field: str, bad: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_field(field, bad)
    assert str(info.value) == message


# ---------------------------------------------------------------- layers


def test_layers_later_override_earlier() -> None:
    cfg = config_from_layers([
        ("ini", {"vcpus": "2", "memory_mib": "512"}),
        ("env", {"vcpus": "3"}),
        ("cli", {"vcpus": 4, "image": "custom"}),
    ])
    assert cfg.vcpus == 4
    assert cfg.memory_mib == 512
    assert cfg.image == "custom"
    assert cfg.network == VMConfig().network


def test_layers_empty_gives_defaults() -> None:
    assert config_from_layers([]) == VMConfig()


def test_layer_error_names_source() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_layers([
            ("ini file", {"memory_mib": "512"}),
            ("marker on test_x", {"memory_mib": -1}),
        ])
    msg = str(info.value)
    assert "memory_mib=-1" in msg
    assert "(from marker on test_x)" in msg
    assert "ini file" not in msg


def test_bad_value_in_overridden_layer_is_still_reported() -> None:
    # Every layer is validated as it is read, even if a later one would override it.
    with pytest.raises(ConfigError, match=r"\(from early\)"):
        config_from_layers([("early", {"vcpus": 0}), ("late", {"vcpus": 2})])


def test_layer_unknown_key_names_source() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_layers([("marker on test_y", {"cpus": 2})])
    msg = str(info.value)
    assert "'cpus'" in msg
    assert "(from marker on test_y)" in msg


def test_layer_allow_without_nat_names_both_sources() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_layers([
            ("cli", {"network": "isolated"}),
            ("marker", {"allow": ["198.51.100.0/24"]}),
        ])
    msg = str(info.value)
    assert "(from marker)" in msg
    assert "(from cli)" in msg
    assert "'isolated'" in msg


def test_layer_allow_without_network_mentions_default() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_layers([("marker", {"allow": "198.51.100.0/24"})])
    assert "(the default)" in str(info.value)


def test_layer_allow_with_nat_from_other_layer_ok() -> None:
    cfg = config_from_layers([("cli", {"network": "nat"}), ("marker", {"allow": "198.51.100.0/24"})])
    assert cfg.allow == ("198.51.100.0/24",)
    assert cfg.network == "nat"
