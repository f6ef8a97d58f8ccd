"""Plugin logic through pytester. VMs here come from the fake driver (the real agent in a
thread, commands run on the host), so only plugin behaviour is under test; every feature is
proven again with real VMs in tests/integration."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import FAKE_CONFTEST, isolated_pytester


@pytest.fixture
def fake(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    return isolated_pytester(pytester, monkeypatch)


def test_bad_marker_value_is_usage_error_naming_test_and_value(fake: pytest.Pytester) -> None:
    fake.makepyfile("""
        import pytest
        from fake_driver import LAUNCHES

        def test_first(smolvm):
            pass

        @pytest.mark.smolvm(memory_mib=-1)
        def test_bad(smolvm):
            pass
    """)
    result = fake.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_bad_marker_value_is_usage_error_naming_test_and_value.py::test_bad*"
                                 "memory_mib=-1*"])
    result.assert_outcomes()  # nothing ran: no test, so no VM


def test_a_bad_name_in_allow_is_a_usage_error_before_any_vm(fake: pytest.Pytester) -> None:
    fake.makepyfile("""
        import pytest

        def test_first(smolvm):
            pass

        @pytest.mark.smolvm(network="nat", allow=["pypi.org", "files.*.example"])
        def test_wild(smolvm):
            pass
    """)
    from fake_driver import LAUNCHES

    before = len(LAUNCHES)
    result = fake.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*::test_wild*invalid allow='files.?.example'*only as a leading*"
                                 "(from marker on *test_wild)*"])
    assert len(LAUNCHES) == before


def test_unknown_marker_keyword_is_usage_error(fake: pytest.Pytester) -> None:
    fake.makepyfile("""
        import pytest

        @pytest.mark.smolvm(cpus=2)
        def test_typo(smolvm):
            pass
    """)
    result = fake.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_typo*unknown smolvm() keyword(s) cpus*"])


def test_positional_marker_argument_is_usage_error(fake: pytest.Pytester) -> None:
    fake.makepyfile("""
        import pytest

        @pytest.mark.smolvm(2)
        def test_pos(smolvm):
            pass
    """)
    result = fake.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_pos*keyword arguments only*"])


def test_no_vm_starts_when_a_marker_is_bad(fake: pytest.Pytester) -> None:
    fake.makepyfile("""
        import pytest

        def test_good(smolvm):
            pass

        @pytest.mark.smolvm(vcpus="many")
        def test_bad(smolvm):
            pass
    """)
    from fake_driver import LAUNCHES

    before = len(LAUNCHES)
    result = fake.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert len(LAUNCHES) == before


@pytest.mark.parametrize(
    ("ini", "env", "cli", "marker", "expected"),
    [
        ("2", None, None, None, 2),
        ("2", "3", None, None, 3),
        ("2", "3", "4", None, 4),
        ("2", "3", "4", 5, 5),
        (None, None, None, None, 1),
    ],
)
def test_precedence_marker_cli_env_ini_default(
    fake: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
    ini: str | None, env: str | None, cli: str | None, marker: int | None, expected: int,
) -> None:
    if ini:
        fake.makeini(f"[pytest]\nsmolvm_vcpus = {ini}\n")
    if env:
        monkeypatch.setenv("SMOLVM_VCPUS", env)
    mark = f"@pytest.mark.smolvm(vcpus={marker})" if marker else ""
    fake.makepyfile(f"""
        import pytest

        {mark}
        def test_cfg(smolvm_config):
            assert smolvm_config.vcpus == {expected}
    """)
    args = [f"--smolvm-vcpus={cli}"] if cli else []
    fake.runpytest(*args).assert_outcomes(passed=1)


def test_bad_option_value_names_its_source(fake: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.makepyfile("def test_x(): pass")
    result = fake.runpytest("--smolvm-memory=64")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*invalid memory_mib=64*>= 128*command line --smolvm-memory*"])
    monkeypatch.setenv("SMOLVM_NETWORK", "wifi")
    result = fake.runpytest()
    result.stderr.fnmatch_lines(["*network='wifi'*environment variable SMOLVM_NETWORK*"])


def test_network_ceiling_skips_a_test_asking_for_more(fake: pytest.Pytester) -> None:
    fake.makepyfile("""
        import pytest

        @pytest.mark.smolvm(network="nat")
        def test_wants_nat(smolvm):
            pass

        @pytest.mark.smolvm(network="none")
        def test_lower_is_fine(smolvm_config):
            assert smolvm_config.network == "none"
    """)
    result = fake.runpytest("--smolvm-network=isolated", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*network='nat'*--smolvm-network=isolated caps network policy at 'isolated'*"])


def test_network_default_is_none_and_ini_is_not_a_ceiling(fake: pytest.Pytester) -> None:
    fake.makeini("[pytest]\nsmolvm_network = isolated\n")
    fake.makepyfile("""
        import pytest

        @pytest.mark.smolvm(network="nat", allow=["198.51.100.0/24"])
        def test_marker_may_exceed_ini(smolvm_config):
            assert smolvm_config.network == "nat"
            assert smolvm_config.allow == ("198.51.100.0/24",)

        def test_ini_default(smolvm_config):
            assert smolvm_config.network == "isolated"
    """)
    fake.runpytest().assert_outcomes(passed=2)
    fake.makeini("")
    fake.makepyfile(test_default="def test_d(smolvm_config):\n    assert smolvm_config.network == 'none'\n")
    fake.runpytest("test_default.py").assert_outcomes(passed=1)


def test_marker_on_module_and_class_closest_wins(fake: pytest.Pytester) -> None:
    fake.makepyfile("""
        import pytest

        pytestmark = pytest.mark.smolvm(vcpus=2, memory_mib=512)

        @pytest.mark.smolvm(vcpus=3)
        class TestC:
            def test_class(self, smolvm_config):
                assert (smolvm_config.vcpus, smolvm_config.memory_mib) == (3, 512)

            @pytest.mark.smolvm(vcpus=4)
            def test_func(self, smolvm_config):
                assert (smolvm_config.vcpus, smolvm_config.memory_mib) == (4, 512)
    """)
    fake.runpytest().assert_outcomes(passed=2)


def test_hooks_configure_ready_and_make_driver(fake: pytest.Pytester) -> None:
    fake.makeconftest(FAKE_CONFTEST + """
READY = []

def pytest_smolvm_configure(config, request):
    return config.replace(memory_mib=640, env={"FROM_HOOK": "yes"})

def pytest_smolvm_ready(vm, request):
    READY.append((vm.name, request.node.name))
""")
    fake.makepyfile("""
        import conftest

        def test_uses_hooks(smolvm, smolvm_config):
            assert smolvm_config.memory_mib == 640
            assert smolvm.accel.name == "fake"          # pytest_smolvm_make_driver was used
            assert conftest.READY == [(smolvm.name, "test_uses_hooks")]
            assert smolvm.run("echo $FROM_HOOK").stdout == "yes\\n"
    """)
    fake.runpytest().assert_outcomes(passed=1)


def test_configure_hook_must_return_a_vmconfig(fake: pytest.Pytester) -> None:
    fake.makeconftest(FAKE_CONFTEST + """
def pytest_smolvm_configure(config, request):
    return {"vcpus": 2}
""")
    fake.makepyfile("def test_x(smolvm):\n    pass\n")
    result = fake.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*pytest_smolvm_configure returned*expected a VMConfig*"])


def test_factory_overrides_and_teardown(fake: pytest.Pytester) -> None:
    fake.makepyfile("""
        import pytest
        MADE = []

        @pytest.mark.smolvm(memory_mib=300)
        def test_factory(smolvm_factory):
            a = smolvm_factory(vcpus=2)
            b = smolvm_factory(memory_mib=400)
            MADE.extend([a, b])
            assert (a.config.vcpus, a.config.memory_mib) == (2, 300)
            assert (b.config.vcpus, b.config.memory_mib) == (1, 400)
            with pytest.raises(Exception, match="vcpus=0"):
                smolvm_factory(vcpus=0)

        def test_after():
            assert [vm.alive for vm in MADE] == [False, False]
            assert all(not vm.workdir.exists() for vm in MADE)
    """)
    fake.runpytest().assert_outcomes(passed=2)


def test_session_vm_is_shared(fake: pytest.Pytester) -> None:
    fake.makepyfile("""
        NAMES = []

        def test_a(smolvm_session):
            NAMES.append(smolvm_session.name)

        def test_b(smolvm_session):
            NAMES.append(smolvm_session.name)
            assert NAMES[0] == NAMES[1]
    """)
    fake.runpytest().assert_outcomes(passed=2)


def test_failure_report_carries_transcript_and_console_sanitised(fake: pytest.Pytester) -> None:
    fake.makepyfile("""
        def test_fails(smolvm):
            smolvm.run("printf 'hello\\\\033[2Jworld'")
            assert False, "boom"
    """)
    result = fake.runpytest()
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "smolvm transcript" in out and "smolvm console" in out
    assert "hello\\x1b[2Jworld" in out          # escape shown, not executed
    assert "\x1b[2J" not in out
    assert "fake console: agent ready" in out


def test_report_header_names_accel_and_reason(fake: pytest.Pytester) -> None:
    fake.makepyfile("def test_x(): pass")
    result = fake.runpytest()
    result.stdout.fnmatch_lines(["smolvm: run *, defaults vcpus=1 memory_mib=256*network=none*"])
    result.stdout.fnmatch_lines(["smolvm: *accel fake: fake driver for plugin tests*"])


def test_xdist_workers_share_the_run_id(fake: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    fake.makepyfile("""
        import pytest

        @pytest.mark.parametrize("i", range(4))
        def test_vm(smolvm, i, tmp_path_factory):
            out = tmp_path_factory.getbasetemp().parent.parent / f"runid-{i}"
            out.write_text(smolvm.run_id)
    """)
    result = fake.runpytest_subprocess("-n", "2", "-p", "xdist")
    result.assert_outcomes(passed=4)
    ids = {p.read_text() for p in Path(fake.path).parent.rglob("runid-*")}
    assert len(ids) == 1, ids


def test_a_collection_error_is_reported_not_an_internal_error(fake: pytest.Pytester) -> None:
    fake.makepyfile(test_broken="import a_module_that_does_not_exist\n")
    result = fake.runpytest("-ra")  # the short summary asks every plugin for the report's status
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*ERROR collecting test_broken.py*"])
    result.stdout.no_fnmatch_line("*INTERNALERROR*")
