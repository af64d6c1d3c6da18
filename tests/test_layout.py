"""The architecture holds: imports point down (no circles), shared code names no family or method."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).parent.parent / "src" / "difftune"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """difftune modules `path` imports (outside ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text())
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and not (top_level_only and nested):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.startswith("difftune"):
                    found.add(target)
                    found.update(f"{target}.{a.name}" for a in child.names)
            elif isinstance(child, ast.Import) and not (top_level_only and nested):
                found.update(a.name for a in child.names if a.name.startswith("difftune"))
            visit(child, inner)

    visit(tree, False)
    return found


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    return {name: {t for t in _imports(path, top_level_only) if t in files and t != name}
            for name, path in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := walk(node)):
            return found
    return None


def test_no_import_circles_at_import_time():
    assert _cycle(_graph(top_level_only=True)) is None


@pytest.mark.parametrize("source, target", [
    ("difftune.families", "difftune.export"),      # families name their kohya layout through formats/
    ("difftune.formats", "difftune.families"),     # formats know no family
    ("difftune.data.hf", "difftune.data.dataset"),  # one direction: dataset -> hf -> items
    ("difftune.data", "difftune.families"),        # the data layer is below the families
    ("difftune.methods", "difftune.train"),
])
def test_imports_point_down(source, target):
    graph = _graph(top_level_only=False)
    up = sorted(f"{a} -> {b}" for a, deps in graph.items() if a.startswith(source)
                for b in deps if b.startswith(target))
    assert up == []


#: shared modules: they reach families and methods through the registries only
SHARED = ["train.py", "tiny.py", "bench/cli.py", "bench/cases.py", "bench/measure.py", "bench/runners.py",
          "export.py", "config.py", "speed.py", "report.py", "checkpoint.py", "commands.py", "families/base.py",
          "formats/kohya.py", "data/cache.py", "data/dataset.py", "data/check.py"]


def test_shared_code_names_no_family_or_method():
    from difftune.families.registry import FAMILIES, folders
    from difftune.methods import METHODS

    def pattern(names) -> re.Pattern:
        names = "|".join(sorted(names, key=len, reverse=True))
        return re.compile(r"""(==|!=|\bin\b)\s*\(?\s*["'](%s)["']|["'](%s)["']\s*:""" % (names, names))

    family, method = pattern({*FAMILIES, *folders()}), pattern(METHODS)
    hits = []
    for rel in SHARED:
        for i, line in enumerate((SRC / rel).read_text().splitlines(), 1):
            # method names are also words of other settings (speed.compile=full): only where a method is meant
            if family.search(line) or (method.search(line) and re.search(r"method|kind", line)):
                hits.append(f"{rel}:{i}: {line.strip()}")
    assert hits == []
