"""The import graph of src/lorakit (read with ast, nothing imported; imports inside functions count): no cycles,
and dependencies point down: no core module imports a backend (cpu/, cuda/) or the trainers (train/). Above the
core and free to import anything: the package root (re-exports), the command line and the sweep recipe."""

import ast
from pathlib import Path

import lorakit

ROOT = Path(lorakit.__file__).parent
UPPER = ("lorakit.cpu", "lorakit.cuda", "lorakit.train")
APPLICATIONS = ("lorakit", "lorakit.__main__", "lorakit.cli", "lorakit.sweep")


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = ("lorakit",) + path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """Every lorakit module ``name`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in modules else base)
    return {m for m in out if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v), on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _is_upper(name: str) -> bool:
    return name in APPLICATIONS or any(name == u or name.startswith(u + ".") for u in UPPER)


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_core_modules_import_no_backend_and_no_application_layer():
    bad = {f"{a} -> {b}" for a, deps in _graph().items() if not _is_upper(a) for b in deps if _is_upper(b)}
    assert bad == set()


def test_the_check_sees_a_cycle_and_an_upward_import():
    """The walker itself: a planted cycle and a planted upward edge are found."""
    graph = {"lorakit.a": {"lorakit.b"}, "lorakit.b": {"lorakit.a"}, "lorakit.c": set()}
    assert _cycles(graph) == [["lorakit.a", "lorakit.b"]]
    modules = _modules()
    assert "lorakit.cpu.fused" in modules and "lorakit.layer" in modules
    assert _is_upper("lorakit.cpu.fused") and _is_upper("lorakit.train.sft") and not _is_upper("lorakit.layer")
