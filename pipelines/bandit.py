"""A contextual bandit learned with group-relative policy gradient (GRPO's advantage).

The smallest pipeline that learns: a context ``x`` in [0, 10) is shown, the policy picks
one of 10 actions, and the reward is 1 when the action is ``(3x + 1) mod 10``. Each
context is tried ``group_size`` times; advantages are normalized within those groups.

    distflow run pipelines/bandit.py                         # 2 workers, co-located
    distflow run pipelines/bandit.py --nproc 3 placement=split groups.policy=2 groups.reward=1
    torchrun --nproc_per_node=2 -m distflow.run pipelines/bandit.py steps=30

The policy lives in the worker process; rollout and update share it, so they must share a
worker group (weights moving between groups is the job of weight sync).
"""
import time

import torch
import torch.distributed as dist

from distflow import Batch, Pipeline, Stage

N_CONTEXTS = N_ACTIONS = 10
_policy: dict[str, object] = {}  # this process's policy and optimizer


def target(x: torch.Tensor) -> torch.Tensor:
    return (3 * x + 1) % N_ACTIONS


def policy(ctx):
    """The policy logits [N_CONTEXTS, N_ACTIONS] and their optimizer (one per process)."""
    if not _policy:
        torch.manual_seed(ctx.seed)  # same initial weights on every rank
        logits = torch.nn.Parameter(torch.zeros(N_CONTEXTS, N_ACTIONS))
        _policy.update(logits=logits, opt=torch.optim.Adam([logits], lr=ctx.params["lr"]))
    return _policy["logits"], _policy["opt"]


def load(ctx):
    """This rank's share of the step's prompts, each repeated ``group_size`` times."""
    n, g = ctx.params["prompts"], ctx.params["group_size"]
    gen = torch.Generator().manual_seed(ctx.seed * 100_003 + ctx.step)
    contexts = torch.randint(0, N_CONTEXTS, (n,), generator=gen)
    prompt_ids = torch.tensor(list(ctx.shard(n)), dtype=torch.int64)
    x = contexts[prompt_ids].repeat_interleave(g)
    ids = prompt_ids.repeat_interleave(g) * g + torch.arange(g).repeat(len(prompt_ids))
    return {"prompts": Batch({"x": x}, ids + ctx.step * n * g, groups=(prompt_ids + ctx.step * n).repeat_interleave(g))}


def rollout(ctx, prompts):
    logits, _ = policy(ctx)
    gen = torch.Generator().manual_seed(ctx.seed * 7919 + ctx.step * 104_729 + ctx.rank)
    with torch.no_grad():
        probs = torch.softmax(logits[prompts["x"]], dim=-1)
        action = torch.multinomial(probs, 1, generator=gen).squeeze(1)
    return {"samples": prompts.with_columns(action=action)}


def reward(ctx, samples):
    r = (samples["action"] == target(samples["x"])).float()
    return {"scored": samples.with_columns(reward=r)}


def advantage(ctx, scored):
    """Group-normalized advantage: (r - mean_group) / (std_group + eps)."""
    r, groups = scored["reward"], scored.groups
    _, inverse = torch.unique(groups, return_inverse=True)
    count = torch.bincount(inverse).float()
    mean = torch.bincount(inverse, weights=r) / count
    var = torch.bincount(inverse, weights=(r - mean[inverse]) ** 2) / count
    adv = (r - mean[inverse]) / (var[inverse].sqrt() + 1e-6)
    return {"advantaged": scored.with_columns(advantage=adv)}


def update(ctx, advantaged):
    t0 = time.perf_counter()
    logits, opt = policy(ctx)
    logp = torch.log_softmax(logits[advantaged["x"]], dim=-1)
    chosen = logp.gather(1, advantaged["action"].unsqueeze(1)).squeeze(1)
    loss = -(advantaged["advantage"] * chosen).mean()
    opt.zero_grad()
    loss.backward()
    if ctx.dp_size > 1:  # data parallel: average gradients over the group
        dist.all_reduce(logits.grad, group=ctx.process_group)
        logits.grad /= ctx.dp_size
    opt.step()
    ctx.log(**{"reward/mean": advantaged["reward"].mean(), "actor/pg_loss": loss.item(),
               "perf/throughput": len(advantaged) / (time.perf_counter() - t0)})


pipeline = Pipeline("bandit", [
    Stage("load", load, outputs=["prompts"], group="policy"),
    Stage("rollout", rollout, inputs=["prompts"], outputs=["samples"], group="policy"),
    Stage("reward", reward, inputs=["samples"], outputs=["scored"], group="reward"),
    Stage("advantage", advantage, inputs=["scored"], outputs=["advantaged"], group="policy"),
    Stage("update", update, inputs=["advantaged"], group="policy"),
], params={"prompts": 32, "group_size": 8, "lr": 0.1}, defaults={"steps": 40})
