"""The import structure, read from the source with `ast` (every import, also those inside functions).

flows > tasks > gptoss_model; inside the library: the facade (AutoBridge, recipes, the
training entry) > stage modules (convert, export, verify, training) > readers and writers
(checkpoint, hub, data) > the model > plumbing (errors, settings, system). Nothing imports
upwards, nothing imports in a circle, and the library never imports Prefect.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gptoss_model", "tasks", "flows")

# (module prefix, layer): the longest matching prefix decides; higher layers may import lower ones.
LAYERS = [
    ("gptoss_model.errors", 0), ("gptoss_model.settings", 0), ("gptoss_model.system", 0),
    ("gptoss_model.model", 1),
    ("gptoss_model.checkpoint", 2), ("gptoss_model.hub", 2), ("gptoss_model.data", 2),
    ("gptoss_model.convert", 3), ("gptoss_model.export", 3), ("gptoss_model.verify", 3),
    ("gptoss_model.training", 3),
    ("gptoss_model", 4),  # the facade: the package itself, bridge, recipes, train
    ("tasks.store", 10), ("tasks.kinds", 10), ("tasks.common", 11), ("tasks.stage", 12), ("tasks.lineage", 13),
    ("tasks", 14),  # the stage modules
    ("flows.local_server", 20), ("flows.terminal", 20), ("flows.stage_cli", 21), ("flows", 22), ("flows.pipeline", 23), ("flows.cli", 24),
]


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    named: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            named |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            named.add(base)
            named |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in named if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer_of(module: str) -> int:
    best = max((p for p, _ in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return dict(LAYERS)[best]


def test_no_module_imports_a_higher_layer():
    upward = [f"{a} (layer {_layer_of(a)}) imports {b} (layer {_layer_of(b)})"
              for a, targets in sorted(GRAPH.items()) for b in sorted(targets) if _layer_of(b) > _layer_of(a)]
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_no_import_cycles():
    """Tarjan's strongly connected components over the module graph: every one is a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


def test_the_library_never_imports_prefect():
    offenders = []
    for name, path in MODULES.items():
        if not name.startswith("gptoss_model"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{name}: {m}" for m in mods if m.split(".")[0] in ("prefect", "tasks", "flows")]
    assert not offenders, offenders


BACKEND_MODULES = {f"tasks.store.{name}" for name in ("base", "local", "s3", "fsspec_backend", "backends")}


def _class_names(node: ast.expr) -> list[str]:
    if isinstance(node, ast.Tuple):
        return [n for elt in node.elts for n in _class_names(elt)]
    if isinstance(node, ast.Attribute):
        return [node.attr]
    return [node.id] if isinstance(node, ast.Name) else []


def test_no_isinstance_on_a_backend_class_outside_the_backends():
    """Backend differences are members of the `Backend` protocol, not class checks at the call site."""
    found = []
    for name, path in sorted(MODULES.items()):
        if name in BACKEND_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance"
                    and len(node.args) == 2 and any(n.endswith("Backend") for n in _class_names(node.args[1]))):
                found.append(f"{name}:{node.lineno}")
    assert found == [], f"ask the backend (a Backend member) instead of checking its class: {found}"


def test_the_library_top_holds_its_entry_points_only():
    top = sorted(p.stem for p in (ROOT / "gptoss_model").glob("*.py"))
    print(f"\ngptoss_model/ top: {top}; subpackages: "
          f"{sorted(p.name for p in (ROOT / 'gptoss_model').iterdir() if (p / '__init__.py').is_file())}")
    assert len(top) <= 8, top


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("gptoss_model")))
def test_every_library_module_has_a_layer(module):
    assert any(module == p or module.startswith(p + ".") for p, _ in LAYERS)
