"""Language-model training on real text (the Python standard library's own source, held-out
split by file), the workload for low-communication training between trainer islands.

    distflow run pipelines/lm_diloco.py --nproc 2                                   # data parallel
    distflow run pipelines/lm_diloco.py --nproc 2 diloco.mode=diloco diloco.islands=2
    distflow run pipelines/lm_diloco.py --nproc 2 diloco.mode=streaming diloco.islands=2 \\
        diloco.fragments=2 diloco.overlap_steps=1 diloco.alpha=0.5 diloco.quantize=e3m0

Metrics: ``train/loss``, ``eval/loss`` (held-out, every ``eval_every`` steps and at the
end), ``diloco/bytes_sent`` (per island, cumulative), ``diloco/export_bytes`` and
``perf/throughput``.

Evaluation is of the model a user would deploy, the global model (as in the DiLoCo and
Streaming DiLoCo papers), identical on every island: with DiLoCo/Streaming, mid-run evals
use the outer (global) params, the last step's eval uses ``DiLoCo.consensus()`` (in-flight
exchanges completed, every fragment brought up to date; its bytes are ``diloco/export_bytes``).

Placement: ``colocated`` (default) and ``interleaved`` (one model, nothing to run beside
it: the same layout) load and train on every worker; ``disaggregated`` puts the data
loader on a worker of its own (``groups.data``) that streams each step's batch to the
trainer workers (``groups.trainer``, which DiLoCo islands must divide).

Learning rate (inner AdamW in every mode): ``lr_schedule=constant`` (default) or ``cosine``:
linear warmup over ``warmup`` steps, then cosine decay to ``min_lr_ratio * lr`` at the last
step (``decay_steps``, 0: the run's ``--steps``). The lr is a function of the step only, so
a resumed run follows the same schedule.
"""
import math

import torch
import torch.nn.functional as F

from distflow import Batch, Pipeline, Stage
from distflow.data import stdlib_corpus, window_starts, windows
from distflow.engines.training import OptimConfig, TrainEngine
from distflow.models import DecoderLM, preset


def text_batches(ctx):
    """This rank's share of the step's random byte windows (seq_len + 1 each)."""
    p = ctx.params
    corpus = stdlib_corpus("train")
    starts = window_starts(len(corpus), p["seq_len"] + 1, ctx.seed, ctx.step, p["batch"])
    mine = torch.tensor(list(ctx.shard(p["batch"])), dtype=torch.int64)
    tokens = windows(corpus, starts[mine], p["seq_len"] + 1)
    return {"text": Batch({"tokens": tokens}, mine + ctx.step * p["batch"],
                          torch.full((len(mine),), p["seq_len"]))}


def lr_at(p, step: int, steps: int) -> float:
    """Inner lr of (0-based) ``step``: constant, or linear warmup + cosine to ``min_lr_ratio``."""
    lr = p["lr"]
    if p["lr_schedule"] == "constant":
        return lr
    if p["lr_schedule"] != "cosine":
        raise ValueError(f"lr_schedule must be constant or cosine, got {p['lr_schedule']!r}")
    warmup, total = p["warmup"], p["decay_steps"] or steps
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    return lr * (p["min_lr_ratio"] + (1 - p["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress)))


class LMTrain:
    """Next-byte prediction with AdamW; data parallel inside an island, DiLoCo between."""

    holds = {"lm": "train"}

    def __init__(self, ctx):
        p = ctx.params
        torch.manual_seed(ctx.seed)
        cfg = preset("tiny", vocab_size=256, hidden_size=p["hidden"], num_hidden_layers=p["layers"],
                     intermediate_size=4 * p["hidden"], max_position_embeddings=p["seq_len"] + 1)
        self.model = DecoderLM(cfg)
        self.engine = TrainEngine(self.model, OptimConfig(
            lr=p["lr"], weight_decay=p["weight_decay"], betas=(0.9, 0.95), grad_clip=1.0,
            micro_batch_tokens=p["micro_batch_tokens"], skip_nonfinite=ctx.nonfinite == "skip"),
            ctx.process_group,
            sync=ctx.diloco(self.model) if ctx.diloco else None)
        heldout = stdlib_corpus("heldout")
        starts = window_starts(len(heldout), p["seq_len"] + 1, 12345, 0, p["eval_batch"])
        self.eval_tokens = windows(heldout, starts, p["seq_len"] + 1)

    def _loss_sum(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.model(tokens[:, :-1]).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                               reduction="sum")

    @torch.no_grad()
    def _evaluate(self) -> float:
        self.model.eval()
        loss = self._loss_sum(self.eval_tokens) / self.eval_tokens[:, 1:].numel()
        self.model.train()
        return float(loss)

    def evaluate(self, final: bool = False) -> float:
        """Held-out loss of the global model (see the module docstring); ``final``: brought
        up to date by ``consensus()`` (every island must call it at the same step)."""
        sync = self.engine.sync
        if sync is None or sync.cfg.mode == "ddp":
            return self._evaluate()
        with sync.swapped_in(sync.consensus() if final else sync.global_params):
            return self._evaluate()

    def __call__(self, ctx, text: Batch):
        tokens = text["tokens"]
        n_tok = self.engine.global_sum(tokens[:, 1:].numel())

        def loss_fn(index):
            loss = self._loss_sum(tokens[index])
            return loss, {"loss": float(loss.detach())}

        p = ctx.params
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr_at(p, ctx.step, ctx.steps)
        stats = self.engine.step(len(text), text.lengths, loss_fn, normalizer=n_tok)
        ctx.log(**{"train/loss": self.engine.global_sum(stats.get("loss", 0.0)) / n_tok,
                   "count/tokens": tokens[:, 1:].numel(), "train/lr": lr_at(p, ctx.step, ctx.steps),
                   **self.engine.sync_stats()})
        final = ctx.step + 1 == ctx.steps
        if (ctx.step + 1) % p["eval_every"] == 0 or final:
            ctx.log(**{"eval/loss": self.evaluate(final), **self.engine.sync_stats()})

    def save_checkpoint(self, ctx, directory):
        self.engine.save(directory, ctx.island)

    def load_checkpoint(self, ctx, directory):
        self.engine.load(directory, ctx.island)


def _interleaved(n: int) -> dict:
    """One model and nothing that runs beside it: every worker trains (as co-located)."""
    return {"data": "trainer", "trainer": n}


def _disaggregated(n: int) -> dict:
    """The data loader on a worker of its own, streaming batches to the trainers."""
    if n < 2:
        raise ValueError(f"disaggregated placement needs >= 2 workers (data, trainer), got {n}")
    return {"data": 1, "trainer": n - 1}


pipeline = Pipeline("lm_diloco", [
    Stage("data", text_batches, outputs=["text"], group="data"),
    Stage("train", LMTrain, inputs=["text"], group="trainer"),
], params={"seq_len": 64, "batch": 32, "hidden": 64, "layers": 4, "lr": 3e-3,
           "weight_decay": 0.1, "micro_batch_tokens": 8192, "eval_every": 50,
           "eval_batch": 64, "lr_schedule": "constant", "warmup": 0, "min_lr_ratio": 0.1,
           "decay_steps": 0}, defaults={"steps": 300},
    layouts={"interleaved": _interleaved, "disaggregated": _disaggregated})
