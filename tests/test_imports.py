"""No import circle inside ``ssvp/``, counting imports inside functions too (a lazy import
hides a circle from Python at import time, not from a reader), and the layering of
DESIGN.md: ``ssvp`` imports neither Ray nor MLflow."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "ssvp"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of import nodes under ``if TYPE_CHECKING:`` (never executed)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    return skip


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(ssvp modules ``name`` imports anywhere in its file, top-level names of other packages)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skip = _type_checking_only(tree)
    inner, outer = set(), set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] == "ssvp":
                while t not in modules and "." in t:  # ``import ssvp.x.y as z`` of a name in a module
                    t = t.rpartition(".")[0]
                if t != name:
                    inner.add(t)
            else:
                outer.add(t.split(".")[0])
    return inner, outer


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _graph():
    modules = _modules()
    inner, outer = {}, {}
    for name, path in modules.items():
        inner[name], outer[name] = imports_of(name, path, modules)
    return inner, outer


def _package_edges_removed(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A module's import of its own package's ``__init__`` (``from . import x``) is how
    Python packages work, not a circle of the code: drop edges to an enclosing package."""
    return {a: {b for b in bs if not a.startswith(b + ".")} for a, bs in graph.items()}


def test_find_cycle_detects_a_circle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_lazy_imports_are_seen(tmp_path):
    # the walker must see an import inside a function (how the meta/readers circle hid)
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from .other import g\n    return g\n")
    inner, _ = imports_of("ssvp.pkg.m", f, {"ssvp.pkg.other": f})
    assert inner == {"ssvp.pkg.other"}


def test_no_import_circle_in_ssvp():
    inner, _ = _graph()
    assert len(inner) > 20  # the walk found the package
    cycle = find_cycle(_package_edges_removed(inner))
    assert cycle is None, "import circle in ssvp/: " + " -> ".join(cycle)


def test_ssvp_imports_neither_ray_nor_mlflow():
    _, outer = _graph()
    bad = {m: sorted(o & {"ray", "mlflow"}) for m, o in outer.items() if o & {"ray", "mlflow"}}
    assert not bad, f"ssvp/ must not import Ray or MLflow: {bad}"
