"""Images declared in pyproject.toml, through pytester: built on first use with progress on the
terminal, never rebuilt while the declaration is unchanged, rebuilt when it changes, built once
for all xdist workers, and a bad table stops the run naming the key and the file. The images
are real (an OCI import, no VM needed for a declaration without steps); the VMs that use them
come from the fake driver (plugin logic only: tests/integration/test_images_declared.py boots them)."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import FAKE_CONFTEST, REAL_CACHE
from ocitrees import have_tools, layout_with_whiteout, with_files

from pytest_smolvm.images.store import images_dir

pytestmark = pytest.mark.skipif(have_tools() is not None, reason=str(have_tools()))

TEST = """
import pytest

@pytest.mark.smolvm(image="NAME")
def test_uses_it(smolvm):
    assert smolvm.image.name == "NAME"
"""


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One layout, two tags whose second layers differ (so two images)."""
    work = tmp_path_factory.mktemp("layout")
    (work / "base").mkdir()
    base = with_files(work / "base")
    layout_with_whiteout(work / "l", base, tag="one")
    (base / "etc/version").write_text("two\n")
    two = work / "l2"
    layout_with_whiteout(two, base, tag="two")
    return work


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
            request: pytest.FixtureRequest) -> Iterator[Project]:
    """A pytester project whose image name is its own (tests may run in parallel)."""
    name = "smolvm-test-plugin-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8]
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(REAL_CACHE))
    monkeypatch.delenv("SMOLVM_IMAGE", raising=False)
    for stale in (name, f"{name}.base"):
        shutil.rmtree(images_dir() / stale, ignore_errors=True)  # a first use, whatever ran before
    pytester.makeconftest(FAKE_CONFTEST)
    pytester.makepyfile(TEST.replace("NAME", name))
    yield Project(pytester, name)
    for made in (name, f"{name}.base"):
        shutil.rmtree(images_dir() / made, ignore_errors=True)


@dataclass
class Project:
    pytester: pytest.Pytester
    name: str

    def declare(self, source: str) -> None:
        self.pytester.makefile(".toml", pyproject=f'[tool.smolvm.images.{self.name}]\nfrom = "{source}"\n')

    def builds(self) -> list[str]:
        return sorted(p.name for p in (images_dir() / self.name).iterdir() if not p.name.startswith((".", "cur")))


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    pytester.chdir()  # the fake driver's in-process agent leaves the process in / after a spawn
    return pytester.runpytest(*args)


def test_declared_image_is_built_on_first_use_with_progress_and_cached(project: Project, layout: Path) -> None:
    project.declare(f"oci:{layout / 'l'}:one")
    first = _run(project.pytester)
    first.assert_outcomes(passed=1)
    first.stdout.fnmatch_lines([f"smolvm: building image '{project.name}' (*) declared in *pyproject.toml",
                                f"[[]1/2[]] {project.name}: base oci:*:one (+*s)",
                                "[[]2/2[]] applying layer *",
                                f"built image '{project.name}' (*) at * in *s"])
    builds = project.builds()

    again = _run(project.pytester, "-s")
    again.assert_outcomes(passed=1)
    assert "building image" not in again.stdout.str()
    assert project.builds() == builds

    project.declare(f"oci:{layout / 'l2'}:two")  # a changed declaration
    changed = _run(project.pytester, "-s")
    changed.assert_outcomes(passed=1)
    changed.stdout.fnmatch_lines([f"smolvm: building image '{project.name}' *"])
    assert len(project.builds()) == 2


def test_header_says_a_declared_image_is_built_on_first_use(project: Project, layout: Path) -> None:
    project.declare(f"oci:{layout / 'l'}:one")
    result = _run(project.pytester, "--co", f"--smolvm-image={project.name}")
    result.stdout.fnmatch_lines([f"smolvm: image {project.name} (declared in *pyproject.toml): built on first use*"])
    assert not (images_dir() / project.name).exists()  # collecting builds nothing


def test_xdist_workers_wait_for_one_build(project: Project, layout: Path) -> None:
    pytest.importorskip("xdist")
    project.declare(f"oci:{layout / 'l'}:one")
    project.pytester.makepyfile(test_more=TEST.replace("NAME", project.name).replace("test_uses_it", "test_also"))
    result = project.pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    assert len(project.builds()) == 1


@pytest.mark.parametrize(("table", "message"), [
    ('from = "default"\npip = "six"', "pip in */pyproject.toml: expected a list of non-empty strings, got 'six'"),
    ('from = "default"\nfils = {}', "fils in */pyproject.toml: unknown key; expected from, apt, pip, files, run*"),
    ('from = "docker://debian:12"', "from in */pyproject.toml: expected \"default\", \"oci:DIR*"),
    ('from = "default"\nfiles = { "/opt/x" = "missing" }', "files in *: '/opt/x': host path */missing is not*"),
])
def test_bad_declaration_stops_the_run_naming_key_and_file(project: Project, table: str, message: str) -> None:
    project.pytester.makefile(".toml", pyproject=f"[tool.smolvm.images.{project.name}]\n{table}\n")
    result = _run(project.pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*invalid [[]tool.smolvm.images.{project.name}[]] {message}"])


def test_a_missing_default_image_is_built_on_first_use_with_progress(pytester: pytest.Pytester,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Plugin wiring only: the builder is replaced by one that announces a step and links the
    real default build into an empty cache (the real build is run by scripts/run-rootless and
    `image build`; tests/integration boots what it makes)."""
    cache = pytester.path / "fresh-cache"
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(cache))
    monkeypatch.delenv("SMOLVM_IMAGE", raising=False)
    pytester.makeconftest(FAKE_CONFTEST + f"""
import os, shutil
from pathlib import Path
from pytest_smolvm.images import build as builder
from pytest_smolvm.images.recipe import Recipe
from pytest_smolvm.images.store import resolve

def link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)

def linked_build(recipe, *, force=False, progress=print):
    progress("[1/5] (test) building the default image")
    real = Path({str(REAL_CACHE)!r}) / "images" / "default" / recipe.digest()
    shutil.copytree(real, Path({str(cache)!r}) / "images" / "default" / recipe.digest(), copy_function=link_or_copy)
    return resolve("default")

# The inner run is in this process: put the real builder back when it ends, or every later
# test in this worker would "build" by copying (seen as a unit test failing after this one).
_real_build = builder.build
builder.build = linked_build

def pytest_unconfigure(config):
    builder.build = _real_build
""")
    pytester.makepyfile("def test_it(smolvm):\n    assert smolvm.image.name == 'default'\n")
    result = _run(pytester)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["smolvm: image default (this version's build is missing): built on first use*",
                                 "smolvm: building the guest image 'default' (once; about a minute)",
                                 "[[]1/5[]] (test) building the default image"])


def test_a_failed_build_is_tried_once_per_run(project: Project, tmp_path: Path) -> None:
    (project.pytester.path / "not-a-layout").mkdir()
    project.declare("oci:not-a-layout")
    project.pytester.makepyfile(test_more=TEST.replace("NAME", project.name).replace("test_uses_it", "test_also"))
    result = _run(project.pytester)
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*ImageError: image source 'oci:*not-a-layout': * is not an OCI image layout*",
                                 f"*ImageError: image '{project.name}' could not be built earlier in this run: *"])
