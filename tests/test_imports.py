"""The library's import graph, read from the source (imports inside functions count too).

No cycle between modules, and nothing under ``mrlcache/models`` imports ``mrlcache.fit``
(inference sits below training). The graph is built with ``ast``: an edge A -> B for
every ``import B`` / ``from B import x`` in A at any depth, where ``from P import m`` is
an edge to the module ``P.m`` when ``m`` is a module and to ``P`` otherwise.
"""

import ast
from pathlib import Path

import mrlcache

ROOT = Path(mrlcache.__file__).parent


def _modules() -> dict:
    """{dotted name: path} of every module of the package."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def import_graph() -> dict:
    """{module: set of mrlcache modules it imports}."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1 packages
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                for a in node.names:
                    edges.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def _cycle(graph: dict):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    # cli/export.py imports the export module and load_model inside its command only.
    assert {"mrlcache.export", "mrlcache.models.model"} <= graph["mrlcache.cli.export"]


def test_no_import_cycle():
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_models_do_not_import_fit():
    graph = import_graph()
    bad = {m: sorted(e for e in edges if e == "mrlcache.fit" or e.startswith("mrlcache.fit."))
           for m, edges in graph.items() if m == "mrlcache.models" or m.startswith("mrlcache.models.")}
    assert not {m: e for m, e in bad.items() if e}, bad
