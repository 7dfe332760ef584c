"""Deterministic routing plans: which consumer receives which sample.

Every rank computes the same plan from the same inputs, so no coordinator is needed.
The unit of routing is a *group* of samples (``Batch.groups``); its cost is the sum of
its samples' lengths (tokens). Assignment is greedy longest-processing-time first (LPT):
units sorted by decreasing cost (ties broken by position), each given to the currently
least-loaded consumer (ties broken by consumer index).

Ties are broken by a unit *key* (its group id), not by where the unit happens to sit, so
the same set of units always yields the same assignment whatever the producers' layout:
two inputs of a stage that are re-sharded separately stay aligned sample by sample.

Balance bound (list scheduling): every consumer's load is at most
``total / n_consumers + max_unit_cost``.
"""
from __future__ import annotations

import heapq

import torch

from distflow.runtime.batch import Batch


def units_of(batch: Batch) -> tuple[list[int], list[int]]:
    """``(unit_of_sample, unit_costs)``: samples grouped by group id, in first-seen order."""
    order: dict[int, int] = {}
    unit_of_sample = [order.setdefault(int(g), len(order)) for g in batch.groups.tolist()]
    costs = [0] * len(order)
    for u, length in zip(unit_of_sample, batch.lengths.tolist()):
        costs[u] += int(length)
    return unit_of_sample, costs


def unit_keys(batch: Batch) -> list[int]:
    """The group id of each unit of ``units_of(batch)``, in the same order."""
    return list(dict.fromkeys(batch.groups.tolist()))


def lpt_assign(costs: list[int], n_bins: int, keys: list[int] | None = None) -> list[int]:
    """Bin index for each cost, longest first onto the least-loaded bin.

    Equal costs are ordered by ``keys`` (default: position).
    """
    if n_bins < 1:
        raise ValueError(f"need at least one consumer, got {n_bins}")
    keys = list(range(len(costs))) if keys is None else keys
    heap = [(0, b) for b in range(n_bins)]
    assign = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], keys[i], i)):
        load, b = heapq.heappop(heap)
        assign[i] = b
        heapq.heappush(heap, (load + costs[i], b))
    return assign


def reshard_plan(costs_per_producer: list[list[int]], n_consumers: int,
                 keys_per_producer: list[list[int]] | None = None) -> list[list[int]]:
    """For each producer, the consumer index of each of its units (global LPT)."""
    flat = [c for costs in costs_per_producer for c in costs]
    keys = None if keys_per_producer is None else [k for ks in keys_per_producer for k in ks]
    assign = lpt_assign(flat, n_consumers, keys)
    plan, start = [], 0
    for costs in costs_per_producer:
        plan.append(assign[start:start + len(costs)])
        start += len(costs)
    return plan


def split_by_plan(batch: Batch, unit_dest: list[int], n_consumers: int) -> list[Batch]:
    """``batch`` cut into one (possibly empty) batch per consumer."""
    unit_of_sample, _ = units_of(batch)
    dest = torch.tensor([unit_dest[u] for u in unit_of_sample], dtype=torch.int64)
    return [batch.select(torch.nonzero(dest == c).flatten()) for c in range(n_consumers)]
