"""--smolvm-evidence / --smolvm-evidence-dir through pytester with the fake driver: option
errors, JUnit properties and the JSON files (one per test; the same under xdist). The facts
themselves are proven on real VMs in tests/integration/test_evidence.py."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from helpers import isolated_pytester

TESTS = """
import pytest

@pytest.mark.parametrize("i", range(3))
def test_vm(smolvm, i):
    smolvm.run("true")

def test_no_vm():
    pass
"""


@pytest.fixture
def fake(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    return isolated_pytester(pytester, monkeypatch)


@pytest.mark.parametrize(("args", "env", "ini", "source"), [
    (["--smolvm-evidence=sometimes"], {}, "", "command line --smolvm-evidence"),
    ([], {"SMOLVM_EVIDENCE": "loud"}, "", "environment variable SMOLVM_EVIDENCE"),
    ([], {}, "smolvm_evidence = most", "ini option smolvm_evidence"),
])
def test_a_bad_mode_names_the_value_and_where_it_came_from(fake: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                                           args: list[str], env: dict[str, str], ini: str,
                                                           source: str) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if ini:
        fake.makeini(f"[pytest]\n{ini}\n")
    fake.makepyfile("def test_x(): pass")
    result = fake.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*invalid evidence mode*(from {source})*failed, all, none*"])


def test_an_evidence_dir_that_is_a_file_is_a_usage_error(fake: pytest.Pytester) -> None:
    (fake.path / "taken").write_text("")
    fake.makepyfile("def test_x(): pass")
    result = fake.runpytest("--smolvm-evidence-dir=taken")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*invalid evidence directory 'taken' (from command line --smolvm-evidence-dir)*"])


def test_evidence_files_without_an_evidence_dir_is_a_usage_error(fake: pytest.Pytester) -> None:
    fake.makepyfile("def test_x(): pass")
    result = fake.runpytest("--smolvm-evidence-files")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--smolvm-evidence-files*needs --smolvm-evidence-dir*"])


def test_every_vm_test_gets_junit_properties_and_a_json_file(fake: pytest.Pytester) -> None:
    fake.makepyfile(TESTS)
    result = fake.runpytest("--smolvm-evidence-dir=ev", "--junitxml=j.xml")
    result.assert_outcomes(passed=4)
    cases = {c.get("name"): {p.get("name"): p.get("value") for p in c.iter("property")}
             for c in ET.parse(fake.path / "j.xml").getroot().iter("testcase")}
    assert cases["test_no_vm"] == {}
    for i in range(3):
        props = cases[f"test_vm[{i}]"]
        assert props["smolvm_vms"] == "1" and float(props["smolvm_wall_s"]) >= 0
    files = sorted((fake.path / "ev").glob("*.json"))
    assert len(files) == 3
    data = json.loads(files[0].read_text())
    assert data["outcome"] == "passed" and data["vms"][0]["guest_reported"] is None
    assert set(data["vms"][0]) == {"vm", "host_measured", "guest_reported", "guest_reported_commands"}
    result.stdout.fnmatch_lines(["smolvm: evidence of 3 test(s) written to ev"])


def test_none_adds_no_section_to_a_failure(fake: pytest.Pytester) -> None:
    fake.makepyfile("def test_fails(smolvm):\n    assert False\n")
    result = fake.runpytest("--smolvm-evidence=none")
    result.assert_outcomes(failed=1)
    result.stdout.no_fnmatch_line("*smolvm evidence*")


def test_xdist_writes_the_same_files_as_one_process(fake: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    fake.makepyfile(TESTS)
    found = {}
    for n in ("0", "2"):
        result = fake.runpytest_subprocess("-p", "xdist", "-n", n, f"--smolvm-evidence-dir=ev{n}")
        result.assert_outcomes(passed=4)
        found[n] = {p.name: (d["nodeid"], d["outcome"], len(d["vms"]))
                    for p in Path(fake.path, f"ev{n}").glob("*.json") if (d := json.loads(p.read_text()))}
    assert found["0"] == found["2"] and len(found["0"]) == 3
