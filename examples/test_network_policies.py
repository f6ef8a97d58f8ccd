"""Networking: reach a service in the guest, and see what the policy stopped.

``network="isolated"`` gives the guest a NIC that reaches only its own gateway: the test can
talk to it (``vm.forward``, ``vm.ssh``), but the guest cannot reach anything else. Every
attempt it makes is dropped before it leaves the run's own network namespace, and listed in
``vm.network.denied``.
"""

from __future__ import annotations

import urllib.request

import pytest

from pytest_smolvm import SmolVM


def start_web_server(vm: SmolVM, port: int) -> None:
    vm.run(f"mkdir -p /srv && echo hello from the guest > /srv/index.html && cd /srv && "
           f"(python3 -m http.server {port} >/dev/null 2>&1 &)", check=True)
    vm.run(f"for i in $(seq 100); do python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {port}))' "
           f"2>/dev/null && exit 0; sleep 0.1; done; exit 1", check=True, timeout=60)


@pytest.mark.smolvm(network="isolated")
def test_a_guest_service_through_a_port_forward(smolvm: SmolVM) -> None:
    start_web_server(smolvm, 8000)
    port = smolvm.forward(8000)  # 127.0.0.1:<port> on the host -> guest port 8000
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as resp:
        assert resp.read() == b"hello from the guest\n"


@pytest.mark.smolvm(network="isolated")
def test_untrusted_code_cannot_phone_home(smolvm: SmolVM) -> None:
    # 203.0.113.0/24 is a documentation range; the packet never leaves the run's namespace.
    r = smolvm.run("python3 -c 'import socket; s = socket.socket(); s.settimeout(2); "
                   "print(s.connect_ex((\"203.0.113.7\", 443)))'")
    assert r.stdout.strip() != "0"
    assert ("203.0.113.7", 443, "tcp") in smolvm.network.denied


@pytest.mark.smolvm(network="isolated")
def test_ssh_with_the_host_key_pinned(smolvm: SmolVM) -> None:
    client = smolvm.ssh()  # paramiko.SSHClient; any other host key would be refused
    _, stdout, _ = client.exec_command("uname -s")
    assert stdout.read() == b"Linux\n"
