"""Test pipeline: a linear chain over two groups of different sizes.

    load(a) -> tokens(b) -> score(a) -> sink(a, replicated)

``delay_s`` slows every stage (for failure-injection tests that need a run in flight).
"""
import time

import torch
from safetensors.torch import save_file

from distflow import Batch, Pipeline, Stage


def load(ctx):
    n = ctx.params["batch"]
    ids = torch.tensor(list(ctx.shard(n)), dtype=torch.int64) + ctx.step * n
    lengths = (ids * 31) % 53 + 1
    return {"x": Batch({"v": ids.float().unsqueeze(1)}, ids, lengths)}


def tokens(ctx, x):
    time.sleep(ctx.params["delay_s"])
    # a per-sample token block whose contents depend only on the sample
    tok = (x.sample_ids.unsqueeze(1) * 3 + torch.arange(16)) % 101
    return {"t": x.with_columns(tok=tok, v=x["v"] * 2)}


def score(ctx, t):
    time.sleep(ctx.params["delay_s"])
    return {"s": t.with_columns(score=t["tok"].float().mean(1) + t["v"][:, 0])}


def sink(ctx, s):
    b = s.sorted()
    save_file({"sample_id": b.sample_ids, "y": b["score"], "length": b.lengths},
              str(ctx.out_dir / f"sink_step{ctx.step}_rank{ctx.rank}.safetensors"))
    ctx.log(**{"sink/sum": float(b["score"].sum())})


pipeline = Pipeline("linear", [
    Stage("load", load, outputs=["x"], group="a"),
    Stage("tokens", tokens, inputs=["x"], outputs=["t"], group="b"),
    Stage("score", score, inputs=["t"], outputs=["s"], group="a"),
    Stage("sink", sink, inputs=["s"], group="a", data_parallel=False),
], params={"batch": 20, "delay_s": 0.0})
