"""Pipelines as Python DAG objects, validated on networkx before anything else runs.

A pipeline author writes ordinary Python::

    pipeline = Pipeline("demo", [
        Stage("load",   load_prompts, outputs=["prompts"], group="rollout"),
        Stage("rollout", Rollout,     inputs=["prompts"], outputs=["samples"], group="rollout"),
        Stage("update",  Update,      inputs=["samples"], group="train"),
    ], params={"lr": 1e-3})

A stage function is called as ``fn(ctx, *inputs) -> {output_name: Batch}``, the inputs in
the order the stage lists them; a class is
instantiated once per rank as ``cls(ctx)`` and its instance is then called the same way
(that is where a stage keeps its model). A stage with no inputs is a *source*: it loads
its own shard of the iteration's data (``ctx.dp_rank`` of ``ctx.dp_size``).
A data-parallel stage sees one shard of the batch on each rank of its group; a
replicated stage (``data_parallel=False``) sees the whole batch on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import networkx as nx


class DAGError(ValueError):
    """The pipeline graph is malformed; raised identically on every rank."""


@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    group: str = "all"
    data_parallel: bool = True

    def __post_init__(self):
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise DAGError(f"stage name {self.name!r} must be a Python identifier")
        if not callable(self.fn):
            raise DAGError(f"stage {self.name!r}: fn {self.fn!r} is not callable")
        for kind, names in (("input", self.inputs), ("output", self.outputs)):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise DAGError(f"stage {self.name!r} lists {kind}(s) {dup} more than once")


@dataclass(frozen=True)
class Edge:
    """Data ``name`` flows from stage ``src`` to stage ``dst``."""

    src: str
    dst: str
    name: str

    @property
    def key(self) -> str:
        return f"{self.src}.{self.name}->{self.dst}"


@dataclass
class Pipeline:
    name: str
    stages: list[Stage]
    params: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    """Run-config defaults of this pipeline (e.g. ``{"placement": "split", "groups.train": 2}``)."""
    check: Callable[[dict[str, Any]], None] | None = None
    """Validates the resolved ``params`` before any process opens a socket (raise ValueError)."""
    check_groups: Callable[[dict[str, Any], dict[str, tuple[int, ...]]], None] | None = None
    """Validates ``params`` against the placement's group ranks, also before any socket."""
    layouts: dict[str, Callable[[int], dict[str, int | str]]] = field(default_factory=dict)
    """Default group sizes per placement strategy, as a function of WORLD_SIZE
    (``groups.<name>=`` on the command line overrides them)."""
    model_params: Callable[[dict[str, Any]], dict[str, int]] | None = None
    """Parameter counts of the pipeline's models (for ``distflow plan``'s estimates)."""
    weight_sync: tuple[str, str] | None = None
    """``(trainer group, rollout group)``: when they are different workers, the trainer
    sends its weights to the rollout group after every update (disaggregated placement)."""

    def __post_init__(self):
        self.stages = list(self.stages)
        self.graph, self.edges = _build_graph(self.stages)
        self.order = _topological_order(self.graph, self.stages)

    def stage(self, name: str) -> Stage:
        return self.graph.nodes[name]["stage"]

    @property
    def group_names(self) -> list[str]:
        """Worker-group names in order of first use."""
        return list(dict.fromkeys(s.group for s in self.stages))

    def in_edges(self, stage: str) -> list[Edge]:
        return [e for e in self.edges if e.dst == stage]

    def out_edges(self, stage: str) -> list[Edge]:
        return [e for e in self.edges if e.src == stage]


def _build_graph(stages: list[Stage]) -> tuple[nx.DiGraph, list[Edge]]:
    if not stages:
        raise DAGError("a pipeline needs at least one stage")
    graph = nx.DiGraph()
    producer: dict[str, str] = {}
    for s in stages:
        if s.name in graph:
            raise DAGError(f"stage name {s.name!r} is used twice")
        graph.add_node(s.name, stage=s)
        for out in s.outputs:
            if out in producer:
                raise DAGError(f"output {out!r} is produced by both stage {producer[out]!r} "
                               f"and stage {s.name!r}; each datum needs exactly one producer")
            producer[out] = s.name
    edges = []
    for s in stages:
        for inp in s.inputs:
            if inp not in producer:
                raise DAGError(f"stage {s.name!r} needs input {inp!r}, which no stage produces "
                               f"(produced: {sorted(producer) or 'nothing'})")
            edges.append(Edge(producer[inp], s.name, inp))
            graph.add_edge(producer[inp], s.name)
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        return graph, edges
    path = " -> ".join([u for u, _ in cycle] + [cycle[0][0]])
    raise DAGError(f"the pipeline has a cycle: {path}")


def _topological_order(graph: nx.DiGraph, stages: list[Stage]) -> list[str]:
    """Deterministic: among ready stages the one declared first runs first."""
    position = {s.name: i for i, s in enumerate(stages)}
    return list(nx.lexicographical_topological_sort(graph, key=position.__getitem__))
