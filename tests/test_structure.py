"""The library's shape: no import cycle inside tfadv/, and leaf modules stay leaves."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "tfadv")


def _modules():
    found = {}
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join(parts)] = path
    return found


def import_graph():
    """``module -> set of tfadv modules it imports`` (module-level and inside functions)."""
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        edges = set()
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import sub` imports the module pkg.sub when there is one.
                names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                         else node.module for a in node.names]
            edges.update(n for n in names if n in modules and n != module)
        graph[module] = edges
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, stack)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [])
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_inside_tfadv():
    graph = import_graph()
    assert "tfadv.rundir" in graph and "tfadv.train" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_leaf_modules_import_nothing_upwards():
    graph = import_graph()
    # Argument checks, fault points and errors are leaves; certify does not reach into defenses.
    assert graph["tfadv.checks"] == set()
    assert graph["tfadv.faults"] == set()
    assert graph["tfadv.cli"] <= {"tfadv.config"}
    for module in ("tfadv.certify.smoothing", "tfadv.certify.ibp", "tfadv.export",
                   "tfadv.rundir"):
        assert not any(m.startswith("tfadv.defenses") for m in graph[module]), module
