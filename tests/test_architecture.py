"""The package's imports point one way: no import cycle, no arrow to a higher layer.

Static: every module of ``src/optishear_lightning`` is parsed with :mod:`ast`, never imported.
Every import counts (absolute or relative, at module level or inside a function or method,
under ``if TYPE_CHECKING`` too), because a lazy import is still a dependency.

Layers, top to bottom (a module may import its own layer and the layers below it)::

    cli                                  the command line
    Lightning glue                       callback, module, datamodule
    search                               search/*
    engine                               every other module (models, data, calibration,
                                         metrics, masks, pruning, dispatch, export, ...)
    kernels                              kernels/*: Triton launchers and PyTorch twins

The package root re-exports the Lightning glue, so it counts as the top layer: no module of
the package may import it. Package ``__init__`` files and deprecated shims (re-exports) are
exempt from the layer rule; for cycles only their module-level imports count (their lazy
re-exports run after every module has loaded).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "optishear_lightning"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE

#: Layers from the bottom up: a module may import only its own layer and lower ones.
LAYERS = ("kernels", "engine", "search", "glue", "cli")
GLUE = frozenset({"callback", "callback_settings", "module", "datamodule", "loggers"})

#: Deprecated re-export modules (like package ``__init__`` files, exempt from the layer rule).
SHIMS = frozenset({f"{PACKAGE}.finetuning", f"{PACKAGE}.kernels._deprecated"})

#: Known violations in modules that are being reworked elsewhere, each one edge
#: ``(importer, imported)`` with who fixes it. An entry whose edge is gone fails
#: test_allow_list_is_current, so the list only shrinks.
ALLOWED: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Edge:
    """One import statement of ``source`` that loads ``target``."""

    source: str
    target: str
    path: str
    line: int
    eager: bool  # at module level (runs when ``source`` is imported), not inside a function

    def __str__(self) -> str:
        when = "" if self.eager else " (inside a function)"
        return (
            f"{self.path}:{self.line}: {short(self.source)} [{layer(self.source)}] imports "
            f"{short(self.target)} [{layer(self.target)}]{when}"
        )


def short(module: str) -> str:
    return module.removeprefix(f"{PACKAGE}.") if module != PACKAGE else f"{PACKAGE} (root)"


def discover(src: Path) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` file of the package in ``src``."""
    modules = {}
    for path in sorted(src.rglob("*.py")):
        parts = list(path.relative_to(src.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = discover(SRC)


def exempt(module: str) -> bool:
    return MODULES[module].name == "__init__.py" or module in SHIMS


def layer(module: str) -> str:
    if module == PACKAGE:
        return "cli"  # the root re-exports the glue: importing it is importing the top
    top = module.split(".")[1]
    if top == "cli":
        return "cli"
    if top in GLUE:
        return "glue"
    if top in ("search", "kernels"):
        return top
    return "engine"


def height(module: str) -> int:
    return LAYERS.index(layer(module))


def _targets(module: str, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> list[str]:
    """The package's modules that an import statement of ``module`` loads."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
        # "import a.b.c" loads a.b.c; keep the longest prefix that is one of our modules.
        found = []
        for name in names:
            parts = name.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            if parts:
                found.append(".".join(parts))
        return found
    if node.level:
        package = modules[module].name == "__init__.py"
        base = module.split(".") if package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        if node.module:
            base += node.module.split(".")
        base_name = ".".join(base)
    else:
        base_name = node.module or ""
    if base_name not in modules:
        return []  # another package (torch, ...), or nothing that exists
    # "from pkg import name": the submodule pkg.name if there is one, else pkg itself.
    return [
        f"{base_name}.{alias.name}" if f"{base_name}.{alias.name}" in modules else base_name
        for alias in node.names
    ]


def imports_of(module: str, modules: dict[str, Path]) -> list[Edge]:
    """Every import of ``module`` that loads another module of the package."""
    path = modules[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    root = path.parents[len(module.split(".")) - (path.name != "__init__.py")]
    rel = str(path.relative_to(root.parent))
    edges = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in dict.fromkeys(_targets(module, node, modules)):  # once a statement
                if target != module:
                    edges.append(Edge(module, target, rel, node.lineno, not in_function))
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return edges


EDGES = [edge for module in MODULES for edge in imports_of(module, MODULES)]


def _allowed(edge: Edge) -> bool:
    return (edge.source, edge.target) in ALLOWED


def upward_edges() -> list[Edge]:
    return [
        e
        for e in EDGES
        if not exempt(e.source) and height(e.target) > height(e.source) and not _allowed(e)
    ]


def cycle_graph() -> list[Edge]:
    """The edges that can close an import loop (see the module docstring)."""
    return [e for e in EDGES if (e.eager or not exempt(e.source)) and not _allowed(e)]


def strongly_connected(edges: list[Edge]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module, sorted."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(found)


def test_every_module_is_parsed_and_layered():
    assert f"{PACKAGE}.kernels.fused" in MODULES and f"{PACKAGE}.dispatch" in MODULES
    assert EDGES, "no imports found: the walker is broken"
    for module in MODULES:
        assert layer(module) in LAYERS


def test_no_import_cycles():
    edges = cycle_graph()
    problems = []
    for component in strongly_connected(edges):
        inside = [str(e) for e in edges if e.source in component and e.target in component]
        problems.append(
            f"import cycle among {', '.join(map(short, component))}:\n    " + "\n    ".join(inside)
        )
    assert not problems, "\n".join(problems)


def test_no_upward_imports():
    problems = [str(e) for e in upward_edges()]
    assert not problems, (
        f"imports against the layers ({' < '.join(LAYERS)}; move the code down, or pass "
        "values down instead of importing up):\n  " + "\n  ".join(problems)
    )


def test_kernels_are_leaves():
    # Implied by the layers, said once more for the most important rule: the kernels import
    # only PyTorch, Triton, the standard library and each other.
    outside = [
        str(e)
        for e in EDGES
        if layer(e.source) == "kernels"
        and not exempt(e.source)
        and layer(e.target) != "kernels"
        and not _allowed(e)
    ]
    assert not outside, "\n".join(outside)


def test_allow_list_is_current():
    # A fixed violation must leave the list too, or the list would hide its return.
    present = {(e.source, e.target) for e in EDGES}
    stale = [f"{short(s)} -> {short(t)}" for s, t in sorted(ALLOWED) if (s, t) not in present]
    assert not stale, "these imports are gone, remove them from ALLOWED: " + ", ".join(stale)


def test_the_walker_sees_every_kind_of_import(tmp_path):
    # Relative and absolute, "from . import submodule", and imports inside functions.
    pkg = tmp_path / PACKAGE
    (pkg / "kernels").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "kernels" / "__init__.py").write_text("")
    (pkg / "kernels" / "leaf.py").write_text(
        "import torch\ndef f():\n    from .. import metrics\n    import optishear_lightning.cli\n"
    )
    (pkg / "metrics.py").write_text("from .kernels import leaf\nfrom . import cli\n")
    (pkg / "cli.py").write_text("from optishear_lightning.metrics import x\n")
    modules = discover(pkg)
    edges = [e for m in modules for e in imports_of(m, modules)]
    found = {(short(e.source), short(e.target), e.eager) for e in edges}
    assert found == {
        ("kernels.leaf", "metrics", False),
        ("kernels.leaf", "cli", False),
        ("metrics", "kernels.leaf", True),
        ("metrics", "cli", True),
        ("cli", "metrics", True),
    }
    assert strongly_connected(edges) == [
        [f"{PACKAGE}.cli", f"{PACKAGE}.kernels.leaf", f"{PACKAGE}.metrics"]
    ]


def test_only_the_glue_and_the_cli_import_lightning():
    """The engine, the search and the kernels are framework-free (usable without Lightning)."""
    offenders = []
    for module, path in MODULES.items():
        if layer(module) in ("glue", "cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )  # fmt: skip
            offenders += [f"{short(module)}: {n}" for n in names if n.split(".")[0] in
                          ("lightning", "pytorch_lightning")]  # fmt: skip
    assert not offenders, "Lightning imported below the glue: " + ", ".join(offenders)
