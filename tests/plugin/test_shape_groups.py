"""``--smolvm-group-by-shape`` and the per-host summary, through pytester with the fake
driver (plugin logic only; tests/integration/test_multihost.py runs real VMs over hosts)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from helpers import isolated_pytester

MIXED = """
    import json, os, pytest

    def record(request, smolvm):
        out = request.config.rootpath / f"ran-{request.node.name}.json"
        out.write_text(json.dumps({"worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
                                   "nodeid": request.node.nodeid}))

    @pytest.mark.parametrize("i", range(3))
    def test_small(smolvm, request, i):
        record(request, smolvm)

    @pytest.mark.smolvm(memory_mib=384)
    @pytest.mark.parametrize("i", range(3))
    def test_big(smolvm, request, i):
        record(request, smolvm)

    @pytest.mark.smolvm(vcpus=2)
    @pytest.mark.parametrize("i", range(3))
    def test_wide(smolvm, request, i):
        record(request, smolvm)

    @pytest.mark.xdist_group("mine")
    def test_own_group(smolvm, request):
        record(request, smolvm)

    def test_no_vm():
        pass
"""


@pytest.fixture
def fake(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    return isolated_pytester(pytester, monkeypatch)


def ran(pytester: pytest.Pytester) -> dict[str, dict[str, str]]:
    return {p.name: json.loads(p.read_text()) for p in Path(pytester.path).glob("ran-*.json")}


def test_groups_are_per_shape_and_keep_the_users_own(fake: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    fake.makepyfile(test_mixed=MIXED)
    result = fake.runpytest_subprocess("-p", "xdist", "-n", "2", "--dist", "loadgroup",
                                       "--smolvm-group-by-shape", "-v")
    result.assert_outcomes(passed=11)
    runs = ran(fake)
    assert len(runs) == 10
    by_test: dict[str, set[str]] = {}
    suffix: dict[str, set[str]] = {}
    for name, info in runs.items():
        base = name.split("[")[0].removeprefix("ran-").removesuffix(".json")
        by_test.setdefault(base, set()).add(info["worker"])
        suffix.setdefault(base, set()).add(info["nodeid"].rpartition("@")[2])
    for base in ("test_small", "test_big", "test_wide"):
        assert len(by_test[base]) == 1, (base, by_test)   # one shape, one worker
        assert len(suffix[base]) == 1 and suffix[base] != {""}, suffix
    groups = {next(iter(suffix[b])) for b in ("test_small", "test_big", "test_wide")}
    assert len(groups) == 3, groups
    assert any("-256m-" in g and "-1cpu-" in g for g in groups)
    assert any("-384m-" in g for g in groups) and any("-2cpu-" in g for g in groups)
    assert suffix["test_own_group"] == {"mine"}          # not overridden
    result.stdout.fnmatch_lines(["*PASSED test_mixed.py::test_no_vm "])  # no VM, no group: no suffix
    result.stdout.no_fnmatch_line("*test_no_vm@*")


def test_ini_turns_grouping_on(fake: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    fake.makeini("[pytest]\nsmolvm_group_by_shape = true\n")
    fake.makepyfile(test_mixed=MIXED)
    result = fake.runpytest_subprocess("-p", "xdist", "-n", "2", "--dist", "loadgroup", "-v")
    result.assert_outcomes(passed=11)
    result.stdout.fnmatch_lines(["*PASSED test_mixed.py::test_big*@smolvm-default-1cpu-384m-base-none-*"])


def test_without_the_option_no_group_is_added(fake: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    fake.makepyfile(test_mixed=MIXED)
    result = fake.runpytest_subprocess("-p", "xdist", "-n", "2", "--dist", "loadgroup", "-v")
    result.assert_outcomes(passed=11)
    result.stdout.no_fnmatch_line("*@smolvm-*")
    result.stdout.fnmatch_lines(["*PASSED test_mixed.py::test_own_group@mine*"])


def test_a_bad_marker_is_still_a_usage_error_with_grouping(fake: pytest.Pytester) -> None:
    fake.makepyfile("""
        import pytest

        @pytest.mark.smolvm(memory_mib=-1)
        def test_bad(smolvm):
            pass
    """)
    result = fake.runpytest("--smolvm-group-by-shape")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_bad*memory_mib=-1*"])


def test_env_values_never_reach_the_group_name(fake: pytest.Pytester) -> None:
    fake.makepyfile("""
        import pytest

        @pytest.mark.smolvm(env={"TOKEN": "s3cr3t-value"})
        def test_a(smolvm):
            pass

        @pytest.mark.smolvm(env={"TOKEN": "other-value"})
        def test_b(smolvm):
            pass

        def test_names(request):
            groups = {i.get_closest_marker("xdist_group").kwargs["name"]
                      for i in request.session.items if i.name != "test_names"}
            assert len(groups) == 1, groups
            assert "s3cr3t" not in next(iter(groups))
    """)
    fake.runpytest("--smolvm-group-by-shape", "-p", "no:randomly").assert_outcomes(passed=3)


def test_summary_says_per_host_how_many_vms_and_pool_hits(fake: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    fake.makepyfile(test_mixed=MIXED)
    result = fake.runpytest_subprocess("-p", "xdist", "-n", "2", "--dist", "loadgroup", "--smolvm-group-by-shape")
    result.assert_outcomes(passed=11)
    host = socket.gethostname()
    result.stdout.fnmatch_lines([f"smolvm: host {host} (gw0, gw1): 10 VM(s), pool hits */10 (*%)"])


def test_summary_without_xdist(fake: pytest.Pytester) -> None:
    fake.makepyfile("""
        import pytest

        @pytest.mark.parametrize("i", range(3))
        def test_vm(smolvm, i):
            pass
    """)
    result = fake.runpytest()
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines([f"smolvm: host {socket.gethostname()} (main): 3 VM(s), pool hits */3*"])


def test_failure_report_names_the_host(fake: pytest.Pytester) -> None:
    fake.makepyfile("""
        def test_fails(smolvm):
            assert False
    """)
    result = fake.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*smolvm host vm*", f"host {socket.gethostname()}, worker *, run *, "
                                 f"VM directory */vm*"])
