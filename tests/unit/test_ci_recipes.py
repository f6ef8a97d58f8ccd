"""The CI recipes in examples/ci: valid YAML, the structure each CI system needs, and every
pytest-smolvm command, option and variable they use exists (nothing here can run GitHub or
GitLab; what can be checked is)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from pytest_smolvm import cli, plugin

yaml = pytest.importorskip("yaml")
CI = Path(__file__).resolve().parents[2] / "examples" / "ci"
PACKAGE = Path(plugin.__file__).parent


def load(name: str) -> dict[Any, Any]:
    data = yaml.safe_load((CI / name).read_text())
    assert isinstance(data, dict)
    return data


def shell_lines(name: str) -> list[str]:
    """Every shell command of a recipe, folded onto one line."""
    text = (CI / name).read_text()
    data = load(name)
    found: list[str] = []

    def walk(node: object, key: str = "") -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, str(k))
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif isinstance(node, str) and key in ("run", "script", "before_script", "after_script"):
            found.extend(line for line in node.replace("\\\n", " ").splitlines() if line.strip())

    walk(data)
    assert found, text
    return found


def smolvm_commands(name: str) -> list[list[str]]:
    """Arguments of every ``python -m pytest_smolvm ...`` call (``$(...)`` included)."""
    out = []
    for line in shell_lines(name):
        for m in re.finditer(r"python -m pytest_smolvm ([^)&|;\"]*)", line):
            out.append(shlex.split(m[1]))
    return out


def pytest_option_names() -> set[str]:
    names: set[str] = set()

    class Group:
        def addoption(self, *opts: str, **kw: object) -> None:
            names.update(opts)

    class Parser:
        def getgroup(self, *a: object) -> Group:
            return Group()

        def addini(self, *a: object, **kw: object) -> None:
            pass

    plugin.pytest_addoption(Parser())  # type: ignore[arg-type]
    return names


@pytest.mark.parametrize("name", ["github-actions.yml", "gitlab-ci.yml"])
def test_every_smolvm_command_parses(name: str) -> None:
    commands = smolvm_commands(name)
    assert ["image", "build", "--print-digest"] in commands
    assert ["reap"] in commands
    parser = cli.build_parser()
    for argv in commands:
        parser.parse_args(argv)  # SystemExit (a test error) on anything unknown


@pytest.mark.parametrize("name", ["github-actions.yml", "gitlab-ci.yml"])
def test_every_smolvm_option_and_variable_exists(name: str) -> None:
    text = (CI / name).read_text()
    options = set(re.findall(r"--smolvm-[a-z-]+", text))
    assert "--smolvm-group-by-shape" in options
    assert options <= pytest_option_names()
    source = "".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    for var in set(re.findall(r"\bSMOLVM_[A-Z_]+", text)):
        assert f'"{var}"' in source, f"{name} sets {var}, which pytest-smolvm never reads"
    pytest_lines = [line for line in shell_lines(name) if "python -m pytest " in line]
    assert pytest_lines and all("--dist loadgroup" in line and "--splits" in line for line in pytest_lines)


def test_github_workflow_shards_enables_kvm_and_keys_the_cache_on_the_digest() -> None:
    wf = load("github-actions.yml")
    assert set(wf[True] if True in wf else wf["on"]) >= {"push", "pull_request"}  # YAML 1.1 reads on: as True
    job = wf["jobs"]["vm-tests"]
    shards = job["strategy"]["matrix"]["shard"]
    assert shards == list(range(1, len(shards) + 1)) and str(len(shards)) == str(job["env"]["SHARDS"])
    steps = job["steps"]
    runs = "\n".join(s.get("run", "") for s in steps)
    assert 'KERNEL=="kvm"' in runs and "MODE=\"0666\"" in runs and "udevadm trigger" in runs
    digest_step = next(s for s in steps if s.get("id") == "image")
    assert "--print-digest" in digest_step["run"] and "GITHUB_OUTPUT" in digest_step["run"]
    restore = next(s for s in steps if s.get("id") == "cache")
    assert restore["uses"].startswith("actions/cache/restore@")
    assert "${{ steps.image.outputs.digest }}" in restore["with"]["key"]
    save = next(s for s in steps if str(s.get("uses", "")).startswith("actions/cache/save@"))
    assert save["with"]["path"] == restore["with"]["path"]
    test_step = next(s for s in steps if str(s.get("name", "")).startswith("Tests"))
    assert "--group ${{ matrix.shard }}" in test_step["run"]


def test_gitlab_job_is_parallel_tcg_and_caches_the_image_directory() -> None:
    ci = load("gitlab-ci.yml")
    assert ci["variables"]["SMOLVM_ACCEL"] == "tcg"
    job = ci["vm-tests"]
    assert isinstance(job["parallel"], int) and job["parallel"] > 1
    caches = job["cache"] if isinstance(job["cache"], list) else [job["cache"]]
    assert any(".smolvm-cache/images" in c["paths"] for c in caches)
    assert any("smolvm-prepared.tgz" in c["paths"] for c in caches)  # prepared state, as one export
    assert ci["variables"]["SMOLVM_CACHE_DIR"].endswith("/.smolvm-cache")
    script = " ".join(job["script"])
    assert '--splits "$CI_NODE_TOTAL" --group "$CI_NODE_INDEX"' in script
    assert "junit" in job["artifacts"]["reports"]


@pytest.mark.parametrize("name", ["github-actions.yml", "gitlab-ci.yml"])
def test_prepared_state_travels_as_one_export_file(name: str) -> None:
    commands = smolvm_commands(name)
    assert ["checkpoint", "import", "smolvm-prepared.tgz"] in commands
    assert ["checkpoint", "export", "app-v3", "smolvm-prepared.tgz"] in commands
