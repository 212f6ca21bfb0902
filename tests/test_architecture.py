"""The layout stays true: no import circles, no borrowed private names, no test-kit in
the product. The layering contracts themselves are import-linter contracts in
pyproject.toml (`lint-imports`, run by scripts/test); these are the rules import-linter
has no contract type for."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("ledger", "edge_agent", "hub")


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    # Imports under `if TYPE_CHECKING:` never run, so they cannot form a circle at import time.
    return grimp.build_graph(*PRODUCT, "testkit", cache_dir=None,
                             exclude_type_checking_imports=True)


def strongly_connected(graph: grimp.ImportGraph) -> list[list[str]]:
    """Tarjan's algorithm over the module graph; every component of two or more modules
    is an import circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(root: str) -> None:
        nonlocal counter
        # iterative DFS: the graph is deep enough to matter for recursion limits
        work: list[tuple[str, list[str]]] = []
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        work.append((root, sorted(graph.find_modules_directly_imported_by(root))))
        while work:
            node, todo = work[-1]
            if todo:
                nxt = todo.pop()
                if nxt not in graph.modules:
                    continue
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(graph.find_modules_directly_imported_by(nxt))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_circles(graph: grimp.ImportGraph) -> None:
    """Imports inside functions count too: a lazy import that hides a circle is still one."""
    circles = strongly_connected(graph)
    assert circles == [], "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def _private_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] not in (*PRODUCT, "testkit"):
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} "
                               f"from {node.module} import {alias.name}")
    return bad


def test_no_module_imports_another_modules_private_names() -> None:
    """A leading underscore means "only this module": what another module needs is public
    (and so documented and typed as such)."""
    files = [p for d in (*PRODUCT, "testkit", "tests", "scripts") for p in (ROOT / d).rglob("*.py")]
    bad = [line for p in files for line in _private_imports(p)]
    assert bad == []


HUB_SERVICE_PRIVATES = ("_dispatch", "_append", "_put_assignment", "_bootstrap_admin",
                        "_handle_report", "_write_lock", "_read")


def test_no_test_reaches_into_the_hub_service() -> None:
    """Tests drive the hub through its public seams (Router, LedgerWriter, the NATS API)."""
    bad = []
    for path in (ROOT / "tests").rglob("*.py"):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for name in HUB_SERVICE_PRIVATES:
                if f".{name}(" in line or f".{name} " in line or line.rstrip().endswith(f".{name}"):
                    bad.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert bad == []
