"""The dependency rules of ../shared/STYLE.md, checked on the import graph (not left to review).

1. imdsd.imds never reaches imdsd.backends, imdsd.scheduler, imdsd.etcd or imdsd.daemon,
   directly or through another module: the request path cannot wait on an issuer or on etcd
   it cannot reach.
2. model, errors and clock import no aiohttp (domain logic runs without an event loop).
3. Nothing imports daemon or cli except cli and __main__.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "imdsd"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


GRAPH = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in GRAPH.get(todo.pop(), set()):
            if target in GRAPH and target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_guest_api_cannot_reach_backends_or_scheduler() -> None:
    """Rule 1, transitively, for every module of imdsd.imds."""
    forbidden = ("imdsd.backends", "imdsd.scheduler", "imdsd.daemon", "imdsd.cli", "imdsd.fleet")
    for module in (m for m in GRAPH if m.startswith("imdsd.imds")):
        bad = {m for m in reachable(module) if m.startswith(forbidden)}
        assert not bad, f"{module} reaches {sorted(bad)}"


def test_domain_leaves_import_no_aiohttp() -> None:
    """Rule 2: the domain's leaves are free of the HTTP framework, directly and transitively."""
    for module in (
        "imdsd.model",
        "imdsd.errors",
        "imdsd.clock",
        "imdsd.sessions",
        "imdsd.tokens",
        "imdsd.inventory",
        "imdsd.budgets",
    ):
        names = GRAPH[module] | {i for m in reachable(module) for i in GRAPH[m]}
        assert not {n for n in names if n.split(".")[0] == "aiohttp"}, module


def test_errors_is_a_leaf() -> None:
    """errors.py imports nothing from imdsd (no import loops through the exception types)."""
    assert not {n for n in GRAPH["imdsd.errors"] if n.startswith("imdsd")}


def test_nothing_imports_the_composition_root() -> None:
    """Rule 3: daemon and cli sit on top; only cli and __main__ import them."""
    for module, names in GRAPH.items():
        if not module.startswith(("imdsd.cli", "imdsd.__main__")):
            assert not {n for n in names if n.startswith(("imdsd.daemon", "imdsd.cli"))}, module


def test_graph_is_not_empty() -> None:
    """The walk found the package (guards the rules above against vacuous passes)."""
    assert "imdsd.imds.handlers" in GRAPH and "imdsd.scheduler" in reachable("imdsd.daemon")
