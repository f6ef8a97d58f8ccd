"""No function in the package is over 60 lines, def line to last line (issue 13: a longer one
does several jobs; split it into steps). Complexity is ruff's C901, set in pyproject.toml."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "pytest_smolvm"
MAX_LINES = 60


def too_long(root: Path) -> list[str]:
    """``file:line name (n lines)`` of every function or method under ``root`` over the limit."""
    found = []
    for path in sorted(root.rglob("*.py")):
        funcs = [n for n in ast.walk(ast.parse(path.read_text(), str(path)))
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for node in sorted(funcs, key=lambda n: n.lineno):
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            if lines > MAX_LINES:
                found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_is_over_60_lines() -> None:
    assert too_long(PACKAGE) == [], f"functions over {MAX_LINES} lines; split them into steps"


def test_the_check_names_methods_and_nested_functions_over_the_limit(tmp_path: Path) -> None:
    def body(n: int, indent: str) -> str:  # n lines with the def
        return "\n".join(f"{indent}x{i} = {i}" for i in range(n - 1))

    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "mod.py").write_text(
        f"class C:\n    @property\n    def long(self):\n{body(61, '        ')}\n\n"
        f"def fits():\n{body(60, '    ')}\n\n"
        f"def outer():\n    async def inner():\n{body(61, '        ')}\n"
    )
    assert too_long(pkg) == ["pkg/mod.py:3 long (61 lines)", "pkg/mod.py:126 outer (62 lines)",
                             "pkg/mod.py:127 inner (61 lines)"]
