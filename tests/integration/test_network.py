"""Network policies in real microVMs. "The internet" is a pair of namespaces this module
creates (tests/nettopo.py); no packet leaves them or loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import REAL_CACHE
from nettopo import ALLOWED_HOST, ALLOWED_NET, OTHER_HOST, UPLINK_ADDR, Internet

from pytest_smolvm import NetworkError, SmolVM
from pytest_smolvm.network import netns

Factory = Callable[..., SmolVM]

FETCH = textwrap.dedent("""
    import socket, sys
    host, port = sys.argv[1], int(sys.argv[2])
    try:
        s = socket.create_connection((host, port), timeout=float(sys.argv[3]))
        s.sendall(b"GET /index.html HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        print("OK", data.split(b"\\r\\n\\r\\n", 1)[-1].decode())
    except OSError as exc:
        print("ERR", type(exc).__name__, exc)
""")


def fetch(vm: SmolVM, host: str, port: int = 80, timeout: float = 3.0) -> str:
    """What an HTTP GET from inside the guest got: 'OK <body>' or 'ERR <why>'."""
    return vm.run(["python3", "-c", FETCH, host, str(port), str(timeout)], timeout=timeout + 30).stdout.strip()


def serve(vm: SmolVM, port: int, page: str) -> None:
    """Start an HTTP server in the guest on every address, and wait until it listens."""
    vm.run(f"mkdir -p /srv && echo {page} > /srv/index.html && cd /srv && "
           f"(python3 -m http.server {port} >/dev/null 2>&1 &)", check=True)
    vm.run(["python3", "-c", f"""
import socket, time
for _ in range(300):
    try:
        socket.create_connection(("127.0.0.1", {port}), timeout=1).close(); break
    except OSError:
        time.sleep(0.05)
"""], check=True, timeout=60)


@pytest.fixture(scope="module")
def internet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Internet]:
    net = Internet.create(tmp_path_factory.mktemp("internet"))
    yield net
    net.destroy()


def test_none_gives_the_guest_nothing_but_loopback(smolvm: SmolVM) -> None:
    assert smolvm.run("ls /sys/class/net").stdout.split() == ["lo"]
    assert smolvm.network.denied == []
    with pytest.raises(NetworkError, match="needs network='isolated' or 'nat'"):
        smolvm.forward(80)
    with pytest.raises(NetworkError, match="needs network='isolated' or 'nat'"):
        smolvm.ssh()


def test_isolated_reaches_its_forward_but_no_other_host(smolvm_factory: Factory, internet: Internet) -> None:
    vm = smolvm_factory(network="isolated", uplink=internet.uplink)
    serve(vm, 8080, "guest-page")
    port = vm.forward(8080)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=30) as resp:
        assert resp.read() == b"guest-page\n"
    assert fetch(vm, ALLOWED_HOST).startswith("ERR")
    assert fetch(vm, UPLINK_ADDR).startswith("ERR")
    denied = vm.network.denied
    assert (ALLOWED_HOST, 80, "tcp") in denied
    assert (UPLINK_ADDR, 80, "tcp") in denied


def test_nat_with_allow_reaches_only_the_allowed_network(smolvm_factory: Factory, internet: Internet) -> None:
    vm = smolvm_factory(network="nat", allow=[ALLOWED_NET], uplink=internet.uplink)
    assert fetch(vm, ALLOWED_HOST) == "OK allowed-host"
    assert fetch(vm, OTHER_HOST).startswith("ERR")
    assert (OTHER_HOST, 80, "tcp") in vm.network.denied
    assert not any(d[0] == ALLOWED_HOST for d in vm.network.denied)


def test_nat_reaches_the_internet_but_not_the_hosts_own_addresses(smolvm_factory: Factory,
                                                                 internet: Internet) -> None:
    vm = smolvm_factory(network="nat", uplink=internet.uplink)
    assert fetch(vm, OTHER_HOST) == "OK other-host"
    # The uplink namespace plays the host: its own address is served, but not to guests.
    Internet.wait_listening(internet.host_ns, UPLINK_ADDR)
    assert fetch(vm, UPLINK_ADDR).startswith("ERR")


def test_vms_of_one_run_never_reach_each_other(smolvm_factory: Factory, internet: Internet) -> None:
    target = smolvm_factory(network="nat", uplink=internet.uplink)
    serve(target, 8080, "target")
    for policy in ("nat", "isolated"):
        other = smolvm_factory(network=policy, uplink=internet.uplink)
        assert other.network.guest_ip != target.network.guest_ip
        for addr in (target.network.guest_ip, target.network.host_ip):
            assert addr is not None
            assert fetch(other, addr, 8080, timeout=2).startswith("ERR"), (policy, addr)
            assert (addr, 8080, "tcp") in other.network.denied, (policy, addr)
    # ...while the target itself serves fine through its own forward.
    with urllib.request.urlopen(f"http://127.0.0.1:{target.forward(8080)}/index.html", timeout=30) as resp:
        assert resp.read() == b"target\n"


def test_ssh_pins_the_guest_host_key_and_refuses_a_swapped_one(smolvm_factory: Factory) -> None:
    vm = smolvm_factory(network="isolated")
    client = vm.ssh()
    _, out, _ = client.exec_command("echo hello from $(hostname)")
    assert out.read().decode().strip() == f"hello from smolvm-{vm.name}"
    # The guest's sshd now presents a different key: the host must refuse it.
    vm.run("kill $(cat /run/smolvm/ssh/sshd.pid); rm -f /run/smolvm/ssh/host_ed25519*; "
           "ssh-keygen -q -t ed25519 -N '' -f /run/smolvm/ssh/host_ed25519 && "
           "/usr/sbin/sshd -f /run/smolvm/ssh/sshd_config", check=True, timeout=60)
    with pytest.raises(NetworkError, match="not the pinned one"):
        vm.ssh()


ENGINE_SCRIPT = """
import sys, time
from pytest_smolvm import SmolVM, VMConfig
vm = SmolVM(VMConfig(network="nat", uplink=sys.argv[1], snapshot=False)).start()
print(vm.network.netns, vm.network.tap, flush=True)
if sys.argv[2] == "close":
    vm.close()
    print("closed", flush=True)
else:
    time.sleep(600)
"""


def _run_leftovers(run_id: str, uplink: str) -> list[str]:
    """Everything of run ``run_id`` that can still be seen on the host and in the uplink."""
    from pytest_smolvm.network.hub import run_tag, table_path

    tag = run_tag(run_id)
    found = [f"netns {n}" for n in netns.names(f"smolvm-{tag}")]
    for ns in (None, uplink):
        tables = netns.run(ns, ["nft", "list", "tables"]).stdout
        found += [f"table {t} in {ns}" for t in tables.split() if tag in t]
        links = netns.run(ns, ["ip", "-o", "link"]).stdout
        found += [f"link in {ns}: {ln.split(':')[1]}" for ln in links.splitlines() if tag in ln]
    if table_path(run_id).exists():
        found.append(str(table_path(run_id)))
    return found


@pytest.mark.parametrize("ending", ["close", "kill -9 then reap"])
def test_nothing_of_a_run_remains(ending: str, internet: Internet, tmp_path: Path) -> None:
    run_id = os.urandom(4).hex()
    env = {**os.environ, "SMOLVM_RUN_ID": run_id}
    proc = subprocess.Popen([sys.executable, "-c", ENGINE_SCRIPT, internet.uplink,
                             "close" if ending == "close" else "hold"],
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    ns_name, tap = proc.stdout.readline().split()
    assert netns.exists(ns_name)
    assert any("table" in f for f in _run_leftovers(run_id, internet.uplink))  # the uplink's table
    if ending == "close":
        assert proc.stdout.readline().strip() == "closed"
        proc.wait(timeout=60)
    else:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        out = subprocess.run([sys.executable, "-m", "pytest_smolvm", "reap"], capture_output=True, text=True,
                             env=env, timeout=120)
        assert ns_name in out.stdout, out.stdout + out.stderr
    assert _run_leftovers(run_id, internet.uplink) == []
    assert tap not in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


def test_a_failing_test_reports_what_its_policy_dropped(pytester: pytest.Pytester,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(REAL_CACHE))
    pytester.makepyfile(f"""
        import pytest

        @pytest.mark.smolvm(network="isolated")
        def test_phones_home(smolvm):
            smolvm.run("python3 -c 'import socket; socket.socket().connect_ex((\\"{OTHER_HOST}\\", 443))'",
                       timeout=30)
            assert smolvm.network.denied == []
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*smolvm network*", "*policy isolated*", f"*tcp {OTHER_HOST}:443*"])


def test_xdist_workers_never_share_a_tap_or_subnet(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(REAL_CACHE))
    log = tmp_path / "vms.jsonl"
    pytester.makepyfile(f"""
        import json, os
        import pytest

        @pytest.mark.smolvm(network="isolated")
        @pytest.mark.parametrize("i", range(20))
        def test_vm(smolvm, i):
            out = smolvm.run("ip -4 -o addr show dev eth0 && ip route", check=True).stdout
            assert smolvm.network.guest_ip + "/30" in out
            assert "default via " + smolvm.network.host_ip in out
            with open({str(log)!r}, "a") as f:
                f.write(json.dumps([os.environ["PYTEST_XDIST_WORKER"], smolvm.network.tap,
                                    smolvm.network.guest_ip]) + "\\n")
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=20)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 20
    assert {w for w, _, _ in rows} == {"gw0", "gw1"}
    assert len({tap for _, tap, _ in rows}) == 20
    assert len({ip for _, _, ip in rows}) == 20
