"""CPU runs: pin each local rank's threads to its own slice of the node's cores.

``distflow run`` gives every worker ``cores // nproc`` intra-op threads. Left to the
scheduler, the ranks' threads (the main thread, gloo's loop, heartbeats) migrate between
cores and preempt each other's main threads at random moments; a rank held back that way
makes every other rank wait at the next collective. Measured on a 2-core box with
``pipelines/grpo.py --nproc 2`` (7 interleaved runs each, median step over steps 10..99):
23.0 ms pinned vs 23.6 ms not (mean step 23.3 vs 24.7 ms; run-to-run spread 21.5-23.7
vs 21.2-26.1 ms). Nothing computed changes, only where it runs.

Pinned only when it cannot oversubscribe: no CUDA device, more than one local rank, at
least one allowed core per rank and no more intra-op threads than the slice has. Local
rank ``r`` gets the ``r``-th slice of ``k = allowed // local ranks`` of the cores this
process may use (``taskset`` limits are kept). ``DISTFLOW_CPU_AFFINITY=0`` turns it off.
"""
from __future__ import annotations

import os

import torch


def cpu_slice(local_rank: int, local_world_size: int, allowed: list[int]) -> list[int]:
    """The cores of local rank ``local_rank``: its ``len(allowed) // local_world_size``
    slice of ``allowed`` (sorted), or ``[]`` when there are fewer cores than ranks."""
    k = len(allowed) // max(local_world_size, 1)
    cores = sorted(allowed)
    return cores[local_rank * k:(local_rank + 1) * k] if k and 0 <= local_rank < local_world_size else []


def pin_local_rank(local_rank: int) -> list[int]:
    """Pin every thread of this process to its slice; returns the cores ([] if not pinned)."""
    if os.environ.get("DISTFLOW_CPU_AFFINITY", "1") == "0" or not hasattr(os, "sched_setaffinity"):
        return []
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_world_size < 2 or torch.cuda.is_available():
        return []
    try:
        cores = cpu_slice(local_rank, local_world_size, list(os.sched_getaffinity(0)))
        if not cores or torch.get_num_threads() > len(cores):
            return []
        # threads started later (intra-op pool, sockets) inherit the main thread's mask
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), cores)
            except (ProcessLookupError, PermissionError):
                pass  # a thread that ended meanwhile
    except OSError:
        return []
    return cores
