"""The module import graph of clip_jax/, read from the source (every ``import`` and ``from``,
function-local ones included): no cycles, only the entry points import `clip_jax.train` (the
loop), and `clip_jax.step` (the jitted step, what aot and benchmark compile) reads no config."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "clip_jax"
# `python -m` programs that train: the only modules that may import clip_jax.train.
ENTRY_POINTS = {"clip_jax.main", "clip_jax.data.emoji"}
# What turns a config or a workdir into objects (floors 3 and 4): the step builds on none of it.
CONFIG_READERS = {"clip_jax.train", "clip_jax.recipe", "clip_jax.workdir", "clip_jax.validation"}


def module_names() -> dict[str, pathlib.Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str | None:
    """The absolute module an ``ImportFrom`` names (relative imports resolved)."""
    if node.level == 0:
        return node.module
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """{module: clip_jax modules it imports anywhere in its file}. Importing a name from a
    package (``from clip_jax import train``) is an edge to the submodule; the bare package
    ``clip_jax`` (its __init__ imports nothing at import time) is no edge."""
    modules = module_names()
    graph = {m: set() for m in modules}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, node, is_package)
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                own_package = module.startswith(target + ".")
                if target in modules and target not in (module, "clip_jax") and not own_package:
                    graph[module].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle [a, b, ..., a] if the graph has any (depth-first search), else None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]


def test_the_graph_sees_function_local_and_package_imports():
    graph = import_graph()
    assert "clip_jax.data.pipeline" in graph["clip_jax.data.webdataset"]  # from clip_jax.data import ...
    assert "clip_jax.workdir" in graph["clip_jax.inference"]  # imported inside a function


def test_no_import_cycles_in_clip_jax():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_only_entry_points_import_train():
    importers = {m for m, targets in import_graph().items() if "clip_jax.train" in targets}
    assert importers <= ENTRY_POINTS, (
        f"modules that import clip_jax.train: {sorted(importers - ENTRY_POINTS)}"
    )


def test_the_step_is_a_library_module():
    graph = import_graph()
    assert "clip_jax.step" in graph["clip_jax.train"]  # the loop runs it
    assert not reachable(graph, "clip_jax.step") & CONFIG_READERS
    for command in ("clip_jax.aot", "clip_jax.benchmark"):
        assert "clip_jax.step" in graph[command] and "clip_jax.train" not in graph[command]


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen
