"""The package boundaries, read statically from the source with ``ast`` (nothing is imported).

* The host agent (``health/``) and the trainer (``trainer/``) import nothing from ``service/``, not even
  inside a function: a GPU host's worker and a trainer never load the control plane.
* Our own modules have no import cycle at module level (imports inside functions are left out: they run
  late, and a cycle through one cannot break module loading).
* The orchestrator is a leaf: only its own package, the entry points that start it (``service/cli.py``,
  ``service/demo.py``) and ``bench/`` import ``service.orchestrator``, not even inside a function (tests may
  too). The API, crud, fleet and read models in particular never do; what they share with it (the recovery
  rules, restart-preview, verdicts, the Slurm checks and node sync) lives below it.
* No module of ours imports ``transformers``, the test dependency the trainer's model is checked against.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OWN_PACKAGES = ("health", "service", "trainer", "migrations")
AGENT_PACKAGES = ("health", "trainer")
CONTROL_PACKAGE = "service"
ORCHESTRATOR = "service.orchestrator"
ORCHESTRATOR_IMPORTERS = ("service.orchestrator", "service.cli", "service.demo", "bench")
ORCHESTRATOR_FREE = ("service.api", "service.crud", "service.fleet", "service.readmodels")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def own_modules(packages: tuple[str, ...] = OWN_PACKAGES) -> dict[str, Path]:
    """Every module of our packages: dotted name -> file."""
    modules: dict[str, Path] = {}
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            modules[module_name(path)] = path
    return modules


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved against ``module``)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imported_names(module: str, path: Path, *, top_level_only: bool) -> Iterator[tuple[str, int]]:
    """(imported module or ``module.name``, line) of every import in the file; with ``top_level_only``,
    only the statements that run when the module is loaded (not those inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST) -> Iterator[tuple[str, int]]:
        for child in ast.iter_child_nodes(node):
            if top_level_only and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, child.lineno
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(module, child, is_package)
                yield target, child.lineno
                for alias in child.names:
                    yield f"{target}.{alias.name}", child.lineno
            yield from visit(child)

    yield from visit(tree)


def own_target(name: str, modules: dict[str, Path]) -> str | None:
    """The longest of our modules that ``name`` is or lies in (``a.b.c`` -> ``a.b`` when ``c`` is a name)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> our modules it imports at module level."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for imported, _line in imported_names(name, path, top_level_only=True):
            target = own_target(imported, modules)
            if target is None or target == name:
                continue
            graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    for start in sorted(graph):
        if colour[start] != white:
            continue
        stack: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        colour[start] = grey
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = black
                stack.pop()
            elif colour[child] == grey:
                path = [n for n, _ in stack]
                return [*path[path.index(child) :], child]
            elif colour[child] == white:
                colour[child] = grey
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_the_host_agent_and_the_trainer_import_nothing_of_the_control_plane() -> None:
    modules = own_modules()
    offending = [
        f"{path.relative_to(ROOT)}:{line}: imports {imported}"
        for name, path in modules.items()
        if name.split(".")[0] in AGENT_PACKAGES
        for imported, line in imported_names(name, path, top_level_only=False)
        if imported.split(".")[0] == CONTROL_PACKAGE
    ]
    report = "\n".join(sorted(set(offending)))
    assert not offending, f"health/ and trainer/ must not import service/:\n{report}"


def test_no_module_of_ours_imports_transformers() -> None:
    """`transformers` is a test dependency (dev extra): the OPT layout converter, trainer/hf_opt.py, works on
    state dicts and config dicts, so no trainer or host installs it."""
    modules = own_modules()
    assert "trainer.hf_opt" in modules
    offending = [
        f"{path.relative_to(ROOT)}:{line}: imports {imported}"
        for name, path in modules.items()
        for imported, line in imported_names(name, path, top_level_only=False)
        if imported.split(".")[0] == "transformers"
    ]
    assert not offending, "\n".join(sorted(set(offending)))


def test_no_import_cycle_among_our_modules() -> None:
    cycle = find_cycle(import_graph(own_modules()))
    assert cycle is None, "import cycle at module level: " + " -> ".join(cycle or [])


def test_the_cycle_finder_reports_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_host_worker_loads_no_control_plane_module() -> None:
    """What ``python -m health.worker_main --host h`` imports before it serves: no ``service`` module."""
    code = (
        "import sys; import health.worker_main, health.celery_app; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'service'))"
    )
    env = {**os.environ, "TRAINOPS_HEALTH_HOST": "h1"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def _within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def orchestrator_imports(modules: dict[str, Path]) -> dict[str, list[str]]:
    """Module -> ``file:line: imports X`` per import of ``service.orchestrator`` (inside functions too)."""
    found: dict[str, list[str]] = {}
    for name, path in modules.items():
        for imported, line in imported_names(name, path, top_level_only=False):
            if _within(imported, (ORCHESTRATOR,)):
                shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                found.setdefault(name, []).append(f"{shown}:{line}: imports {imported}")
    return found


def test_only_the_entry_points_import_the_orchestrator() -> None:
    modules = own_modules((*OWN_PACKAGES, "bench"))
    offending = [
        hit
        for name, hits in orchestrator_imports(modules).items()
        if not _within(name, ORCHESTRATOR_IMPORTERS)
        for hit in hits
    ]
    report = "\n".join(sorted(set(offending)))
    assert not offending, f"only {', '.join(ORCHESTRATOR_IMPORTERS)} may import {ORCHESTRATOR}:\n{report}"


def test_api_crud_fleet_and_readmodels_never_import_the_orchestrator() -> None:
    modules = {n: p for n, p in own_modules().items() if _within(n, ORCHESTRATOR_FREE)}
    assert any(n.startswith("service.api.") for n in modules) and any(
        n.startswith("service.fleet.") for n in modules
    )
    offending = sorted(hit for hits in orchestrator_imports(modules).values() for hit in hits)
    assert not offending, "\n".join(offending)


def test_the_orchestrator_import_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "late.py"
    source.write_text(
        "def f():\n    from service.orchestrator.runtime import build_orchestrator\n"
        "def g():\n    import service.orchestrator.loop\n"
    )
    assert orchestrator_imports({"service.api.late": source}) == {
        "service.api.late": [
            f"{source}:2: imports service.orchestrator.runtime",
            f"{source}:2: imports service.orchestrator.runtime.build_orchestrator",
            f"{source}:4: imports service.orchestrator.loop",
        ]
    }


def test_the_api_app_loads_no_orchestrator_module() -> None:
    """What the API server (``service.main``) imports: no ``service.orchestrator`` module."""
    code = (
        "import sys; import service.main; "
        "print(sorted(m for m in sys.modules if m.split('.')[:2] == ['service', 'orchestrator']))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
