"""Placement: which ranks form each worker group; a pure function of the pipeline,
WORLD_SIZE and the config, so every rank computes the same plan without talking.

Strategies (``placement=`` in the config):

- ``colocated``: every group is every rank; stages time-share the workers.
- ``split``: each group gets its own ranks. ``groups.<name>=<size>`` sizes a group
  (ranks are handed out consecutively in order of first use in the pipeline) and
  ``groups.<name>=<other>`` makes a group share another group's ranks. The sizes must
  add up to WORLD_SIZE exactly, so no worker idles by accident.
- ``interleaved``: a split in which models with no dependency between them (e.g. the
  reference and the reward model) get disjoint groups and so run at the same time.
- ``disaggregated``: a split in which generation runs on its own group with its own copy
  of the policy, refreshed from the trainer group after every update.

``interleaved`` and ``disaggregated`` take their default sizes from the pipeline's
``layouts`` (a function of WORLD_SIZE); ``groups.<name>=`` overrides any of them.

The group ``all`` is always every rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from distflow.dag import Pipeline

STRATEGIES = ("colocated", "split", "interleaved", "disaggregated")


class PlacementError(ValueError):
    """The placement does not fit WORLD_SIZE or the pipeline."""


@dataclass(frozen=True)
class Placement:
    strategy: str
    world_size: int
    groups: dict[str, tuple[int, ...]]

    def ranks(self, group: str) -> tuple[int, ...]:
        return self.groups[group]

    def describe(self) -> dict[str, list[int]]:
        return {g: list(r) for g, r in self.groups.items()}


def plan_placement(pipeline: Pipeline, world_size: int, strategy: str = "colocated",
                   sizes: dict[str, int | str] | None = None) -> Placement:
    if world_size < 1:
        raise PlacementError(f"WORLD_SIZE must be >= 1, got {world_size}")
    if strategy not in STRATEGIES and strategy not in pipeline.layouts:
        raise PlacementError(f"placement {strategy!r} is not one of "
                             f"{list(STRATEGIES) + sorted(set(pipeline.layouts) - set(STRATEGIES))}")
    names = [g for g in pipeline.group_names if g != "all"]
    sizes = dict(sizes or {})
    unknown = sorted(set(sizes) - set(names))
    if unknown:
        raise PlacementError(f"groups {unknown} are sized in the config but no stage of "
                             f"pipeline {pipeline.name!r} uses them (groups: {names})")
    everyone = tuple(range(world_size))
    if strategy == "colocated":
        return Placement(strategy, world_size, {"all": everyone, **{g: everyone for g in names}})
    if strategy in pipeline.layouts:
        sizes = {**pipeline.layouts[strategy](world_size), **sizes}
    return Placement(strategy, world_size, {"all": everyone, **_split(names, sizes, world_size)})


def weight_sync_ranks(pipeline: Pipeline, placement: Placement) -> tuple[int, ...] | None:
    """``(source, *receivers)`` of the trainer -> rollout weight sync, or None when the
    two groups are the same workers (they then share one model)."""
    if pipeline.weight_sync is None:
        return None
    trainer, rollout = (placement.groups[g] for g in pipeline.weight_sync)
    if trainer == rollout:
        return None
    if set(trainer) & set(rollout):
        raise PlacementError(f"groups {pipeline.weight_sync[0]!r} {list(trainer)} and "
                             f"{pipeline.weight_sync[1]!r} {list(rollout)} must be the same "
                             "workers (co-located) or disjoint (disaggregated)")
    return (trainer[0], *rollout)


def check_weight_sync_order(pipeline: Pipeline, placement: Placement) -> None:
    """Reject a disaggregated layout that would deadlock on weight sync.

    The trainer sends the weights of update k to the rollout group at the end of step k
    and waits until generation of step k + 1 + max_staleness takes them. If a stage on
    any trainer rank must run before generation within a step, that generation waits
    for the trainer, which is still waiting in its send: neither side moves.
    """
    trainer_group, rollout_group = pipeline.weight_sync
    trainer = set(placement.ranks(trainer_group))
    trained = {m for s in pipeline.stages if s.group == trainer_group
               for m, role in getattr(s.fn, "holds", {}).items() if role == "train"}
    in_rollout = [s for s in pipeline.stages if s.group == rollout_group]
    generation = [s for s in in_rollout if set(getattr(s.fn, "holds", {})) & trained] or in_rollout
    for gen in generation:
        for name in sorted(nx.ancestors(pipeline.graph, gen.name), key=pipeline.order.index):
            stage = pipeline.stage(name)
            on_trainer = sorted(trainer & set(placement.ranks(stage.group)))
            if on_trainer:
                raise PlacementError(
                    f"placement={placement.strategy} would deadlock on weight sync: stage "
                    f"{name!r} (group {stage.group!r}) runs on trainer ranks {on_trainer} "
                    f"before generation stage {gen.name!r} (group {rollout_group!r}, ranks "
                    f"{list(placement.ranks(rollout_group))}) in every step, but the trainer "
                    f"sends the weights that {gen.name!r} waits for at the end of the previous "
                    f"step and blocks until {gen.name!r} takes them. Place {name!r} on the "
                    f"{rollout_group!r} workers or after generation")


def _split(names: list[str], sizes: dict, world_size: int) -> dict[str, tuple[int, ...]]:
    missing = [g for g in names if g not in sizes]
    if missing:
        raise PlacementError(f"this placement needs a size for groups {missing} "
                             f"(e.g. groups.{missing[0]}=1)")
    groups: dict[str, tuple[int, ...]] = {}
    if not names:  # every stage runs on `all`: nothing to split
        return groups
    next_rank = 0
    owned = [g for g in names if not isinstance(sizes[g], str)]
    for g in owned:
        n = sizes[g]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise PlacementError(f"group {g!r} has size {n!r}; a size must be an int >= 1")
        groups[g] = tuple(range(next_rank, next_rank + n))
        next_rank += n
    if next_rank != world_size:
        detail = " + ".join(f"{g}={sizes[g]}" for g in owned)
        raise PlacementError(f"group sizes {detail} = {next_rank} but WORLD_SIZE is {world_size}")
    for g in names:
        if isinstance(sizes[g], str):
            target = sizes[g]
            if target not in groups:
                raise PlacementError(f"group {g!r} shares the ranks of {target!r}, which is not "
                                     f"a sized group (sized: {owned})")
            groups[g] = groups[target]
    return groups


@dataclass(frozen=True)
class Islands:
    """A trainer group split into ``count`` islands of consecutive ranks (DiLoCo)."""

    group: str
    members: tuple[tuple[int, ...], ...]

    def island_of(self, rank: int) -> int:
        return next(i for i, m in enumerate(self.members) if rank in m)


def plan_islands(pipeline: Pipeline, placement: Placement, group: str, count: int) -> Islands:
    """Split ``group`` (default: the only group whose stages train a model, i.e. declare
    ``holds = {model: "train"}``) into islands."""
    if not group:
        stateful = sorted({s.group for s in pipeline.stages
                           if "train" in getattr(s.fn, "holds", {}).values()})
        if len(stateful) != 1:
            raise PlacementError(f"diloco.group must name the trainer group; candidates: {stateful}")
        group = stateful[0]
    if group not in placement.groups:
        raise PlacementError(f"diloco.group={group!r} is not a group of pipeline "
                             f"{pipeline.name!r} (groups: {sorted(placement.groups)})")
    ranks = placement.groups[group]
    if count < 1 or len(ranks) % count:
        raise PlacementError(f"diloco.islands={count} does not divide group {group!r} of "
                             f"{len(ranks)} ranks")
    size = len(ranks) // count
    return Islands(group, tuple(ranks[i * size:(i + 1) * size] for i in range(count)))
