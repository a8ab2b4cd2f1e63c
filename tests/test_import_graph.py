"""diffq's modules import one way: no circle, function-level imports included, and the core
never imports diffusers, transformers or diffq.integrations."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "diffq"


def import_graph() -> dict[str, set[str]]:
    """Module -> the diffq modules it imports anywhere in its body. `from pkg import mod` is an
    edge to the submodule, not to the package's __init__."""
    modules = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {m: set() for m in modules}
    for m, f in modules.items():
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
                subs = [f"{node.module}.{a.name}" for a in node.names]
                targets = [s for s in subs if s in modules] or [node.module]
                if len(targets) < len(subs) and node.module not in targets:
                    targets.append(node.module)  # names defined in the package itself
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name in modules]
            graph[m].update(t for t in targets if t != m)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_anywhere():
    assert cycles(import_graph()) == []


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


LAYERS = ["core", "calib", "algos", "mixed", "nn", "ops", "verification", "api", "checkpoint", "integrations",
          "commands", "cli"]  # each may import only from its own layer or those before it
SAME_LAYER = {"calib": "algos", "algos": "calib", "nn": "ops", "ops": "nn", "api": "checkpoint",
              "checkpoint": "api"}


def test_dependencies_point_one_way():
    """core <- calib/algos <- mixed <- nn/ops <- api/checkpoint <- integrations <- commands."""
    graph = import_graph()
    rank = {name: i for i, name in enumerate(LAYERS)}
    for m, edges in graph.items():
        layer = m.split(".")[1] if "." in m else None
        if layer not in rank:
            continue
        for t in edges:
            target = t.split(".")[1] if "." in t else None
            if target in rank and rank[target] > rank[layer] and SAME_LAYER.get(layer) != target:
                raise AssertionError(f"{m} ({layer}) imports {t} ({target}), a later layer")


def test_the_core_loads_no_hf_library_in_a_fresh_interpreter():
    code = ("import sys; import diffq.core, diffq.calib, diffq.algos, diffq.mixed, diffq.nn, "
            "diffq.ops, diffq.api, diffq.checkpoint; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers') "
            "or m.startswith('diffq.integrations')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
