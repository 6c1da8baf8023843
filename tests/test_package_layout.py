"""The package's shape: folders that name the parts, imports that run one way, no circles.

Floors, lowest first (README "Architecture"); a module imports its own folder and lower
floors only, counting every import, also those inside functions or under TYPE_CHECKING:

    config, errors, atomic_file      the ground floor
    runtime/, checkpoint/            platform and storage
    recipe/, data/                   what is learnt, and what it learns from
    training/, commands/             the loop and the verbs around it (commands may use training)
    cli                              the front door
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dist_train"
FLOORS = {"config": 0, "errors": 0, "atomic_file": 0, "__init__": 0, "runtime": 1, "checkpoint": 1,
          "recipe": 2, "data": 2, "training": 3, "commands": 3, "cli": 4, "__main__": 5, "slurm": 5}
ALSO_ALLOWED = {("commands", "training")}  # eval and predict evaluate as validation does


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package's modules that `path` imports anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def part_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    # A package's __init__ runs before any of its modules: importing `a.b` imports `a` too.
    return {m: {i for i in imports_of(p, known) if i != m} for m, p in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
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

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_circles():
    assert cycles(graph()) == []


def test_imports_run_down_the_floors_only():
    wrong = []
    for module, imported in graph().items():
        mine = part_of(module)
        for other in imported:
            theirs = part_of(other)
            if theirs == mine or theirs == "__init__" or (mine, theirs) in ALSO_ALLOWED:
                continue
            if FLOORS[theirs] > FLOORS[mine] or (FLOORS[theirs] == FLOORS[mine] > 0):
                wrong.append(f"{module} imports {other}")
    assert wrong == []


def test_every_part_is_a_named_floor_and_the_root_holds_few_files():
    root_files = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root_files) <= 8, root_files
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name not in ("__pycache__", "assets"))
    assert set(folders) <= set(FLOORS), folders
    assert {part_of(m) for m in modules()} <= set(FLOORS)


def test_no_proving_ground_in_the_package():
    """Benchmarks and test servers live in benchmarks/, beside the package, never in it."""
    for path in PACKAGE.rglob("*.py"):
        assert not path.name.startswith("bench") and "local_servers" not in path.name, path
        text = path.read_text()
        assert "import benchmarks" not in text and "from benchmarks" not in text, path
