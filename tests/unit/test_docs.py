"""The README is a front page into docs/: short, and every link in it (and in SECURITY.md)
leads somewhere. The docs themselves are checked by their strict build (scripts/build-docs):
a broken cross-reference, a missing anchor or a page outside the toctree fails it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def github_slug(heading: str) -> str:
    """The anchor GitHub (and MyST's heading anchors) give a heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(md: Path) -> set[str]:
    text = FENCE.sub("", md.read_text())
    found = {github_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}
    found |= set(re.findall(r"^\(([\w-]+)\)=$", text, re.M))  # MyST targets
    return found


def links(md: Path) -> list[str]:
    return [m.group(1) for m in LINK.finditer(FENCE.sub("", md.read_text()))]


def test_readme_is_a_front_page() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_links_every_docs_page() -> None:
    linked = {Path(t.split("#")[0]).name for t in links(ROOT / "README.md") if t.startswith("docs/")}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"index.md", "security.md"}
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"


@pytest.mark.parametrize("name", ["README.md", "SECURITY.md"])
def test_relative_links_resolve(name: str) -> None:
    source = ROOT / name
    targets = [t for t in links(source) if not re.match(r"[a-z]+:", t)]
    assert targets, f"{name} links nothing"
    for target in targets:
        path, _, anchor = target.partition("#")
        dest = (source.parent / path).resolve() if path else source
        assert dest.exists(), f"{name}: link to {target!r}: no such file"
        if anchor:
            assert anchor in anchors(dest), f"{name}: link to {target!r}: no such heading in {dest.name}"
