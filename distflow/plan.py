"""``distflow plan PIPELINE.py --nproc N``: what each placement would do, before launching.

For every strategy it prints the worker groups and their ranks, the models each worker
holds (and in which role), an estimate of memory per worker (weights, gradients and
AdamW state in fp32: 4 bytes per parameter to run a model, 16 to train it; activations
and KV cache come on top), and the stages that run at the same time.
Stage classes declare what they hold with a ``holds = {model: "infer" | "train"}``
attribute; a pipeline declares sizes with ``model_params(params) -> {model: count}``.
"""
from __future__ import annotations

import itertools

import networkx as nx

from distflow.dag import Pipeline
from distflow.placement import STRATEGIES, Placement, plan_placement

BYTES_PER_PARAM = {"infer": 4, "train": 16}
_ROLE_RANK = {"infer": 0, "train": 1}


def models_per_rank(pipeline: Pipeline, placement: Placement) -> dict[int, dict[str, str]]:
    """``{rank: {model: role}}``; a model both run and trained on a rank counts once."""
    held: dict[int, dict[str, str]] = {r: {} for r in range(placement.world_size)}
    for stage in pipeline.stages:
        for model, role in getattr(stage.fn, "holds", {}).items():
            for r in placement.ranks(stage.group):
                if _ROLE_RANK[role] >= _ROLE_RANK.get(held[r].get(model, "infer"), 0):
                    held[r][model] = role
    return held


def concurrent_stages(pipeline: Pipeline, placement: Placement) -> list[tuple[str, str]]:
    """Stage pairs with no path between them, placed on disjoint workers."""
    closure = nx.transitive_closure_dag(pipeline.graph)
    pairs = []
    for a, b in itertools.combinations(pipeline.order, 2):
        if closure.has_edge(a, b) or closure.has_edge(b, a):
            continue
        ra = set(placement.ranks(pipeline.stage(a).group))
        if not ra & set(placement.ranks(pipeline.stage(b).group)):
            pairs.append((a, b))
    return pairs


def describe(pipeline: Pipeline, world_size: int, sizes: dict, params: dict) -> str:
    counts = pipeline.model_params(params) if pipeline.model_params else {}
    lines = [f"pipeline {pipeline.name!r} on {world_size} workers"
             + (f"; model parameters: {counts}" if counts else "")]
    for strategy in STRATEGIES:
        if strategy == "split" and not sizes:
            continue
        lines.append(f"\n== {strategy}")
        try:
            placement = plan_placement(pipeline, world_size, strategy, sizes)
        except ValueError as e:
            lines.append(f"   not possible: {e}")
            continue
        for g, ranks in placement.groups.items():
            if g != "all":
                stages = [s.name for s in pipeline.stages if s.group == g]
                lines.append(f"   group {g:<10} ranks {list(ranks)}  stages {stages}")
        for r, held in models_per_rank(pipeline, placement).items():
            gb = sum(BYTES_PER_PARAM[role] * counts.get(m, 0) for m, role in held.items()) / 2**30
            desc = ", ".join(f"{m} ({role})" for m, role in sorted(held.items())) or "-"
            lines.append(f"   rank {r}: {desc}; ~{gb:.3f} GiB weights+optimizer")
        pairs = concurrent_stages(pipeline, placement)
        lines.append("   concurrent: " + (", ".join(f"{a} || {b}" for a, b in pairs) or "none"))
        if strategy == "disaggregated" and pipeline.weight_sync:
            lines.append("   with max_staleness >= 1, generation of step k+1 overlaps training "
                         "of step k; weights flow trainer -> rollout after every update")
    return "\n".join(lines)
