"""The scaling benchmark's pipeline: an RL step (GRPO shape) whose GPU compute is
EMULATED with ``time.sleep`` while all data movement is REAL (tensors, sockets, copies).

    load --> rollout --> reward --+--> ref_logprob --+--> update
    (group "rollout")  (group "train") -> advantage -+

- ``load`` (source): this rank's strided share of the step's ``batch * world_size / group_size``
  prompts, each repeated ``group_size`` times (GRPO: one group of responses per prompt).
- ``rollout``: takes ``rollout_s`` per sample it holds (batched decoding: time grows with the
  number of sequences), then emits per-sample ``tokens`` int64 [n, seq_len] and ``logprobs``
  float32 [n, seq_len]. Response lengths are ragged, uniform-ish in [seq_len/4, seq_len];
  the rows are padded to ``seq_len`` (zeros past the length) and ``Batch.lengths`` holds the
  real token count, which is the cost re-sharding balances on. With the default
  seq_len=4096 a sample is 48 KiB on the wire (tokens + logprobs).
- ``reward``, ``ref_logprob``, ``advantage``, ``update`` (group "train"): each takes a share
  of ``train_s`` per *sample-equivalent* (tokens / mean length): a forward/backward costs
  in proportion to tokens, and tokens are what the LPT re-shard balances.
  ``ref_logprob`` returns only the new [n, seq_len] column; ``advantage`` (GRPO group
  normalization, real arithmetic) carries the full sample on to ``update``.
- Emulated time is wall time per stage call (``_GpuTime``): the stage's own tensor
  building (what the GPU would produce) counts toward it rather than on top, so the 2-core
  box's cost of *generating* fake tokens does not pose as runtime overhead. Everything the
  runtime does (collect, re-shard planning, serialization, sockets, concatenation) runs
  outside the stage call and is fully paid.

Weak scaling: the per-worker batch ``batch`` is fixed, so the global batch is
``batch * ctx.world_size``; the step time stays flat if the runtime scales.

Placement: ``placement=split`` with the rollout and train groups each getting half the
workers (``groups.rollout=N/2 groups.train=N/2``, which the benchmark passes). Chosen over
colocated because it has real traffic in distflow's own mode: ``rollout -> reward`` is a
``reshard`` edge (every rollout rank sends each train rank the sample groups the global
LPT plan gives it: an all-to-all between the halves), while the train-side edges stay
``local``. Colocated would make every edge ``local`` in p2p mode, i.e. no data movement at
all, which would flatter distflow. With ``routing=hub`` the very same placement and stages
send every edge (prompts, samples, scored x2, ref, advantaged) through rank 0, which
gathers, LPT-splits and sends on, as a single-controller driver does. Nothing else differs
between the two modes.

    torchrun --nproc_per_node=4 -m distflow.run benchmarks/scaling_pipeline.py \
        groups.rollout=2 groups.train=2 routing=p2p steps=10

Not modeled: weight sync between the groups and gradient all-reduce (identical in both
modes, and not what routing changes).
"""
import time

import torch

from distflow import Batch, Pipeline, Stage

PROMPT_LEN = 64
# Share of ``train_s`` spent in each train-side stage (sums to 1).
TRAIN_SHARE = {"reward": 0.15, "ref_logprob": 0.25, "advantage": 0.0, "update": 0.60}


def _global_batch(ctx) -> tuple[int, int]:
    """(prompts, samples) of the whole step: ``batch`` samples per worker, weak scaling."""
    g = ctx.params["group_size"]
    samples = ctx.params["batch"] * ctx.world_size
    if samples % g:
        raise ValueError(f"batch * world_size = {samples} is not a multiple of group_size={g}")
    return samples // g, samples


class _GpuTime:
    """Emulated GPU time: the ``with`` block takes ``seconds`` of wall time in all. The CPU
    work inside it (building the stage's output tensors, which a GPU would do) counts
    toward that time instead of adding to it; the runtime's own work (collect, publish,
    routing, serialization) happens outside the stage and is never absorbed."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        left = self.end - time.perf_counter()
        if left > 0:
            time.sleep(left)


def _train_time(ctx, stage: str, batch: Batch) -> _GpuTime:
    """``train_s`` x the stage's share x this rank's sample-equivalents (tokens / mean length)."""
    mean_len = 5 * ctx.params["seq_len"] / 8  # E[length] of rollout's length rule below
    sample_equiv = batch.num_tokens / mean_len
    return _GpuTime(ctx.params["train_s"] * TRAIN_SHARE[stage] * sample_equiv)


def load(ctx):
    n_prompts, _ = _global_batch(ctx)
    g = ctx.params["group_size"]
    prompt_ids = torch.tensor(list(ctx.shard(n_prompts)), dtype=torch.int64) + ctx.step * n_prompts
    groups = prompt_ids.repeat_interleave(g)
    ids = groups * g + torch.arange(g).repeat(len(prompt_ids))
    prompt = (groups[:, None] * 31 + torch.arange(PROMPT_LEN)) % ctx.params["vocab"]
    return {"prompts": Batch({"prompt": prompt}, ids, groups=groups)}


_POOL: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_POOL_ROWS = 256


def _pool(ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token / log-prob rows made once per rank; rollout copies rows out of it.
    Drawing fresh random numbers every step (~5-9 ms of CPU per rollout rank) is work a
    GPU would do, but on this box it steals the two cores from the other ranks' runtime
    work, so the fake outputs are copies (real, distinct bytes per row) of a fixed pool."""
    key = (ctx.rank, ctx.params["seq_len"], ctx.params["vocab"])
    if key not in _POOL:
        gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + ctx.rank)
        shape = (_POOL_ROWS, ctx.params["seq_len"])
        _POOL[key] = (torch.randint(1, ctx.params["vocab"], shape, generator=gen),
                      -torch.rand(shape, generator=gen))
    return _POOL[key]


def rollout(ctx, prompts):
    n, seq_len = len(prompts), ctx.params["seq_len"]
    with _GpuTime(ctx.params["rollout_s"] * n):  # emulated generation
        ids = prompts.sample_ids
        lo = seq_len // 4
        lengths = lo + (ids * 7919 + 13) % (seq_len - lo + 1)  # ragged, deterministic
        mask = torch.arange(seq_len)[None, :] < lengths[:, None]
        pool_tokens, pool_logprobs = _pool(ctx)
        rows = (ids + ctx.step * 7919) % _POOL_ROWS
        tokens = pool_tokens[rows] * mask
        logprobs = pool_logprobs[rows] * mask
    return {"samples": Batch({"tokens": tokens, "logprobs": logprobs}, ids, lengths,
                             prompts.groups)}


def reward(ctx, samples):
    with _train_time(ctx, "reward", samples):
        r = (samples["tokens"][:, 0] % 2).float()  # a rule-based "verifier"
    return {"scored": samples.with_columns(reward=r)}


def ref_logprob(ctx, scored):
    with _train_time(ctx, "ref_logprob", scored):
        ref = scored["logprobs"] * 0.99
    return {"ref": Batch({"ref_logprobs": ref}, scored.sample_ids, scored.lengths, scored.groups)}


def advantage(ctx, scored):
    """GRPO: (r - mean_group) / (std_group + eps), groups whole on one rank."""
    r = scored["reward"]
    _, inverse = torch.unique(scored.groups, return_inverse=True)
    count = torch.bincount(inverse).float()
    mean = torch.bincount(inverse, weights=r) / count
    var = torch.bincount(inverse, weights=(r - mean[inverse]) ** 2) / count
    adv = (r - mean[inverse]) / (var[inverse].sqrt() + 1e-6)
    return {"advantaged": scored.with_columns(advantages=adv)}


def update(ctx, advantaged, ref):
    if not torch.equal(advantaged.sample_ids, ref.sample_ids):
        raise RuntimeError("update got misaligned inputs")
    with _train_time(ctx, "update", advantaged):
        pass  # forward + backward + optimizer step
    ctx.log(**{"count/samples": len(advantaged), "count/tokens": advantaged.num_tokens,
               "reward/mean": float(advantaged["reward"].mean()) if len(advantaged) else 0.0})


pipeline = Pipeline("scaling", [
    Stage("load", load, outputs=["prompts"], group="rollout"),
    Stage("rollout", rollout, inputs=["prompts"], outputs=["samples"], group="rollout"),
    Stage("reward", reward, inputs=["samples"], outputs=["scored"], group="train"),
    Stage("ref_logprob", ref_logprob, inputs=["scored"], outputs=["ref"], group="train"),
    Stage("advantage", advantage, inputs=["scored"], outputs=["advantaged"], group="train"),
    Stage("update", update, inputs=["advantaged", "ref"], group="train"),
], params={"batch": 32, "group_size": 4, "seq_len": 4096, "vocab": 32000,
           "rollout_s": 0.008, "train_s": 0.008},
   defaults={"placement": "split", "steps": 12})
