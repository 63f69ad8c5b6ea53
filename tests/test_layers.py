"""Each layer imports only the layers below it, and no two modules import each other.

The layers, bottom to top (``docs/README.md`` draws them)::

    bench                      benchmarks
    tisa_cli                   the ``tisa`` command line and the demo
    tisa_testing               the hostile-relay harness and the pytest plugin
    relay | clients            the relay; the member library (side by side)
    tisa_io                    the shared trio layer: link, durable store, files
    tisa                       the sans-IO protocol core

Imports are read from the source with :mod:`ast` (module level and inside functions, so a
lazy import counts too), without importing anything. ``relay`` and ``clients`` share a
layer and may not import each other. A cycle between two modules (``a`` imports ``b`` and
``b`` imports ``a``, directly or through others) is refused in every package, including
the tests' helpers and the benchmarks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: package -> layer number; a module may import its own layer's package and lower layers.
LAYERS: dict[str, int] = {
    "tisa": 0,
    "tisa_io": 1,
    "relay": 2,
    "clients": 2,
    "tisa_testing": 3,
    "tisa_cli": 4,
    "bench": 5,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, source: str | None = None) -> set[str]:
    """The absolute names of the project's modules that ``path`` imports (any depth);
    ``source`` instead of the file's text, if given."""
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            # ``from pkg import mod`` imports the module pkg.mod when there is one.
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] in LAYERS}


def project_modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            modules[_module_name(path)] = path
    return modules


def graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports (names that are not modules dropped)."""
    return {
        name: {m for m in imports_of(path) if m in modules and m != name}
        for name, path in modules.items()
    }


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in sorted(edges.items()):
        top = module.split(".")[0]
        for target in sorted(targets):
            other = target.split(".")[0]
            if other == top:
                continue
            if LAYERS[other] >= LAYERS[top]:
                found.append(
                    f"{module} (layer {LAYERS[top]}) imports {target} (layer {LAYERS[other]})"
                )
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def _package_init(name: str) -> bool:
    return name in LAYERS


def test_the_walk_finds_every_layer() -> None:
    modules = project_modules()
    for name in ("tisa.keys", "tisa_io.link", "relay.server", "clients.node", "tisa_cli.commands"):
        assert name in modules


def test_no_module_imports_a_layer_above_its_own() -> None:
    assert layer_violations(graph(project_modules())) == []


def test_no_two_modules_import_each_other() -> None:
    edges = graph(project_modules())
    # A package's __init__ re-exports its modules; a module importing a name from its
    # own package's __init__ is an edge back to it, which is no layering problem.
    for name in list(edges):
        edges[name] = {
            t for t in edges[name] if not (_package_init(t) and name.startswith(t + "."))
        }
    assert cycles(edges) == []


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("tisa.keys", "from relay.server import serve\n", "imports relay.server"),
        ("tisa_io.link", "import clients.node\n", "imports clients.node"),
        ("relay.server", "from clients.node import open_node\n", "imports clients.node"),
        ("clients.node", "def f():\n    from relay import server\n", "imports relay.server"),
        ("tisa_testing.world", "from tisa_cli.commands import main\n", "imports tisa_cli"),
    ],
)
def test_an_upward_import_is_caught(module: str, source: str, expected: str) -> None:
    modules = project_modules()
    edges = graph(modules)
    added = {m for m in imports_of(modules[module], source) if m in modules}
    edges[module] = edges[module] | added
    assert any(expected in line for line in layer_violations(edges))


def test_a_cycle_is_caught() -> None:
    edges = graph(project_modules())
    edges["tisa.errors"] = edges["tisa.errors"] | {"tisa.keys"}
    edges["tisa.keys"] = edges["tisa.keys"] | {"tisa.errors"}
    assert any({"tisa.errors", "tisa.keys"} <= set(c) for c in cycles(edges))


def test_every_module_says_what_it_exports() -> None:
    # ``__all__`` on every module of every layer, and each name in it defined there.
    missing = []
    for name, path in project_modules().items():
        tree = ast.parse(path.read_text())
        exported = None
        defined: set[str] = set()
        for node in tree.body:
            targets = []
            if isinstance(node, ast.Assign):
                targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                targets = [node.target.id]
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                targets = [node.name]
            elif isinstance(node, ast.ImportFrom | ast.Import):
                targets = [(a.asname or a.name).split(".")[0] for a in node.names]
            defined.update(targets)
            if "__all__" in targets and node.value is not None:  # type: ignore[union-attr]
                exported = ast.literal_eval(node.value)  # type: ignore[union-attr]
        if exported is None:
            missing.append(f"{name}: no __all__")
            continue
        missing.extend(
            f"{name}: __all__ names undefined {n!r}" for n in exported if n not in defined
        )
    assert missing == []
