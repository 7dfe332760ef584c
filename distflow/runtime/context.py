"""What a stage function sees of the run: who it is, which shard, which step."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

WEIGHT = "__weight__/"
T = TypeVar("T")


@dataclass(kw_only=True)
class StageContext:
    stage: str
    rank: int
    world_size: int
    group: str
    ranks: tuple[int, ...]
    """The ranks of this stage's worker group."""
    dp_rank: int
    """This rank's shard index (0 for a replicated stage, which sees the whole batch)."""
    dp_size: int
    params: dict[str, Any]
    seed: int
    out_dir: Path
    process_group: Any = None
    """torch.distributed group of ``ranks`` (e.g. for gradient all-reduce)."""
    reducer: Any = None
    """``PeerAllReduce`` over the same ranks as ``process_group`` (``reducer.sum(t)``): small
    CPU sums over the data plane, the rest through ``process_group``; None for one rank."""
    steps: int = 0
    """Total steps of the run."""
    island: int = 0
    """DiLoCo island of this rank (0 without islands)."""
    diloco: Any = None
    """With DiLoCo on this stage's group: ``diloco(model) -> DiLoCo`` sync for its trainer."""
    weight_sync: Any = None
    """With disaggregated placement, on trainer and rollout stages: the ``WeightSync``."""
    nonfinite: str = "stop"
    """``stop`` or ``skip``: what a training engine does with a non-finite loss or gradient."""
    streams: Any = None
    """``Streams``: microbatches sent along an edge inside one step (see runtime/stream.py)."""
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    """This process's shared objects (see ``shared``); one dict for all stages of a rank."""

    def shared(self, name: str, build: Callable[[], T]) -> T:
        """The object ``name`` of this process, built by ``build()`` the first time any
        stage asks: co-located stages share one model this way (name it as the stages'
        ``holds`` do, e.g. ``"policy"``)."""
        if name not in self.models:
            self.models[name] = build()
        return self.models[name]

    def log(self, **values: float) -> None:
        """Record metrics for this step (averaged over the ranks that report them)."""
        self.metrics.update({k: float(v) for k, v in values.items()})

    def log_mean(self, weight: float, **values: float) -> None:
        """Record per-sample means over ``weight`` samples; rank 0 combines them into the
        mean over every sample of the step, however unevenly ranks hold samples."""
        for k, v in values.items():
            self.metrics[k] = float(v)
            self.metrics[f"{WEIGHT}{k}"] = float(weight)

    def shard(self, n: int) -> range:
        """Global indices ``[0, n)`` that belong to this rank's shard (strided)."""
        return range(self.dp_rank, n, self.dp_size)
