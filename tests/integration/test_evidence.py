"""Evidence of what a guest did (issue 25), on real VMs: the report section, JUnit properties
and JSON name each fact; a lying, flooding guest cannot blow up size or time.

Network traffic goes only into namespaces the test creates (tests/nettopo.py)."""

from __future__ import annotations

import json
import tarfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import REAL_CACHE
from nettopo import ALLOWED_HOST, ALLOWED_NET, OTHER_HOST, Internet

from pytest_smolvm import SmolVM, VMConfig

MIB = 1024 * 1024

INNER = """
import os, pytest

DOES = '''
set -e
echo new > /root/created.txt
echo more >> /etc/motd
rm /etc/issue
setsid sleep 1000 </dev/null >/dev/null 2>&1 &
setsid sh -c 'sleep 999' "$TOKEN" </dev/null >/dev/null 2>&1 &
python3 -c "b = bytearray(200 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096])"
python3 -c "
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(100): s.sendto(b'x' * 1000, ('{allowed}', 9)); time.sleep(0.005)
s.sendto(b'y', ('{other}', 9))
"
'''

@pytest.mark.smolvm(network="nat", allow=["{net}"], uplink=os.environ["EV_UPLINK"], memory_mib=512,
                    env={"TOKEN": "tok-sekrit-4711"})
def test_does_things_and_fails(smolvm):
    smolvm.run(DOES, check=True)
    assert False, "failing on purpose"

@pytest.mark.smolvm(memory_mib=256)
def test_passes(smolvm):
    smolvm.run("echo quiet > /root/quiet.txt", check=True)
""".replace("{allowed}", ALLOWED_HOST).replace("{other}", OTHER_HOST).replace("{net}", ALLOWED_NET)


@pytest.fixture(scope="module")
def internet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Internet]:
    net = Internet.create(tmp_path_factory.mktemp("internet"))
    try:
        yield net
    finally:
        net.destroy()


def _inner_run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, internet: Internet,
               *args: str) -> tuple[pytest.RunResult, Path, Path]:
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(REAL_CACHE))
    monkeypatch.setenv("EV_UPLINK", internet.uplink)
    pytester.makepyfile(test_inner=INNER)
    out, junit = pytester.path / "evidence", pytester.path / "junit.xml"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--smolvm-evidence-dir={out}",
                                           f"--junitxml={junit}", *args)
    return result, out, junit


def _props(junit: Path) -> dict[str, dict[str, str]]:
    found = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        found[case.get("name", "")] = {p.get("name", ""): p.get("value", "")
                                       for p in case.iter("property")}
    return found


def test_the_report_junit_and_json_name_what_the_guest_did(pytester: pytest.Pytester,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           internet: Internet) -> None:
    result, out, junit = _inner_run(pytester, monkeypatch, internet, "-n", "0", "--smolvm-evidence-files")
    result.assert_outcomes(passed=1, failed=1)
    text = result.stdout.str()
    section = text[text.index("smolvm evidence"):]
    for fact in ("created  /root/created.txt", "changed  /etc/motd", "deleted  /etc/issue", "sleep 1000",
                 f"udp {OTHER_HOST}:9", "host-measured:", "guest-reported (cgroup smolvm):", "tmpfs /run"):
        assert fact in section, fact
    assert text.count("smolvm evidence vm") == 1  # default mode: the failed test only

    props = _props(junit)
    failed, passed = props["test_does_things_and_fails"], props["test_passes"]
    assert int(failed["smolvm_guest_memory_peak_bytes"]) >= 200 * MIB
    assert int(failed["smolvm_net_bytes_out"]) >= 100 * 1000
    assert int(failed["smolvm_net_denied"]) >= 1
    assert int(failed["smolvm_net_connections_opened"]) == 1  # 100 datagrams of one flow; the blocked one not
    for p in (failed, passed):  # every VM test: host-measured figures
        assert float(p["smolvm_vmm_cpu_user_s"]) > 0 and int(p["smolvm_vmm_peak_rss_bytes"]) > 10 * MIB
        assert float(p["smolvm_wall_s"]) > 0 and "smolvm_disk_written_bytes" in p
    assert "smolvm_guest_memory_peak_bytes" not in passed  # default mode: no guest part for a pass

    files = {json.loads(f.read_text())["nodeid"].split("::")[-1]: json.loads(f.read_text())
             for f in out.glob("*.json")}
    assert set(files) == {"test_does_things_and_fails", "test_passes"}
    bad = files["test_does_things_and_fails"]
    assert bad["outcome"] == "failed"
    vm = bad["vms"][0]
    changes = {(f["change"], f["path"]) for f in vm["guest_reported"]["files"]}
    assert {("created", "/root/created.txt"), ("changed", "/etc/motd"), ("deleted", "/etc/issue")} <= changes
    assert any("sleep 1000" in p["argv"] for p in vm["guest_reported"]["processes"])
    # An env secret in a leftover process's argv is masked, in the JSON as in the report.
    left = vm["guest_reported"]["processes"]
    assert any(p["argv"].endswith("sleep 999 ***") for p in left), left
    assert "tok-sekrit-4711" not in "".join(f.read_text() for f in out.glob("*.json")) + text
    assert vm["guest_reported"]["memory_peak_bytes"] >= 200 * MIB
    (usage,) = vm["guest_reported_commands"]  # the one run(): its tree's largest process held the 200 MiB
    assert usage["peak_rss_bytes"] >= 200 * MIB and usage["cpu_user_s"] + usage["cpu_system_s"] > 0
    assert int(failed["smolvm_guest_commands_peak_rss_bytes"]) >= 200 * MIB
    assert vm["host_measured"]["net_bytes_out"] >= 100 * 1000
    assert any(d.startswith(f"udp {OTHER_HOST}:9") for d in vm["host_measured"]["denied"])
    good = files["test_passes"]
    assert good["outcome"] == "passed" and good["vms"][0]["guest_reported"] is None
    # --smolvm-evidence-files: the failed test's changed files as the guest's tar, read here in
    # memory (never extracted); the passing test has none (its guest part was not gathered).
    (archive,) = bad["archives"].values()
    assert not good.get("archives")
    with tarfile.open(out / archive["file"]) as tar:
        assert {"root/created.txt", "etc/motd"} <= set(tar.getnames())
        created = tar.extractfile("root/created.txt")
        assert created is not None and created.read() == b"new\n"
    assert archive["bytes"] == (out / archive["file"]).stat().st_size and not archive["cut"]


def test_xdist_writes_the_same_files_as_one_process(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                                    internet: Internet) -> None:
    pytest.importorskip("xdist")
    seen = {}
    for n in ("0", "2"):
        result, out, _ = _inner_run(pytester, monkeypatch, internet, "-n", n, "--smolvm-pool=0")
        result.assert_outcomes(passed=1, failed=1)
        seen[n] = {f.name: _facts(json.loads(f.read_text())) for f in out.glob("*.json")}
        for f in out.glob("*.json"):
            f.unlink()
    assert seen["0"] == seen["2"] and len(seen["0"]) == 2


def _facts(data: dict[str, object]) -> object:
    """What must not depend on xdist: the test, its outcome, the guest's file changes."""
    vms = data["vms"]
    assert isinstance(vms, list)
    return (data["nodeid"], data["outcome"],
            [sorted((f["change"], f["path"]) for f in (vm["guest_reported"] or {}).get("files", ())
                    if f["path"].startswith("/root")) for vm in vms])


def test_a_lying_flooding_guest_cannot_blow_up_the_evidence() -> None:
    with SmolVM(VMConfig(memory_mib=256, disk_size_mib=4096)) as vm:
        vm.run("mkdir /flood && cd /flood && seq 100000 | xargs touch && "
               r'printf x > "$(printf "/root/evil\n\033[31mred\033]0;title\007")" && '

               "echo 99999999999999999999999 > /run/peak && mount --bind /run/peak /sys/fs/cgroup/smolvm/memory.peak",
               check=True, timeout=600)
        t0 = time.monotonic()
        ev = vm.evidence()
        took = time.monotonic() - t0
        g = ev.guest_reported
        assert g is not None and g.files_more and len(g.files) <= 200
        assert g.memory_peak_bytes is None  # an impossible number is dropped, not believed
        for f in g.files:
            assert "\x1b" not in f.path and "\n" not in f.path and "\x07" not in f.path and len(f.path) < 400
        # The host's figures do not come from the guest: still there, still plausible.
        h = ev.host_measured
        assert h.vmm_cpu_user_s is not None and h.vmm_peak_rss_bytes is not None and h.vmm_peak_rss_bytes > 10 * MIB
        assert took < 60, took
        # Now a guest whose tools lie: find prints a flood of escape-laden junk.
        vm.run("printf '#!/bin/sh\\nwhile :; do printf \"d 777 1 /\\033[2J%%s\\\\0\" $(seq 1 50); done\\n' "
               "> /usr/local/bin/find && chmod +x /usr/local/bin/find", check=True)
        t0 = time.monotonic()
        ev = vm.evidence()
        assert time.monotonic() - t0 < 60
        g = ev.guest_reported
        assert g is not None and len(g.files) <= 200
        assert all("\x1b" not in f.path for f in g.files)
        assert len(json.dumps(ev.to_dict())) < 200_000
    assert not vm.alive
