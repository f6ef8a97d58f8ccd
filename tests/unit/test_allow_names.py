"""Names in ``allow``, query names from the guest, upstream lists (network/names.py)."""

from __future__ import annotations

import pytest

from pytest_smolvm.errors import ConfigError
from pytest_smolvm.network.names import (
    MAX_QUERY_LABELS,
    SHOWN_LENGTH,
    allow_entry,
    host_upstreams,
    name_allowed,
    query_name,
    split_allow,
    upstreams,
)


@pytest.mark.parametrize(("given", "normal"), [
    ("pypi.org", "pypi.org"),
    ("PyPI.ORG.", "pypi.org"),
    ("*.pythonhosted.org", "*.pythonhosted.org"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("*.Bücher.example", "*.xn--bcher-kva.example"),
    ("_dmarc.example.org", "_dmarc.example.org"),
    ("198.51.100.7/24", "198.51.100.0/24"),
    ("192.0.2.1", "192.0.2.1/32"),
])
def test_allow_entries_are_normalised(given: str, normal: str) -> None:
    assert allow_entry(given) == normal


@pytest.mark.parametrize(("bad", "why"), [
    ("*", "a wildcard is allowed only as a leading"),
    ("*.", "a wildcard is allowed only as a leading"),
    ("a.*.example", "a wildcard is allowed only as a leading"),
    ("*example.org", "a wildcard is allowed only as a leading"),
    ("**.example.org", "a wildcard is allowed only as a leading"),
    ("*.org", "a wildcard must name a domain with a dot"),
    ("foo..example", "not a network"),
    ("-foo.example", "not a network"),
    ("foo .example", "not a network"),
    ("foo/bar.example", "not a network"),
    ("a" * 64 + ".example", "not a network"),
    (".".join(["a" * 60] * 5), "not a network"),  # 304 bytes
    ("1.2.3.999", "the last label is a number"),
    ("", "a wildcard is allowed only as a leading"),
])
def test_bad_allow_entries_say_why(bad: str, why: str) -> None:
    with pytest.raises(ConfigError, match="invalid allow=") as info:
        allow_entry(bad)
    assert why in str(info.value)
    assert repr(bad) in str(info.value)


def test_split_allow_separates_networks_from_names() -> None:
    assert split_allow(("198.51.100.0/24", "pkgs.test", "*.cdn.test", "2001:db8::/32")) == (
        ["198.51.100.0/24", "2001:db8::/32"], ["pkgs.test", "*.cdn.test"])


@pytest.mark.parametrize(("name", "allowed"), [
    ("pkgs.test", True),
    ("files.cdn.test", True),
    ("a.b.cdn.test", True),          # a wildcard covers every depth below its domain
    ("cdn.test", False),             # ... but not the domain itself
    ("xcdn.test", False),            # a suffix is not a subdomain
    ("pkgs.test.evil.test", False),
    ("evil-pkgs.test", False),
    ("sub.pkgs.test", False),        # an exact name covers only itself
])
def test_name_matching(name: str, allowed: bool) -> None:
    assert name_allowed(name, ["pkgs.test", "*.cdn.test"]) is allowed


def test_query_names_from_the_wire_are_judged() -> None:
    assert query_name([b"PKGS", b"test"]) == ("pkgs.test", None)
    assert query_name([b"_sip", b"_tcp", b"example"]) == ("_sip._tcp.example", None)
    assert query_name([])[1] == "the root name"
    assert query_name([b"a"] * (MAX_QUERY_LABELS + 1))[1] == f"more than {MAX_QUERY_LABELS} labels"
    assert query_name([b"a" * 63] * 4 + [b"b"])[1] == "longer than 253 bytes"
    shown, why = query_name([b"\x00\xff\n", b"evil", b"test"])
    assert why is not None and "not a host name" in why
    assert shown.isprintable() and "evil.test" in shown and "\n" not in shown
    shown, why = query_name([b"x" * 63] * 3)
    assert why is None and len(shown) == 191
    assert len(query_name([b"\xff" * 63] * 10)[0]) <= SHOWN_LENGTH


def test_upstreams_parse_and_normalise() -> None:
    assert upstreams("192.0.2.53, 192.0.2.54:5353  198.51.100.1") == (
        "192.0.2.53:53", "192.0.2.54:5353", "198.51.100.1:53")
    assert upstreams(["192.0.2.53"]) == ("192.0.2.53:53",)
    assert upstreams("") == () and upstreams(None) == ()
    for bad in ("resolver.example", "192.0.2.1:x", "192.0.2.1:70000", "2001:db8::1", "192.0.2.1:0"):
        with pytest.raises(ConfigError, match="invalid dns_upstream entry"):
            upstreams(bad)


def test_host_upstreams_follow_systemd_resolved() -> None:
    plain = "# generated\nnameserver 192.0.2.1\nnameserver 2001:db8::1\nsearch example\nnameserver 192.0.2.2 # x\n"
    assert host_upstreams(plain, None) == ["192.0.2.1:53", "192.0.2.2:53"]
    stub = "nameserver 127.0.0.53\noptions edns0 trust-ad\n"
    real = "nameserver 198.51.100.53\nnameserver 198.51.100.54\n"
    assert host_upstreams(stub, real) == ["198.51.100.53:53", "198.51.100.54:53"]
    # resolved's own file unreadable, or listing only its stub: the stub is asked (it is
    # reachable from the root namespace, where upstream queries are made).
    assert host_upstreams(stub, None) == ["127.0.0.53:53"]
    assert host_upstreams(stub, stub) == ["127.0.0.53:53"]
    assert host_upstreams("", None) == []
