"""The import graph: no cycles inside fastmdm, and the Triton kernels (kernels/) are leaves.

Every ``import`` / ``from`` statement counts, including those inside functions (a lazy import
still ties the modules together). kernels/ ships as fastmdm.kernels. The cycle test walks
fastmdm's modules, kernels/'s modules and every edge between them except kernels -> fastmdm
(the leaf test forbids those): together the two mean no cycle anywhere in the shipped package.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE, KERNELS = ROOT / "fastmdm", ROOT / "kernels"


def _module_name(path: Path, package: str) -> str:
    return package if path.name == "__init__.py" else f"{package}.{path.stem}"


def _imports(path: Path, package: str) -> set[str]:
    """Absolute names of every module ``path`` imports (``from . import x`` gives package.x)."""
    is_init = path.name == "__init__.py"
    here = _module_name(path, package).split(".")
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + (1 if is_init else 0)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module
            names.add(stem)
            names.update(f"{stem}.{alias.name}" for alias in node.names)
    return names


def _is_kernel(name: str) -> bool:
    return name == "fastmdm.kernels" or name.startswith("fastmdm.kernels.")


def _graph() -> dict[str, set[str]]:
    """Each module of fastmdm and fastmdm.kernels -> the modules of either it imports."""
    modules = {_module_name(p, "fastmdm"): (p, "fastmdm") for p in PACKAGE.glob("*.py")}
    modules.update({_module_name(p, "fastmdm.kernels"): (p, "fastmdm.kernels") for p in KERNELS.glob("*.py")})
    graph = {}
    for name, (path, package) in modules.items():
        targets = set()
        for imported in _imports(path, package):
            while imported and imported not in modules:  # fastmdm.x.f -> fastmdm.x
                imported = imported.rpartition(".")[0]
            if not imported or imported == name or imported == "fastmdm":
                continue
            if _is_kernel(name) and not _is_kernel(imported):
                continue  # upward: the leaf test's business
            targets.add(imported)
        graph[name] = targets
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None; iterative depth-first search."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif child not in state:
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_relative_and_function_level_imports():
    graph = _graph()
    assert "fastmdm.diffusion" in graph["fastmdm.objectives"]
    assert "fastmdm.sampling" in graph["fastmdm.training"]  # imported inside a method
    assert "fastmdm.likelihood" in graph["fastmdm"]  # __init__'s relative imports
    assert "fastmdm.kernels.common" in graph["fastmdm.kernels.transition"]  # kernels import each other


def test_no_import_cycle_inside_fastmdm():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
