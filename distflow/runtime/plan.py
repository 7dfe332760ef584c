"""``RunPlan``: everything a rank decides before it talks to anyone, checked once.

``make_plan`` is a pure function of (pipeline, config, WORLD_SIZE): every rank (and
``distflow run`` before it launches anyone) computes the same plan, and a mistake fails
here, before any socket opens. The worker then uses the plan as it is; nothing in it is
recomputed later.
"""
from __future__ import annotations

from dataclasses import dataclass

from distflow.config import RunConfig
from distflow.dag import Edge, Pipeline
from distflow.placement import (Islands, Placement, check_weight_sync_order, plan_islands,
                                plan_placement, weight_sync_ranks)
from distflow.runtime.exchange import Route, plan_routes


@dataclass(frozen=True)
class RunPlan:
    pipeline: Pipeline
    config: RunConfig
    placement: Placement
    routes: dict[Edge, Route]
    """How each edge's data moves (``distflow.runtime.exchange``)."""
    islands: Islands | None
    """The trainer group's DiLoCo islands; None for plain data parallel."""
    sync_ranks: tuple[int, ...] | None
    """``(trainer source, *rollout ranks)`` of the weight sync; None when co-located."""

    @property
    def world_size(self) -> int:
        return self.placement.world_size


def make_plan(pipeline: Pipeline, cfg: RunConfig, world_size: int) -> RunPlan:
    """The checked plan; raises ValueError (a ``PlacementError``, ``DAGError``, ...)."""
    placement = plan_placement(pipeline, world_size, cfg.placement, cfg.groups)
    islands = (None if cfg.diloco.mode == "ddp"
               else plan_islands(pipeline, placement, cfg.diloco.group, cfg.diloco.islands))
    sync_ranks = weight_sync_ranks(pipeline, placement)
    if sync_ranks is not None:
        check_weight_sync_order(pipeline, placement)
    routes = plan_routes(pipeline, placement, cfg.routing)
    if pipeline.check:
        pipeline.check(cfg.params)
    if pipeline.check_groups:
        pipeline.check_groups(cfg.params, placement.groups)
    return RunPlan(pipeline, cfg, placement, routes, islands, sync_ranks)
