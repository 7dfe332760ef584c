"""The multi-controller loop of one rank: walk the DAG, run this rank's stages, move data.

Every rank runs this same loop over the same deterministic plan; there is no driver.
"""
from __future__ import annotations

import inspect
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from distflow import checkpoint
from distflow.dag import Stage
from distflow.diloco import DiLoCo, ProcessGroupReducer
from distflow.engines.weight_sync import WeightSync
from distflow.memory import MemoryPolicy
from distflow.runtime.batch import Batch
from distflow.runtime.collective import PeerAllReduce
from distflow.runtime.context import StageContext
from distflow.runtime.exchange import HUB, Exchange
from distflow.runtime.metrics import MetricsLog, checked_metrics, reduce_metrics
from distflow.runtime.stream import Streams
from distflow.runtime.plan import RunPlan
from distflow.transport.liveness import PeerFailure
from distflow.transport.peer import Peer
from distflow.transport.wire import Message


log = logging.getLogger("distflow.worker")


class StageError(RuntimeError):
    """A stage raised or returned something other than its declared outputs."""


class Worker:
    """Runs ``plan`` on this rank: ``peer`` is its connected data plane, ``process_groups``
    the torch.distributed groups ``new_process_groups(plan...)`` made."""

    def __init__(self, plan: RunPlan, peer: Peer, process_groups: dict | None = None,
                 on_step: Callable[[int, dict], None] | None = None):
        self.plan, self.pipeline, self.cfg = plan, plan.pipeline, plan.config
        self.placement, self.peer = plan.placement, peer
        self.process_groups = process_groups or {}
        self.rank, self.out_dir = peer.rank, Path(plan.config.out)
        self.exchange = Exchange(peer, plan.routes)
        self.current_stage = ""
        self.on_step = on_step
        self._reducers: dict[tuple[int, ...], PeerAllReduce] = {}
        self._shared: dict[str, object] = {}  # ctx.shared: one per process
        self.streams = Streams(peer, self.placement.groups)
        self._contexts = {name: self._context(self.pipeline.stage(name)) for name in self.pipeline.order
                          if self.rank in self.placement.ranks(self.pipeline.stage(name).group)}
        self._callables: dict[str, Callable] = {}
        self.memory = MemoryPolicy(self.cfg.memory)
        self._metrics_log = MetricsLog(self.out_dir / "metrics.jsonl", self.cfg.logger, self.pipeline.name,
                                      self.cfg.to_dict()) if self.rank == 0 else None

    # -- what a stage sees ----------------------------------------------------------------
    def _context(self, stage: Stage) -> StageContext:
        ranks = self.placement.ranks(stage.group)
        dp_rank, dp_size = (ranks.index(self.rank), len(ranks)) if stage.data_parallel else (0, 1)
        island, members, process_group = self._island(stage)
        return StageContext(
            stage=stage.name, rank=self.rank, world_size=self.placement.world_size,
            group=stage.group, ranks=ranks, dp_rank=dp_rank, dp_size=dp_size,
            params=self.cfg.params, seed=self.cfg.seed, out_dir=self.out_dir,
            process_group=process_group, reducer=self._reducer(members, process_group),
            steps=self.cfg.steps, island=island,
            diloco=self._diloco_factory() if island is not None else None,
            weight_sync=self._weight_sync(stage), models=self._shared,
            nonfinite=self.cfg.nonfinite, streams=self.streams)

    def _island(self, stage: Stage) -> tuple[int | None, tuple[int, ...], object]:
        """``(island, its ranks, its process group)`` when ``stage``'s group has DiLoCo
        islands, else ``(None, the group's ranks, the group's process group)``."""
        islands = self.plan.islands
        if islands is None or stage.group != islands.group:
            return None, self.placement.ranks(stage.group), self.process_groups.get(stage.group)
        island = islands.island_of(self.rank)
        return island, islands.members[island], self.process_groups[f"island/{island}"]

    def _weight_sync(self, stage: Stage) -> WeightSync | None:
        """Trainer and rollout stages of a disaggregated run share one ``WeightSync``."""
        if self.plan.sync_ranks is None or stage.group not in self.pipeline.weight_sync:
            return None
        record = self.out_dir / "weights" if self.cfg.verify_weights else None
        return self._shared.setdefault("__weight_sync__", WeightSync(
            self.process_groups["weights"], self.plan.sync_ranks, self.rank, self.peer.liveness.check,
            steps=self.cfg.steps, max_staleness=self.cfg.max_staleness, record_dir=record))

    def _reducer(self, ranks, process_group) -> PeerAllReduce | None:
        """One per set of ranks, shared by the stages (and engines) of that group: its
        calls happen in the same order on every member."""
        limit = int(self.cfg.transport.peer_all_reduce_mb * (1 << 20))
        if len(ranks) < 2 or self.rank not in ranks:
            return None
        key = tuple(sorted(ranks))
        if key not in self._reducers:
            self._reducers[key] = PeerAllReduce(self.peer, key, limit, process_group)
        return self._reducers[key]

    def _diloco_factory(self) -> Callable:
        islands = self.plan.islands
        pos = islands.members[islands.island_of(self.rank)].index(self.rank)
        reducer = ProcessGroupReducer(self.process_groups[f"outer/{pos}"])
        return lambda model: DiLoCo(model, self.cfg.diloco, reducer)

    def run(self) -> None:
        self._stateful()  # build every stage (models, engines) before the first step
        start = self._resume() if resume_requested(self.cfg.resume) else 0
        if start:  # steps before `start` count as done for the producers' flow-control window
            self.peer.liveness.update(progress=start - 1)
        if self._metrics_log:
            self._metrics_log.truncate_after(start - 1)  # every step's row exactly once
        self._first_step = self._next_row = start
        self._lag = 1 + self.cfg.max_staleness
        for step in range(start, self.cfg.steps):
            self.run_step(step)
            last = step == self.cfg.steps - 1
            if last or (self.cfg.save_every and (step + 1) % self.cfg.save_every == 0):
                self._flush_metrics(step)  # rows up to the checkpoint's step, before it
                self._save(step)
        self.current_stage = ""

    # -- checkpoints --------------------------------------------------------------------
    def _stateful(self) -> dict[str, object]:
        """Stage instances on this rank that keep state (models, optimizers, loaders)."""
        for name, ctx in self._contexts.items():
            self._callable(self.pipeline.stage(name), ctx)
        return {n: c for n, c in self._callables.items() if hasattr(c, "save_checkpoint")}

    def _save(self, step: int) -> None:
        """Every rank writes its stages' state into the staged dir; rank 0 publishes it."""
        self.current_stage = "checkpoint"
        root = self.out_dir / "checkpoints"
        if self.rank == 0:
            checkpoint.staging(root, step)
        _barrier()
        tmp = root / f"step_{step}.tmp"
        for name, stage in self._stateful().items():
            (tmp / name).mkdir(parents=True, exist_ok=True)
            stage.save_checkpoint(self._contexts[name], tmp / name)
        _barrier()
        if self.rank == 0:
            self._metrics_log.sync()
            checkpoint.write_json(tmp / "meta.json", {"step": step, "pipeline": self.pipeline.name})
            checkpoint.commit(root, step)
        _barrier()

    def _resume(self) -> int:
        """Load the newest checkpoint that matches its manifest (older ones are the
        fallback); the step after it is the first to run."""
        self.current_stage = "resume"
        found = checkpoint.latest(self.out_dir / "checkpoints")
        if found is None:
            return 0
        step, path = found
        for name, stage in self._stateful().items():
            if hasattr(stage, "load_checkpoint"):
                self._contexts[name].step = step
                stage.load_checkpoint(self._contexts[name], path / name)
        return step + 1

    def run_step(self, step: int) -> None:
        t_step = time.perf_counter()
        metrics: dict[str, float] = {}
        for name in self.pipeline.order:
            self.current_stage = name
            self.peer.liveness.update(stage=name, step=step)
            if name in self._contexts:
                self._run_stage(self.pipeline.stage(name), step, metrics)
            if self.cfg.routing == "hub" and self.rank == HUB:
                for e in self.pipeline.out_edges(name):
                    self.exchange.forward(e, step)
        metrics["timing_s/step"] = time.perf_counter() - t_step
        metrics.update(self.exchange.take_counts())
        metrics["count/rejected"] = self.peer.take_rejected()
        self.current_stage = "metrics"
        self.peer.liveness.update(progress=step)
        self.peer.send(HUB, Message(self.rank, "metrics", (step,), metrics), step=step)
        # Rank 0 logs a step's metrics late (1 + max_staleness steps), so waiting for the
        # slowest rank's report never stops rank 0 from starting the next step's work.
        self._flush_metrics(step - self._lag)

    def _run_stage(self, stage: Stage, step: int, metrics: dict[str, float]) -> None:
        self._maybe_inject_fault(stage.name, step)
        t0 = time.perf_counter()
        inputs = {e.name: self.exchange.collect(e, step) for e in self.pipeline.in_edges(stage.name)}
        if len(inputs) > 1 and not _aligned(list(inputs.values())):  # align row by row
            inputs = {k: v.sorted() for k, v in inputs.items()}
        t1 = time.perf_counter()
        ctx = self._contexts[stage.name]
        ctx.step, ctx.metrics = step, {}
        fn = self._callable(stage, ctx)
        self.memory.before(fn)
        try:
            outputs = fn(ctx, *(inputs[n] for n in stage.inputs))
        except PeerFailure:
            raise
        except Exception as e:
            self._blame_dead_peer(e)
            hint = " (nonfinite=skip skips such steps instead)" if isinstance(e, FloatingPointError) else ""
            raise StageError(f"stage {stage.name!r} raised at step {step}: "
                             f"{type(e).__name__}: {e}{hint}") from e
        t2 = time.perf_counter()
        _check_finite(stage.name, step, ctx.metrics, self.cfg.nonfinite)
        metrics.update(self.memory.after(stage.name, fn))
        outputs = _check_outputs(stage, outputs, step)
        self.exchange.publish_outputs(self.pipeline.out_edges(stage.name), step, outputs)
        metrics.update(ctx.metrics)
        metrics[f"timing_s/{stage.name}"] = t2 - t1
        metrics[f"comm_s/{stage.name}"] = (t1 - t0) + (time.perf_counter() - t2)

    def _blame_dead_peer(self, error: Exception) -> None:
        """A collective (gloo/NCCL) that broke because a peer died says only "connection
        closed"; wait for the heartbeats to tell which peer, and raise that instead."""
        if not isinstance(error, RuntimeError) or "Connection closed" not in str(error) and \
                "Connection reset" not in str(error):
            return
        deadline = time.monotonic() + self.cfg.transport.peer_timeout_s + 1
        while time.monotonic() < deadline:
            self.peer.liveness.check()  # raises PeerFailure naming the peer
            time.sleep(0.05)

    def _callable(self, stage: Stage, ctx: StageContext) -> Callable:
        if stage.name not in self._callables:
            # A class is a stateful stage (it holds a model): one instance per rank.
            self._callables[stage.name] = stage.fn(ctx) if inspect.isclass(stage.fn) else stage.fn
        return self._callables[stage.name]

    def _flush_metrics(self, upto: int) -> None:
        """Rank 0: write the rows of every step up to ``upto`` not written yet. Before a
        checkpoint of step k is committed, rows up to k are on disk (fsynced), so a crash
        right after it loses no row and a resume from it writes none twice."""
        if self.rank != HUB:
            return
        self.current_stage = "metrics"
        for k in range(self._next_row, upto + 1):
            self._write_metrics(k)
        if upto >= self._next_row:
            self._next_row = upto + 1

    def _write_metrics(self, step: int) -> None:
        msgs = self.peer.recv("metrics", (step,), list(range(self.placement.world_size)))
        reports, dropped = [], 0
        for r, m in sorted(msgs.items()):
            ok, bad = checked_metrics(m.meta)
            if bad:
                log.warning("rank %d dropped metrics of rank %d, step %d: %s", self.rank, r, step,
                            "; ".join(bad[:5]))
            reports.append(ok)
            dropped += len(bad)
        reduced = reduce_metrics(reports)
        reduced["count/rejected"] = reduced.get("count/rejected", 0) + dropped
        self._metrics_log.write(step, reduced)
        if self.on_step:
            self.on_step(step, reduced)

    def _maybe_inject_fault(self, stage: str, step: int) -> None:
        f = self.cfg.fault
        first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0
        if f.rank == self.rank and f.step == step and f.stage in ("", stage) and first_attempt:
            if f.mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise StageError(f"stage {stage!r} raised at step {step}: injected fault")

    def close(self) -> None:
        if self._metrics_log:
            self._metrics_log.close()


def resume_requested(mode: str) -> bool:
    """``resume=true``, or ``auto`` (the default) when torchrun restarted the group."""
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    return mode == "true" or (mode == "auto" and restarts > 0)


def _check_finite(stage: str, step: int, metrics: dict[str, float], mode: str) -> None:
    """A non-finite loss or gradient norm stops the run (``nonfinite=stop``) naming them;
    with ``nonfinite=skip`` the training engine has skipped that optimizer step."""
    bad = {k: v for k, v in metrics.items()
           if ("loss" in k or "grad_norm" in k) and not math.isfinite(v)}
    if bad and mode == "stop":
        raise StageError(f"stage {stage!r} at step {step}: non-finite "
                         + ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
                         + " (nonfinite=skip skips such steps instead)")
    if bad:
        metrics[f"nonfinite_skipped/{stage}"] = 1.0


def _aligned(batches: list[Batch]) -> bool:
    first = batches[0].sample_ids
    return all(torch.equal(b.sample_ids, first) for b in batches[1:])


def _check_outputs(stage: Stage, outputs, step: int) -> dict[str, Batch]:
    outputs = {} if outputs is None else outputs
    if not isinstance(outputs, dict) or set(outputs) != set(stage.outputs):
        got = sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__
        raise StageError(f"stage {stage.name!r} returned {got} at step {step}; it declares "
                         f"outputs {sorted(stage.outputs)}")
    for name, value in outputs.items():
        if not isinstance(value, Batch):
            raise StageError(f"stage {stage.name!r} output {name!r} is {type(value).__name__}, "
                             "not a distflow Batch")
    return outputs


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
