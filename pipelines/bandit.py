"""A contextual bandit learned with group-relative policy gradient (GRPO's advantage).

The smallest pipeline that learns: a context ``x`` in [0, 10) is shown, the policy picks
one of 10 actions, and the reward is 1 when the action is ``(3x + 1) mod 10``. Each
context is tried ``group_size`` times; advantages are normalized within those groups.

    distflow run pipelines/bandit.py                         # 2 workers, co-located
    distflow run pipelines/bandit.py placement=disaggregated # rollout 1 worker, policy 1
    distflow run pipelines/bandit.py --nproc 3 placement=interleaved   # reward on its own
    distflow run pipelines/bandit.py --nproc 3 placement=split groups.rollout=policy \\
        groups.policy=2 groups.reward=1
    torchrun --nproc_per_node=2 -m distflow.run pipelines/bandit.py steps=30

The policy (a table of logits) is trained by ``update`` on the ``policy`` group. When the
``rollout`` group is the same workers, ``rollout`` samples from that very table; when it
is other workers (``disaggregated``), it holds its own copy that the trainer refreshes
after every update through weight sync (``max_staleness`` bounds how old it may be).
Each action is drawn from a counter-based stream keyed by the sample id, so a seed gives
the same run in every placement.
"""
import time

import torch
import torch.distributed as dist

from distflow import Batch, Pipeline, Stage
from distflow.engines.sampling import uniform

N_CONTEXTS = N_ACTIONS = 10


def target(x: torch.Tensor) -> torch.Tensor:
    return (3 * x + 1) % N_ACTIONS


class Policy(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)  # the same initial weights on every rank
        self.logits = torch.nn.Parameter(torch.zeros(N_CONTEXTS, N_ACTIONS))


def trained_policy(ctx) -> Policy:
    """The policy this process trains, shared with a co-located rollout."""
    return ctx.shared("policy", lambda: Policy(ctx.seed))


def load(ctx):
    """This rank's share of the step's prompts, each repeated ``group_size`` times."""
    n, g = ctx.params["prompts"], ctx.params["group_size"]
    gen = torch.Generator().manual_seed(ctx.seed * 100_003 + ctx.step)
    contexts = torch.randint(0, N_CONTEXTS, (n,), generator=gen)
    prompt_ids = torch.tensor(list(ctx.shard(n)), dtype=torch.int64)
    x = contexts[prompt_ids].repeat_interleave(g)
    ids = prompt_ids.repeat_interleave(g) * g + torch.arange(g).repeat(len(prompt_ids))
    return {"prompts": Batch({"x": x}, ids + ctx.step * n * g, groups=(prompt_ids + ctx.step * n).repeat_interleave(g))}


class Rollout:
    holds = {"policy": "infer"}

    def __init__(self, ctx):
        self.sync = ctx.weight_sync  # None when co-located with the trainer
        self.policy = Policy(ctx.seed) if self.sync else trained_policy(ctx)

    def __call__(self, ctx, prompts):
        version = self.sync.refresh(self.policy, ctx.step) if self.sync else ctx.step
        with torch.no_grad():
            probs = torch.softmax(self.policy.logits[prompts["x"]], dim=-1)
        cdf = probs.double().cumsum(-1)
        u = uniform(prompts.sample_ids + ctx.seed * 1_000_000_007)[:, None] * cdf[:, -1:]
        action = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=N_ACTIONS - 1)
        ctx.log(**{"rollout/staleness": ctx.step - version})
        return {"samples": prompts.with_columns(action=action)}


def reward(ctx, samples):
    r = (samples["action"] == target(samples["x"])).float()
    return {"scored": samples.only(reward=r)}  # only the new column travels on


def advantage(ctx, samples, scored):
    """Group-normalized advantage: (r - mean_group) / (std_group + eps)."""
    scored = samples.join(scored)
    r, groups = scored["reward"], scored.groups
    _, inverse = torch.unique(groups, return_inverse=True)
    count = torch.bincount(inverse).float()
    mean = torch.bincount(inverse, weights=r) / count
    var = torch.bincount(inverse, weights=(r - mean[inverse]) ** 2) / count
    adv = (r - mean[inverse]) / (var[inverse].sqrt() + 1e-6)
    return {"advantaged": scored.with_columns(advantage=adv)}


class Update:
    holds = {"policy": "train"}

    def __init__(self, ctx):
        self.policy = trained_policy(ctx)
        self.opt = torch.optim.Adam(self.policy.parameters(), lr=ctx.params["lr"])

    def __call__(self, ctx, advantaged):
        t0 = time.perf_counter()
        logp = torch.log_softmax(self.policy.logits[advantaged["x"]], dim=-1)
        chosen = logp.gather(1, advantaged["action"].unsqueeze(1)).squeeze(1)
        # mean over the whole step's samples, whichever rank holds them
        n = torch.tensor([float(len(advantaged))])
        if ctx.dp_size > 1:
            dist.all_reduce(n, group=ctx.process_group)
        loss = -(advantaged["advantage"] * chosen).sum() / n
        self.opt.zero_grad()
        loss.backward()
        if ctx.dp_size > 1:  # data parallel: sum the gradient shares over the group
            dist.all_reduce(self.policy.logits.grad, group=ctx.process_group)
        self.opt.step()
        if ctx.weight_sync is not None:
            ctx.weight_sync.publish(self.policy, ctx.step)
        if len(advantaged):
            ctx.log_mean(len(advantaged), **{
                "reward/mean": advantaged["reward"].mean(),
                "actor/pg_loss": -(advantaged["advantage"] * chosen.detach()).mean()})
        ctx.log(**{"count/samples": len(advantaged),
                   "perf/throughput": len(advantaged) / (time.perf_counter() - t0)})


def _interleaved(n: int) -> dict:
    """The reward on a worker of its own while the policy's workers generate and train."""
    if n < 2:
        raise ValueError(f"interleaved placement needs >= 2 workers (policy, reward), got {n}")
    return {"rollout": "policy", "policy": n - 1, "reward": 1}


def _disaggregated(n: int) -> dict:
    """Generation on half the workers (their own policy copy), training and reward on the rest."""
    if n < 2:
        raise ValueError(f"disaggregated placement needs >= 2 workers, got {n}")
    return {"rollout": n // 2, "policy": n - n // 2, "reward": "policy"}


pipeline = Pipeline("bandit", [
    Stage("load", load, outputs=["prompts"], group="rollout"),
    Stage("rollout", Rollout, inputs=["prompts"], outputs=["samples"], group="rollout"),
    Stage("reward", reward, inputs=["samples"], outputs=["scored"], group="reward"),
    Stage("advantage", advantage, inputs=["samples", "scored"], outputs=["advantaged"], group="policy"),
    Stage("update", Update, inputs=["advantaged"], group="policy"),
], params={"prompts": 32, "group_size": 8, "lr": 0.1}, defaults={"steps": 40},
    layouts={"interleaved": _interleaved, "disaggregated": _disaggregated},
    weight_sync=("policy", "rollout"))
