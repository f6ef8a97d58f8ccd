"""The suite's own layout: pytest imports test modules by basename (rootdir-relative
``prepend`` mode), so two test files with one name in different folders stop the whole
collection ("import file mismatch"). It happened twice when branches met: keep them unique."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_test_module_basenames_are_unique() -> None:
    names = Counter(p.name for folder in ("tests", "examples") for p in (ROOT / folder).rglob("test_*.py"))
    assert len(names) > 50  # the tree really was read
    assert [name for name, n in names.items() if n > 1] == []
