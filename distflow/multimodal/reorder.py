"""DistTrain's data reordering, as pure functions of per-sample costs.

- **intra-microbatch** (``assign``): which data-parallel rank of a module processes each
  sample of a microbatch. ``lpt=False`` is the input order (sample ``j`` -> rank
  ``j mod n``); ``lpt=True`` is longest-processing-time-first by cost (for the encoder:
  image patches), keeping the input order's assignment where that one has a smaller
  makespan (LPT is a 4/3-approximation, not always better), so the makespan is never
  worse than the input order's.
- **inter-microbatch** (``order_microbatches``): the order in which a step's
  microbatches go through the encoder -> LLM pipeline. ``pipeline_makespan`` simulates
  the schedule (encoder forwards back to back, the LLM's forward+backward of microbatch
  ``i`` once its embeddings exist, encoder backwards once every forward is done and the
  gradient of that microbatch is back); the warm-up bubble is the LLM waiting for the
  first encoder forward and the cool-down bubble is the encoder waiting for the last
  LLM backward. The order returned is the best of the input order, Johnson's rule for
  the encoder -> LLM two-machine flow shop, and adjacent-swap improvements of it, by
  simulated makespan: never worse than the input order.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence


def makespan(costs: Sequence[float], owner: Sequence[int], n: int) -> float:
    loads = [0.0] * n
    for c, r in zip(costs, owner):
        loads[r] += c
    return max(loads) if loads else 0.0


def assign(costs: Sequence[float], n: int, lpt: bool) -> list[int]:
    """Rank (0..n-1) of each sample; see the module docstring."""
    if n < 1:
        raise ValueError(f"cannot assign samples to a group of {n} ranks (size must be >= 1)")
    base = [j % n for j in range(len(costs))]
    if not lpt:
        return base
    heap = [(0.0, r) for r in range(n)]
    owner = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        load, r = heapq.heappop(heap)
        owner[j] = r
        heapq.heappush(heap, (load + costs[j], r))
    return owner if makespan(costs, owner, n) <= makespan(costs, base, n) else base


@dataclass(frozen=True)
class StageCost:
    """Per-microbatch time of each pipeline phase (slowest rank of its group)."""
    enc_fwd: float
    llm: float  # forward + backward
    enc_bwd: float


def pipeline_times(costs: Sequence[StageCost], order: Sequence[int], comm: float = 0.0) -> dict:
    """Simulated schedule of ``order``: makespan, per-group busy time and bubble time
    (idle time between a group's first start and the end of the step)."""
    t_enc = 0.0
    fwd_end = {}
    for i in order:
        t_enc += costs[i].enc_fwd
        fwd_end[i] = t_enc
    t_llm = 0.0
    llm_end = {}
    for i in order:
        t_llm = max(t_llm, fwd_end[i] + comm) + costs[i].llm
        llm_end[i] = t_llm
    for i in order:
        t_enc = max(t_enc, llm_end[i] + comm) + costs[i].enc_bwd
    span = max(t_enc, t_llm)
    enc_busy = sum(c.enc_fwd + c.enc_bwd for c in costs)
    llm_busy = sum(c.llm for c in costs)
    return {"makespan": span, "enc_busy": enc_busy, "llm_busy": llm_busy,
            "bubble": (span - enc_busy) + (span - llm_busy)}


def pipeline_makespan(costs: Sequence[StageCost], order: Sequence[int], comm: float = 0.0) -> float:
    return pipeline_times(costs, order, comm)["makespan"]


def johnson(a: Sequence[float], b: Sequence[float]) -> list[int]:
    """Johnson's rule for a two-machine flow shop (jobs on machine A, then B)."""
    first = sorted((i for i in range(len(a)) if a[i] < b[i]), key=lambda i: (a[i], i))
    last = sorted((i for i in range(len(a)) if a[i] >= b[i]), key=lambda i: (-b[i], i))
    return first + last


def order_microbatches(costs: Sequence[StageCost], reorder: bool, comm: float = 0.0) -> list[int]:
    """Processing order of the microbatches; see the module docstring."""
    base = list(range(len(costs)))
    if not reorder or len(costs) < 2:
        return base
    best, best_t = base, pipeline_makespan(costs, base, comm)
    cand = johnson([c.enc_fwd for c in costs], [c.llm for c in costs])
    t = pipeline_makespan(costs, cand, comm)
    improved = True
    while improved:  # adjacent swaps while they shorten the simulated step
        improved = False
        for k in range(len(cand) - 1):
            swapped = cand[:k] + [cand[k + 1], cand[k]] + cand[k + 2:]
            ts = pipeline_makespan(costs, swapped, comm)
            if ts < t - 1e-12:
                cand, t, improved = swapped, ts, True
    return cand if t < best_t else best
