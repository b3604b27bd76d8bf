"""Backend differences stay behind the `Backend` protocol, and the store's modules import without a cycle."""
from __future__ import annotations

import ast
from pathlib import Path

TASKS = Path(__file__).resolve().parents[2] / "tasks"
STORE = TASKS / "store"
BACKEND_MODULES = {STORE / f"{name}.py" for name in ("base", "local", "s3", "fsspec_backend", "backends")}


def _names(node: ast.expr) -> list[str]:
    if isinstance(node, ast.Tuple):
        return [n for elt in node.elts for n in _names(elt)]
    if isinstance(node, ast.Attribute):
        return [node.attr]
    return [node.id] if isinstance(node, ast.Name) else []


def test_no_isinstance_on_a_backend_class_outside_the_backends():
    found = []
    for path in sorted(set(TASKS.rglob("*.py")) - BACKEND_MODULES):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance"
                    and len(node.args) == 2 and any(n.endswith("Backend") for n in _names(node.args[1]))):
                found.append(f"{path.relative_to(TASKS.parent)}:{node.lineno}")
    assert found == [], "ask the backend (a Backend member) instead of checking its class"


def _store_imports(path: Path) -> set[str]:
    """Modules of tasks.store that `path` imports anywhere (also inside functions)."""
    modules = {p.stem for p in STORE.glob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level == 1 or base.startswith("tasks.store"):
                base = base.removeprefix("tasks.store").strip(".") if node.level == 0 else base
                found |= {base.split(".")[0]} if base else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] for a in node.names if a.name.startswith("tasks.store.")}
    return found & modules - {"__init__"}


def test_the_store_package_has_no_import_cycle():
    graph = {p.stem: _store_imports(p) for p in STORE.glob("*.py") if p.stem != "__init__"}
    assert graph["claims"] and "base" in graph["s3"]  # the scan sees relative imports

    def cycle_from(module: str, path: tuple[str, ...]) -> tuple[str, ...] | None:
        if module in path:
            return (*path[path.index(module):], module)
        return next((c for dep in sorted(graph[module]) if (c := cycle_from(dep, (*path, module)))), None)

    cycles = [c for m in sorted(graph) if (c := cycle_from(m, ()))]
    assert cycles == [], f"import cycle: {' -> '.join(cycles[0])}"
