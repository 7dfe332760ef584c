"""The package's layers import each other without loops (module-level imports only)."""
import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1] / "distflow"


def _unit(module: str) -> str:
    """``distflow.runtime.worker`` -> ``runtime``; ``distflow.config`` -> ``config``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "distflow"


def _imported(node: ast.stmt) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "distflow"]
    if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("distflow"):
        return []
    if node.module != "distflow":
        return [node.module]
    return [f"distflow.{a.name}" if (ROOT / f"{a.name}.py").exists() or (ROOT / a.name).is_dir()
            else "distflow" for a in node.names]


def import_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    for path in ROOT.rglob("*.py"):
        src = _unit(".".join(path.relative_to(ROOT.parent).with_suffix("").parts))
        for node in ast.parse(path.read_text()).body:
            for module in _imported(node):
                if _unit(module) != src:
                    graph.add_edge(src, _unit(module), file=path.name)
    return graph


def test_no_import_loop_between_folders_and_modules():
    graph = import_graph()
    assert graph.has_edge("runtime", "transport") and graph.has_edge("config", "transport")
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, [[(a, b, graph.edges[a, b]["file"]) for a, b in zip(c, c[1:] + c[:1])]
                        for c in cycles]
