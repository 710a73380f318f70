"""The import graph of the two packages: no cycle, and the layers point one way.

Every ``import`` is counted, at module level or inside a function (a deferred import that closes a cycle is
still a cycle to a reader). ``grass_ops`` (the ops) never imports ``attribution``; the attribution pipeline
never imports its LLM application or its evaluation harnesses.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("grass_ops", "attribution")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def runtime_nodes(tree: ast.AST):
    """Every node, except inside ``if TYPE_CHECKING:`` blocks (annotations only, never imported)."""
    for child in ast.iter_child_nodes(tree):
        test = getattr(child, "test", None) if isinstance(child, ast.If) else None
        if test is not None and "TYPE_CHECKING" in ast.unparse(test):
            yield from (n for orelse in child.orelse for n in [orelse, *runtime_nodes(orelse)])
            continue
        yield child
        yield from runtime_nodes(child)


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules that ``name`` imports: ``from x import y`` counts x.y where it is a module, else x."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            subs = [f"{base}.{alias.name}" for alias in node.names]
            # `from . import x` imports the package itself only for names that are not its submodules
            targets = [s for s in subs if s in known] + ([base] if any(s not in known for s in subs) else [])
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` where only a.b is ours
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_relative_and_deferred_imports():
    edges = graph()
    assert "attribution.attributor" in edges["attribution"]  # from .attributor import ...
    assert "grass_ops.compressors" in edges["attribution.compression"]


def test_no_import_cycle():
    assert cycle(graph()) is None, f"import cycle: {' -> '.join(cycle(graph()))}"


@pytest.mark.parametrize("importer, forbidden", [
    ("grass_ops", "attribution"),
    ("attribution", "attribution.llm"),
    ("attribution", "attribution.evaluation"),
    ("attribution", "attribution.integrations"),
])
def test_layers_point_one_way(importer, forbidden):
    """The ops know nothing of attribution; the pipeline knows nothing of its applications (the package
    __init__ files, the old-name table and the applications themselves aside: llm, evaluation, integrations)."""
    allowed = ("attribution.llm", "attribution.evaluation", "attribution.integrations", "attribution._moved")
    offenders = []
    for name, targets in graph().items():
        if not (name == importer or name.startswith(importer + ".")) or name == "attribution":
            continue
        if importer == "attribution" and name.startswith(allowed):
            continue
        offenders += [f"{name} -> {t}" for t in targets if t == forbidden or t.startswith(forbidden + ".")]
    assert not offenders, offenders
