"""Secrets (pure parts): Secret and secrets= validation, placeholders, the request judge, the
redirect elements, the upstream CA setting, and the run CA's leaves (a real TLS handshake)."""

from __future__ import annotations

import pickle
import socket
import ssl
import threading
from pathlib import Path

import pytest

from pytest_smolvm import ConfigError, Secret, VMConfig
from pytest_smolvm.config import config_from_layers
from pytest_smolvm.network import policy
from pytest_smolvm.network.credentials import SecretBook, check_secrets, judge, placeholders
from pytest_smolvm.network.proxy import RunCA
from pytest_smolvm.settings import upstream_ca_bundle

VALUE = "tok-1234567890abcdef"


def test_a_secret_never_shows_or_pickles_its_value() -> None:
    s = Secret(VALUE, hosts=["API.Example.com."])
    assert s.hosts == ("api.example.com",) and s.reveal() == VALUE
    assert VALUE not in repr(s) and VALUE not in repr(VMConfig(network="nat", secrets={"K": s}))
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(s)


@pytest.mark.parametrize(("value", "hosts", "match"), [
    (b"bytes", ["a.test"], "a bytes, not shown"),
    ("", ["a.test"], "non-empty"),
    ("a\r\nX-Evil: 1", ["a.test"], "printable ASCII"),
    (VALUE, "a.test", "expected a list"),
    (VALUE, ["*.a.test"], "exact DNS name"),
    (VALUE, ["https://a.test/"], "exact DNS name"),
    (VALUE, ["10.0.0.1"], "not a DNS name"),
    (VALUE, [], "at least one host"),
])
def test_bad_secrets_are_config_errors_that_never_show_the_value(value: object, hosts: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        Secret(value, hosts)  # type: ignore[arg-type]
    assert VALUE not in str(info.value)


def test_secrets_field_and_its_reach() -> None:
    with pytest.raises(ConfigError, match="invalid secrets key 'A-B'"):
        check_secrets({"A-B": Secret(VALUE, ["a.test"])})
    with pytest.raises(ConfigError, match=r"invalid secrets\['K'\] \(a str, not shown\)"):
        check_secrets({"K": VALUE})
    with pytest.raises(ConfigError, match=r"need network='nat'.*in VMConfig"):
        VMConfig(secrets={"K": Secret(VALUE, ["a.test"])})
    with pytest.raises(ConfigError, match=r"host 'b.test' is not allowed by allow=\['a.test'\]"):
        VMConfig(network="nat", allow=["a.test"], secrets={"K": Secret(VALUE, ["a.test", "b.test"])})
    assert VMConfig(network="nat", allow=["*.a.test"], secrets={"K": Secret(VALUE, ["x.a.test"])}).secrets
    with pytest.raises(ConfigError, match="secrets from marker on t, network from ini"):
        config_from_layers([("ini", {"network": "isolated"}),
                            ("marker on t", {"secrets": {"K": Secret(VALUE, ["a.test"])}})])


def test_placeholders_are_fresh_per_vm() -> None:
    a, b = placeholders(["K", "L"]), placeholders(["K", "L"])
    assert a.keys() == {"K", "L"} and len({a["K"], a["L"], b["K"], b["L"]}) == 4


def book() -> SecretBook:
    return SecretBook({"K": Secret(VALUE, ["api.test"])}, {"K": "smolvm-secret-ph"})


def test_judge_refuses_placeholders_bound_elsewhere_and_records_them() -> None:
    b = book()
    ok = [(b"host", b"api.test"), (b"authorization", b"Bearer smolvm-secret-ph")]
    assert judge(b, "api.test", b"/v1", ok) is None
    assert b.substitute("Bearer smolvm-secret-ph", "api.test") == f"Bearer {VALUE}"
    assert b.substitute("Bearer smolvm-secret-ph", "other.test") == "Bearer smolvm-secret-ph"
    assert judge(b, "other.test", b"/", [(b"host", b"other.test"), (b"x-key", b"smolvm-secret-ph")])[0] == 403
    assert judge(b, "api.test", b"/?k=smolvm-secret-ph", [(b"host", b"api.test")])[0] == 403
    assert judge(b, "api.test", b"/", [(b"host", b"other.test"), (b"x", b"smolvm-secret-ph")])[0] == 421
    assert judge(b, "api.test", b"/", [(b"host", b"api.test"), (b"host", b"api.test")])[0] == 421
    assert judge(b, "api.test", b"/", [(b"host", b"api.test:443")]) is None
    assert b.snapshot()["ledger"] == [
        "secret K sent to other.test: refused",
        "secret K in the request target to api.test: refused (only headers carry secrets)",
        "secret K sent to Host 'other.test' over TLS to api.test: refused"]


def test_redirect_elements() -> None:
    assert policy.secret_redirect_elements("sv1", {"192.0.2.1": 60}) == \
        'add element inet smolvm secretdst { "sv1" . 192.0.2.1 timeout 60s }\n'
    assert policy.secret_redirect_elements("sv1", {}) == ""


def test_upstream_ca_bundle_setting(tmp_path: Path) -> None:
    pem = tmp_path / "ca.pem"
    pem.write_text("x")
    key = "upstream_ca_bundle"
    assert upstream_ca_bundle({}, {}, {}) is None
    assert upstream_ca_bundle({}, {"SMOLVM_UPSTREAM_CA_BUNDLE": str(pem)}, {key: "/nope"}) == str(pem)
    assert upstream_ca_bundle({key: str(pem)}, {}, {}) == str(pem)
    with pytest.raises(ConfigError, match="from ini option smolvm_upstream_ca_bundle"):
        upstream_ca_bundle({}, {}, {key: str(tmp_path / "missing.pem")})


def test_run_ca_leaves_verify_for_their_name_only(tmp_path: Path) -> None:
    ca = RunCA()
    bundle = tmp_path / "ca.pem"
    bundle.write_text(ca.pem)
    for name, ok in (("api.test", True), ("other.test", False)):
        a, b = socket.socketpair()
        server = ca.context_for("api.test")
        t = threading.Thread(target=_serve_once, args=(server, b), daemon=True)
        t.start()
        client = ssl.create_default_context(cafile=str(bundle))
        client.set_alpn_protocols(["http/1.1"])
        try:
            with client.wrap_socket(a, server_hostname=name) as tls:
                assert ok and tls.selected_alpn_protocol() == "http/1.1"
        except ssl.SSLCertVerificationError:
            assert not ok
        t.join(5)
        a.close()
        b.close()
    assert RunCA().pem != ca.pem  # never reused


def _serve_once(ctx: ssl.SSLContext, sock: socket.socket) -> None:
    try:
        with ctx.wrap_socket(sock, server_side=True):
            pass
    except (ssl.SSLError, OSError):
        pass


def test_the_package_imports_without_the_proxy_dependencies() -> None:
    import subprocess
    import sys

    code = ("import sys, pytest_smolvm, pytest_smolvm.plugin; "
            "print(sorted(m for m in ('h11', 'cryptography') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_request_rate_bucket() -> None:
    from pytest_smolvm.network.proxy import _Bucket

    bucket = _Bucket(rate=0.001, burst=3)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
