"""The dependency rules of ../shared/STYLE.md and README's Layout, checked on the import graph
(not left to review). Every import counts: absolute, relative, inside functions and under
TYPE_CHECKING (a type-only import is still an arrow a reader follows).

1. Each module imports only modules of its own layer or of the layers below it (LAYERS).
2. No import circle, inside a layer either.
3. imdsd.imds and imdsd.admin never reach imdsd.backends, imdsd.scheduler, imdsd.fleet or the
   composition root, directly or through another module: the request path and the operator's
   API cannot wait on an issuer or on etcd they cannot reach.
4. model, errors, clock and the domain modules import no aiohttp (domain logic runs without an
   event loop); the guest-path ledger imports no config reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "imdsd"

# Top to bottom, as README's Layout shows them. A module belongs to the first layer one of
# whose prefixes names it or its package.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("imdsd.__main__",),
    ("imdsd.cli",),
    ("imdsd.daemon",),
    (
        "imdsd.imds",
        "imdsd.admin",
        "imdsd.fleet",
        "imdsd.scheduler",
        "imdsd.backends",
        "imdsd.vault",
        "imdsd.metrics",
        "imdsd.signatures",
    ),
    ("imdsd.inventory", "imdsd.state"),
    ("imdsd.config",),
    (
        "imdsd.sessions",
        "imdsd.refresh",
        "imdsd.whois",
        "imdsd.timetable",
        "imdsd.tokens",
        "imdsd.budgets",
        "imdsd.ratelimit",
        "imdsd.log",
        "imdsd.files",
        "imdsd.systemd",
        "imdsd.heap",
    ),
    ("imdsd.model", "imdsd.errors", "imdsd.clock", "imdsd.steps", "imdsd"),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module named by an import of the file, relative ones resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found - {name}


GRAPH = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}
EDGES = {m: {t for t in targets if t in GRAPH} for m, targets in GRAPH.items()}


def layer(module: str) -> int:
    for index, prefixes in enumerate(LAYERS):
        # the root package is itself only (its __init__), not every module under it
        if any(module == p or (p != "imdsd" and module.startswith(p + ".")) for p in prefixes):
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and README's Layout)")


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in EDGES.get(todo.pop(), set()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_every_import_points_down_or_across() -> None:
    """Rule 1: no module imports one of a higher layer."""
    upward = [
        f"{m} ({layer(m)}) -> {t} ({layer(t)})"
        for m, targets in EDGES.items()
        for t in targets
        if layer(t) < layer(m)
    ]
    assert not upward, "\n".join(sorted(upward))


def test_no_import_circle() -> None:
    """Rule 2: no module reaches itself through its imports."""
    circles = sorted(m for m in EDGES if m in reachable(m))
    assert not circles, circles


def test_guest_and_admin_apis_cannot_reach_backends_scheduler_or_etcd() -> None:
    """Rule 3, transitively, for every module of imdsd.imds and imdsd.admin."""
    forbidden = ("imdsd.backends", "imdsd.scheduler", "imdsd.daemon", "imdsd.cli", "imdsd.fleet")
    for module in (m for m in GRAPH if m.startswith(("imdsd.imds", "imdsd.admin"))):
        bad = {m for m in reachable(module) if m.startswith(forbidden)}
        assert not bad, f"{module} reaches {sorted(bad)}"


def test_domain_leaves_import_no_aiohttp() -> None:
    """Rule 4: the domain's leaves are free of the HTTP framework, directly and transitively;
    the guest path's ledger is free of the config reader."""
    for module in (
        "imdsd.model",
        "imdsd.errors",
        "imdsd.clock",
        "imdsd.sessions",
        "imdsd.refresh",
        "imdsd.whois",
        "imdsd.timetable",
        "imdsd.tokens",
        "imdsd.inventory",
        "imdsd.budgets",
    ):
        names = GRAPH[module] | {i for m in reachable(module) for i in GRAPH[m]}
        assert not {n for n in names if n.split(".")[0] == "aiohttp"}, module
    assert not {m for m in reachable("imdsd.budgets") if m.startswith("imdsd.config")}


def test_errors_is_a_leaf() -> None:
    """errors.py imports nothing from imdsd (no import loops through the exception types)."""
    assert not {n for n in GRAPH["imdsd.errors"] if n.startswith("imdsd")}


def test_the_graph_is_whole() -> None:
    """The walk found the package and resolves relative imports (guards the rules above
    against vacuous passes)."""
    assert "imdsd.imds.handlers" in GRAPH and "imdsd.scheduler" in reachable("imdsd.daemon")
    example = PACKAGE / "imds" / "handlers.py"
    assert imports_of(example) >= {"imdsd.imds.tree"}
    assert module_name(PACKAGE / "config" / "__init__.py") == "imdsd.config"


def test_every_exception_class_is_in_errors() -> None:
    """Every exception class imdsd defines lives in imdsd.errors, where its code and status
    are declared (one mechanism maps classes to EC2 and admin codes)."""
    import importlib
    import inspect

    elsewhere = [
        f"{name}.{cls.__name__}"
        for name in GRAPH
        if name not in ("imdsd.errors", "imdsd.__main__")
        for cls in vars(importlib.import_module(name)).values()
        if inspect.isclass(cls) and issubclass(cls, BaseException) and cls.__module__ == name
    ]
    assert not elsewhere, elsewhere


def test_only_the_cli_reads_the_config_file() -> None:
    """Nothing below the CLI calls config.load(): the file is read where argv is (a daemon's
    SIGHUP reread is a function the CLI hands it)."""
    readers = sorted(m for m, names in GRAPH.items() if "imdsd.config.load" in names)
    assert readers and all(m.startswith("imdsd.cli") for m in readers), readers
