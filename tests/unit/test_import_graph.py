"""The package's import graph has no cycle, TYPE_CHECKING and function-level imports included
(issue 13: each concept has one owner, and owners do not lean on each other both ways)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "pytest_smolvm"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of the package that ``name`` imports anywhere in its source."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, *([node.module] if node.module else [])])
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            # `from pkg import submodule` depends on the submodule, not on pkg's __init__.
            targets = subs + ([base] if len(subs) < len(node.names) else [])
        for target in targets:
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules and target != name:
                found.add(target)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_import_graph_is_acyclic() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert len(graph) > 30 and graph["pytest_smolvm.vm"]  # the graph really was read
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _package_of(module: str) -> str:
    """A subpackage (``pytest_smolvm.images``) stands for all its modules; a top-level module
    (``pytest_smolvm.vm``) for itself."""
    parts = module.split(".")
    return ".".join(parts[:2])


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for name, targets in graph.items():
        src = _package_of(name)
        out.setdefault(src, set()).update(_package_of(t) for t in targets if _package_of(t) != src)
    return out


def test_no_import_loop_between_packages() -> None:
    """images -> vm -> images was such a loop: image provisioning imported the VM handle. A
    subpackage is one node here, so no module of it may lean on a module that leans back on it."""
    modules = _modules()
    graph = package_graph({name: _imports(name, path, modules) for name, path in modules.items()})
    assert {"pytest_smolvm.images", "pytest_smolvm.drivers", "pytest_smolvm.vm"} <= set(graph)
    cycle = _cycle(graph)
    assert cycle is None, "package import cycle: " + " -> ".join(cycle or [])


def test_package_graph_collapses_subpackages() -> None:
    graph = package_graph({"p.images.provision": {"p.vm"}, "p.vm": {"p.images.store"}, "p.images.store": set()})
    assert _cycle(graph) == ["p.images", "p.vm", "p.images"]


def test_only_the_session_knows_the_channel_layer() -> None:
    """Outside guest/, only session.py imports guest.channel (its errors are mapped there, in
    one place), and the package builds a GuestClient in exactly one place."""
    modules = _modules()
    importers = {name for name, path in modules.items()
                 if "pytest_smolvm.guest.channel" in _imports(name, path, modules)
                 and not name.startswith("pytest_smolvm.guest")}
    assert importers == {"pytest_smolvm.session"}
    built = [f"{path.name}:{n}" for path in PACKAGE.rglob("*.py")
             for n, line in enumerate(path.read_text().splitlines(), 1) if "GuestClient(" in line]
    assert built == [built[0]] and built[0].startswith("session.py:"), built
