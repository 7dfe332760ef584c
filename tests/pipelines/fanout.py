r"""Test pipeline: fan-out / fan-in over three groups, with per-sample arithmetic whose
result does not depend on how samples are sharded, so a run on any placement must match
a single-process run value by value.

    load(a) -> square(b) ---\
          \--> negate(c) ----> join(a) -> sink(a, replicated)
"""
import torch
from safetensors.torch import save_file

from distflow import Batch, Pipeline, Stage


def load(ctx):
    n, g = ctx.params["batch"], ctx.params["group_size"]
    mine = [i for group in ctx.shard(n // g) for i in range(group * g, group * g + g)]
    ids = torch.tensor(mine, dtype=torch.int64) + ctx.step * n
    lengths = (ids * 7919) % 97 + 1  # uneven token counts
    x = torch.stack([ids.double(), lengths.double()], dim=1)
    groups = ids // g
    return {"x": Batch({"x": x}, ids, lengths, groups)}


def square(ctx, x):
    return {"sq": x.with_columns(y=x["x"] ** 2)}


def negate(ctx, x):
    return {"neg": x.with_columns(y=-x["x"] + 0.5)}


def join(ctx, sq, neg):
    sq, neg = sq.sorted(), neg.sorted()
    assert torch.equal(sq.sample_ids, neg.sample_ids), "join saw different samples"
    ctx.log(**{"count/samples": len(sq)})
    return {"joined": sq.with_columns(y=sq["y"] + neg["y"] * 3)}


def sink(ctx, joined):
    b = joined.sorted()
    save_file({"sample_id": b.sample_ids, "y": b["y"], "length": b.lengths},
              str(ctx.out_dir / f"sink_step{ctx.step}_rank{ctx.rank}.safetensors"))
    ctx.log(**{"sink/sum": float(b["y"].sum())})


pipeline = Pipeline("fanout", [
    Stage("load", load, outputs=["x"], group="a"),
    Stage("square", square, inputs=["x"], outputs=["sq"], group="b"),
    Stage("negate", negate, inputs=["x"], outputs=["neg"], group="c"),
    Stage("join", join, inputs=["sq", "neg"], outputs=["joined"], group="a"),
    Stage("sink", sink, inputs=["joined"], group="a", data_parallel=False),
], params={"batch": 24, "group_size": 3})
