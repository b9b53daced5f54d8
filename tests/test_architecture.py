"""The layout is the architecture: layers import only layers below them, no module is in an import circle, and
no module-level import hides after code (the usual way to dodge a circle)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cache_schema", "kd", "stages", "pipeline", "bench")


def test_import_linter_contracts_hold():
    """The contracts in pyproject.toml: bench > pipeline > stages > kd > cache_schema, kd's own layers, and
    recipes that never import each other."""
    lint_imports = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint_imports), str(REPO / "pyproject.toml")], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "broken" in done.stdout and "0 broken" in done.stdout


def _strongly_connected(graph: grimp.ImportGraph) -> list[set[str]]:
    """Tarjan's algorithm over the module import graph; components with more than one module are circles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[set[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == module:
                    break
            if len(component) > 1:
                circles.append(component)

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return circles


def test_no_import_circles():
    graph = grimp.build_graph(*PACKAGES)
    assert _strongly_connected(graph) == []


def _late_module_imports(path: Path) -> list[int]:
    """Line numbers of module-level imports that come after a statement other than imports, the docstring,
    ``if TYPE_CHECKING:`` blocks and ``try: import ... except ImportError`` guards."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    late, code_seen = [], False
    for position, node in enumerate(tree.body):
        is_docstring = position == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        is_guard = isinstance(node, ast.Try) and all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in node.body)
        is_type_checking = isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        if isinstance(node, (ast.Import, ast.ImportFrom)) or is_guard or is_type_checking:
            if code_seen:
                late.append(node.lineno)
        elif not is_docstring:
            code_seen = True
    return late


def test_module_imports_come_before_code():
    offenders = {str(path.relative_to(REPO)): lines for package in PACKAGES
                 for path in sorted((REPO / package).rglob("*.py")) if (lines := _late_module_imports(path))}
    assert offenders == {}


def test_a_late_import_is_detected(tmp_path):
    """The check above can fail: an import placed after code is found."""
    module = tmp_path / "late.py"
    module.write_text('"""doc."""\nimport os\n\nVALUE = 1\n\nimport sys  # noqa: E402\n')
    assert _late_module_imports(module) == [6]


def test_a_circle_is_detected():
    """The circle finder can fail: a → b → c → a is one component, d (imported, importing nothing) is not."""
    graph = grimp.ImportGraph()
    for importer, imported in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.a", "p.d")):
        graph.add_import(importer=importer, imported=imported)
    assert _strongly_connected(graph) == [{"p.a", "p.b", "p.c"}]
