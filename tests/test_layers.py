"""The package's imports point one way: no circle anywhere (imports inside functions included),
and the kernels at the bottom, importing nothing from attention/, models/, tasks/ or train/."""

import ast
from pathlib import Path

import hw2jax

PACKAGE = Path(hw2jax.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    """module -> the hw2jax modules it imports, wherever in the file (ast.walk sees imports
    inside functions too). ``from a import b`` names module a.b when b is a module."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith("hw2jax")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                if not base.startswith("hw2jax"):
                    continue
                for alias in node.names:
                    edges.add(
                        f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base
                    )
        graph[name] = {e for e in edges if e != name and _is_module(e)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_finder_sees_circles_hidden_inside_functions(tmp_path):
    graph = {"hw2jax.a": {"hw2jax.b"}, "hw2jax.b": {"hw2jax.c"}, "hw2jax.c": {"hw2jax.a"}}
    assert find_cycle(graph) == ["hw2jax.a", "hw2jax.b", "hw2jax.c", "hw2jax.a"]
    assert find_cycle({"hw2jax.a": {"hw2jax.b"}, "hw2jax.b": set()}) is None
    # An import inside a function is an edge like any other.
    source = "def f():\n    from hw2jax.models import vit\n"
    nodes = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)]
    assert nodes and nodes[0].module == "hw2jax.models"


def test_no_import_circle_in_the_package():
    graph = import_graph()
    assert "hw2jax.attention.softmax" in graph["hw2jax.attention"]  # the walk sees the package
    assert "hw2jax.kernels" in graph["hw2jax.attention.softmax"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_kernels_sit_at_the_bottom():
    graph = import_graph()
    upper = ("hw2jax.attention", "hw2jax.models", "hw2jax.tasks", "hw2jax.train", "hw2jax.cli")
    for module, imports in graph.items():
        if module.startswith("hw2jax.kernels"):
            bad = sorted(i for i in imports if i.startswith(upper))
            assert not bad, f"{module} imports {bad}"
    kernels = {m for m in graph if m.startswith("hw2jax.kernels.")}
    assert kernels == {
        f"hw2jax.kernels.{m}"
        for m in (
            "build",
            "ffi",
            "softmax",
            "linear",
            "matmul",
            "gemm",
            "rows",
            "peak",
            "gru",
            "dropout",
        )
    }


def private_uses(path: Path) -> list[str]:
    """``module._name`` and ``from module import _name`` where module is one of hw2jax's."""
    tree = ast.parse(path.read_text())
    modules, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {(a.asname or a.name) for a in node.names if a.name.startswith("hw2jax.")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hw2jax"):
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"from {node.module} import {alias.name}")
                elif _is_module(f"{node.module}.{alias.name}"):
                    modules.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"{node.value.id}.{node.attr} (line {node.lineno})")
    return found


def test_no_private_name_is_used_outside_its_module():
    root = PACKAGE.parent
    files = [
        p
        for d in ("hw2jax", "tests", "benchmarks", "experiments")
        for p in root.joinpath(d).rglob("*.py")
    ]
    uses = {str(p.relative_to(root)): u for p in files if (u := private_uses(p))}
    assert not uses, f"private names used from another module: {uses}"
