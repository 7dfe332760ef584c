"""The stages of RL post-training, each a small class a pipeline places in its DAG.

Batch columns (N samples, P prompt slots, R response slots):
``prompts`` [N, P] left-padded, ``prompt_mask`` [N, P], ``responses`` [N, R]
right-padded, ``response_mask`` [N, R], ``old_logprobs`` [N, R] (at generation),
``rewards`` [N], ``ref_logprobs`` [N, R], ``values`` [N, R] (PPO), ``advantages`` and
``returns`` [N, R]. Widths are fixed by config (``max_prompt_len``, ``max_new_tokens``)
so shards from different ranks concatenate. The scoring stages (reward, reference,
values) send on only the column they add; ``Advantages`` joins them with the rollouts
by sample id.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from distflow import Batch
from distflow.algos import (entropy_from_logits, get_advantage, get_policy_loss, kl_divergence,
                            logprobs_from_hidden, logprobs_from_logits, losses, value_loss)
from distflow.engines.generation import left_pad
from distflow.engines.sampling import SamplingParams
from distflow.memory import MemoryConfig, MemoryPolicy, offload_module, onload_module
from distflow.models.prefix import forward_distinct, forward_shared, shared_prefixes
from distflow.rl import actors
from distflow.rl.tasks import Scorer, get_task


def model_inputs(batch: Batch, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens, position_ids, key_mask)`` [N, P + R] of prompt + response."""
    tokens = torch.cat([batch["prompts"], batch["responses"]], 1).to(device)
    mask = torch.cat([batch["prompt_mask"], batch["response_mask"]], 1).to(device)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return tokens, positions, mask


def response_outputs(model, batch: Batch, share_prefix: bool = True) -> torch.Tensor:
    """``model``'s outputs [N, R, ...] at the positions that predict each response token
    (the last prompt slot and every response slot but the last, which predicts nothing).

    When the batch repeats prompts (GRPO groups), each distinct prompt is run once and its
    samples' responses attend to its keys and values (``distflow.models.prefix``): the
    same outputs (and gradients) as the plain forward, up to float summation order.
    """
    dev = next(model.parameters()).device
    tokens, positions, mask = model_inputs(batch, dev)
    p, r = batch["prompts"].shape[1], batch["responses"].shape[1]
    shared = shared_prefixes(tokens[:, :p], mask[:, :p]) if share_prefix else None
    if shared is None:
        if not share_prefix:
            return model(tokens[:, :p + r - 1], positions[:, :p + r - 1], mask[:, :p + r - 1])[:, p - 1:]
        # distinct prompts: real tokens of several rows packed together where that pays
        return forward_distinct(model, tokens[:, :p + r - 1], positions[:, :p + r - 1], mask[:, :p + r - 1],
                                p)[:, p - 1:]
    first, inverse = shared
    if r == 1:
        return model(tokens[first, :p], positions[first, :p], mask[first, :p])[:, -1:].index_select(0, inverse)
    prefix_out, out = forward_shared(model, tokens[first, :p], positions[first, :p], mask[first, :p],
                                     inverse, tokens[:, p:p + r - 1], positions[:, p:p + r - 1],
                                     mask[:, :p + r - 1])
    return torch.cat([prefix_out[:, -1:].index_select(0, inverse), out], 1)


def response_logits(model, batch: Batch, share_prefix: bool = True) -> torch.Tensor:
    """Logits [N, R, V] (float32) that predict each response token."""
    return response_outputs(model, batch, share_prefix).float()


class FinalHidden:
    """A ``DecoderLM`` without its lm head: called like the model (as ``response_outputs``
    and ``distflow.models.prefix`` call it), it returns the final (normed) hidden states
    [B, T, H] instead of the logits [B, T, V]."""

    def __init__(self, model):
        self.model, self.config = model, model.config

    def parameters(self):
        return self.model.parameters()

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs, logits=False)


def response_logprobs(model, batch: Batch, entropy: bool = False, share_prefix: bool = True,
                      budget: int | None = None):
    """Log-probs [N, R] (float32) of the response tokens under ``model``; with ``entropy``
    also the entropy [N, R] of each position's distribution (a metric: no gradient).

    When the float32 logits [N, R, V] fit in ``budget`` bytes (default
    ``distflow.algos.losses.LOGITS_BUDGET``, read at each call; every small run) they are
    made whole (``response_logits``) as always. Above it, and when the model's lm head is
    a plain bias-free linear layer, the model stops at its final hidden states and
    ``logprobs_from_hidden`` applies the head chunk by chunk (recomputed in backward), so
    no more than a chunk's logits is ever held: the same values and gradients up to float
    summation order.
    """
    budget = losses.LOGITS_BUDGET if budget is None else budget
    dev = next(model.parameters()).device
    tokens = batch["responses"].to(dev)
    head = getattr(model, "lm_head", None)
    chunkable = type(head) is torch.nn.Linear and head.bias is None
    if not chunkable or tokens.numel() * head.out_features * 4 <= budget:
        logits = response_logits(model, batch, share_prefix)
        logp = logprobs_from_logits(logits, tokens)
        if not entropy:
            return logp
        with torch.no_grad():
            return logp, entropy_from_logits(logits)
    hidden = response_outputs(FinalHidden(model), batch, share_prefix)
    if not entropy:
        return logprobs_from_hidden(hidden, head.weight, tokens, budget=budget)
    logp, ent = logprobs_from_hidden(hidden, head.weight, tokens, entropy=True, budget=budget)
    return logp, ent.detach()


class _PhaseLocalModel:
    """A stage whose model is only needed during its own phase (offloadable)."""

    model: torch.nn.Module
    device: torch.device

    def offload(self) -> None:
        offload_module(self.model)

    def onload(self) -> None:
        onload_module(self.model, self.device)


# -- data --------------------------------------------------------------------------------
class Prompts:
    """Source: this rank's share of the step's prompts, each repeated ``group_size`` times.

    From a task (``task=``), the prompts of step k are a pure function of (seed, k). From a
    data set (``data=PATH``), the step takes the next ``prompts`` rows of the per-epoch
    shuffled stream (``distflow.data.Cursor``), whose position is saved in checkpoints; a
    prompt's id is its stream position, and the ``data_row`` column (int64) carries each
    sample's row index through the later stages (the reward looks its columns up).
    """

    def __init__(self, ctx):
        self.tok = actors.tokenizer(ctx)
        self.data = self.cursor = None
        if ctx.params.get("data"):
            from distflow.data import Cursor
            from distflow.data.prompts import PromptData
            self.data = PromptData(ctx.params, self.tok)
            self.cursor = Cursor(len(self.data), ctx.seed, ctx.params.get("data.shuffle", True))
        else:
            self.task = get_task(ctx.params["task"])

    def __call__(self, ctx):
        n, g = ctx.params["prompts"], ctx.params["group_size"]
        mine = list(ctx.shard(n))
        if self.data is None:
            texts = self.task.prompts(n, ctx.seed, ctx.step)
            encoded, first, rows = [self.tok.encode(texts[i]) for i in mine], ctx.step * n, None
        else:
            first, rows = self.cursor.take(n)
            encoded = [self.data.tokens(rows[i]) for i in mine]
        tokens, mask = left_pad(encoded, self.tok.pad_id, ctx.params["max_prompt_len"])
        tokens, mask = tokens.repeat_interleave(g, 0), mask.repeat_interleave(g, 0)
        prompt_ids = torch.tensor(mine, dtype=torch.int64).repeat_interleave(g) + first
        ids = prompt_ids * g + torch.arange(g).repeat(len(mine))
        columns = {"prompts": tokens, "prompt_mask": mask}
        if rows is not None:
            columns["data_row"] = torch.tensor([rows[i] for i in mine], dtype=torch.int64).repeat_interleave(g)
            if ctx.dp_rank == 0:
                ctx.log(**{"data/epoch": first // len(self.data)})
        return {"prompts": Batch(columns, ids, mask.sum(1), groups=prompt_ids)}

    def save_checkpoint(self, ctx, directory: Path) -> None:
        """The data cursor (``data_state.json``); nothing without a data set."""
        if self.cursor is not None and ctx.dp_rank == 0:
            self.cursor.save(directory / "data_state.json", self.data.dataset.fingerprint())

    def load_checkpoint(self, ctx, directory: Path) -> None:
        if self.cursor is not None:
            self.cursor.load(directory / "data_state.json", self.data.dataset.fingerprint())


# -- generation ----------------------------------------------------------------------------
class Rollout:
    """Samples ``group_size`` responses per prompt with the policy (KV-cached).

    Co-located with the trainer it uses the trainer's own model (policy version = step).
    Disaggregated it holds its own copy, refreshed by weight sync (``WeightSync.refresh``
    owns the staleness rule).
    """

    holds = {"policy": "infer"}

    def __init__(self, ctx):
        p = ctx.params
        self.sampling = SamplingParams(temperature=p["temperature"], top_p=p["top_p"],
                                       top_k=p["top_k"], max_new_tokens=p["max_new_tokens"])
        self.sync = ctx.weight_sync
        self.infer = actors.policy_copy(ctx) if self.sync else actors.policy_inference(ctx)
        self.evaluator = Evaluator(ctx, self.infer) if p.get("eval_every") else None
        context = self.infer.model.config.max_position_embeddings
        if p["max_prompt_len"] + p["max_new_tokens"] > context:
            raise ValueError(f"max_prompt_len={p['max_prompt_len']} + max_new_tokens="
                             f"{p['max_new_tokens']} exceeds the model context of {context}")

    def _refresh(self, ctx) -> int:
        """The policy version generation uses at this step."""
        if self.sync is None:
            return ctx.step
        t0, before = time.perf_counter(), self.sync.version
        version = self.sync.refresh(self.infer.model, ctx.step)
        if version != before:  # its own phase: time (including the wait for the trainer) and memory
            ctx.log(**{"timing_s/weight_sync": time.perf_counter() - t0},
                    **MemoryPolicy(MemoryConfig()).measure("weight_sync"))
        return version

    def __call__(self, ctx, prompts: Batch):
        version = self._refresh(ctx)
        if self.evaluator is not None and self.evaluator.due(ctx):
            self.evaluator(ctx)
        # each sample's randomness depends on (seed, sample id) only: any placement, any
        # number of workers, the same responses
        row_seeds = prompts.sample_ids + ctx.seed * 1_000_000_007
        out = self.infer.generate_padded(prompts["prompts"], prompts["prompt_mask"], self.sampling,
                                         row_seeds=row_seeds)
        width = self.sampling.max_new_tokens - out.responses.shape[1]
        responses = F.pad(out.responses, (0, width), value=self.infer.pad_id)
        mask = F.pad(out.response_mask, (0, width), value=False)
        logprobs = F.pad(out.logprobs, (0, width), value=0.0)
        ctx.log(**{"count/tokens": int(prompts.lengths.sum() + out.lengths.sum()),
                   "rollout/staleness": ctx.step - version})
        ctx.log_mean(len(prompts), **{"response_length/mean": out.lengths.float().mean()})
        batch = prompts.with_columns(responses=responses, response_mask=mask, old_logprobs=logprobs)
        batch.lengths = prompts.lengths + out.lengths
        return {"rollouts": batch}

    def save_checkpoint(self, ctx, directory: Path) -> None:
        """Nothing of its own: a disaggregated copy restarts from the trainer's weights."""

    def load_checkpoint(self, ctx, directory: Path) -> None:
        if self.sync is not None:
            self.sync.resume(self.infer.model, ctx.step)


class Evaluator:
    """``data.eval=PATH`` + ``eval_every=K``: at step 0, every K steps and the last step,
    the policy that generates that step answers every held-out prompt greedily (each
    rank of the rollout group its shard), scored by the run's ``reward``. Logs
    ``eval/reward/mean`` and ``eval/accuracy`` (the fraction with reward >= 1), weighted by
    samples over ranks."""

    CHUNK = 256  # prompts generated at once

    def __init__(self, ctx, infer):
        from distflow.data.prompts import PromptData
        p = ctx.params
        self.every, self.infer = p["eval_every"], infer
        self.data = PromptData(p, actors.tokenizer(ctx), p["data.eval"])
        self.scorer = Scorer(p["reward"])
        self.texts = TextDecoder(actors.tokenizer(ctx))
        self.sampling = SamplingParams(temperature=0.0, max_new_tokens=p["max_new_tokens"])

    def due(self, ctx) -> bool:
        return ctx.step % self.every == 0 or ctx.step == ctx.steps - 1

    def __call__(self, ctx) -> None:
        t0, rewards = time.perf_counter(), []
        mine = list(ctx.shard(len(self.data)))
        for lo in range(0, len(mine), self.CHUNK):
            rows = mine[lo:lo + self.CHUNK]
            tokens, mask = left_pad([self.data.tokens(i) for i in rows], self.infer.pad_id,
                                    ctx.params["max_prompt_len"])
            out = self.infer.generate_padded(tokens, mask, self.sampling)
            batch = Batch({"prompts": tokens, "prompt_mask": mask, "responses": out.responses,
                           "response_mask": out.response_mask,
                           "data_row": torch.tensor(rows, dtype=torch.int64)},
                          torch.tensor(rows, dtype=torch.int64))
            rewards += score_rollouts(self.scorer, self.texts, self.data.dataset, batch)
        r = torch.tensor(rewards, dtype=torch.float32)
        if len(r):
            ctx.log_mean(len(r), **{"eval/reward/mean": r.mean(), "eval/accuracy": (r >= 1.0).float().mean()})
        ctx.log(**{"timing_s/eval": time.perf_counter() - t0})


# -- scoring -------------------------------------------------------------------------------
class Reward:
    """The reward slot: the rule-based ``reward`` of each sample, or, when
    ``reward_model=DIR`` is set, the neural ``RewardModel``.

    With a data set, the reward sees the sample's data row (every column, looked up by
    the ``data_row`` column) as well as the prompt and completion texts; see
    ``distflow.rl.tasks`` for the three signatures it accepts."""

    def __new__(cls, ctx):
        if ctx.params.get("reward_model"):
            return RewardModel(ctx)
        return super().__new__(cls)

    def __init__(self, ctx):
        self.scorer = Scorer(ctx.params["reward"])
        self.texts = TextDecoder(actors.tokenizer(ctx))
        self.dataset = None
        if ctx.params.get("data"):
            from distflow.data import Dataset
            self.dataset = Dataset(ctx.params["data"], ctx.params.get("data.prompt_key", "prompt"),
                                   ctx.params.get("data.answer_key", ""))

    def __call__(self, ctx, rollouts: Batch):
        rewards = torch.tensor(score_rollouts(self.scorer, self.texts, self.dataset, rollouts),
                               dtype=torch.float32)
        ctx.log_mean(len(rewards), **{"reward/mean": rewards.mean()})
        return {"scored": rollouts.only(rewards=rewards)}


class TextDecoder:
    """The text of each row's real tokens (EOS left out); decoded once per distinct row."""

    _CACHE_ROWS = 1 << 16

    def __init__(self, tok):
        self.tok = tok
        self._decoded: dict[tuple, str] = {}  # token rows seen before (a group repeats its prompt)

    def __call__(self, tokens: torch.Tensor, mask: torch.Tensor) -> list[str]:
        if len(self._decoded) > self._CACHE_ROWS:
            self._decoded.clear()
        rows = torch.where(mask.bool() & (tokens != self.tok.eos_id), tokens, -1).tolist()
        texts, cache = [], self._decoded
        for row in map(tuple, rows):
            text = cache.get(row)
            if text is None:
                text = cache[row] = self.tok.decode([t for t in row if t >= 0])
            texts.append(text)
        return texts


def score_rollouts(scorer: Scorer, texts: TextDecoder, dataset, rollouts: Batch) -> list[float]:
    """Rewards of a batch of rollouts: texts decoded, data rows looked up by ``data_row``."""
    prompts = texts(rollouts["prompts"], rollouts["prompt_mask"])
    completions = texts(rollouts["responses"], rollouts["response_mask"])
    if dataset is not None and "data_row" in rollouts:
        index = rollouts["data_row"].tolist()
        rows = [dataset.rows[i] for i in index]
        answers = [dataset.answer(i) for i in index]
    else:
        rows, answers = [None] * len(prompts), [None] * len(prompts)
    return scorer.score(prompts, completions, rows, answers, rollouts.sample_ids.tolist())


class RewardModel(_PhaseLocalModel):
    """Neural reward: a reward model (``reward_model=DIR``, see ``actors.load_reward_model``)
    scores each prompt + response at its last real token. Place it in the reward slot of a
    pipeline instead of (or after) the rule-based ``Reward``."""

    holds = {"reward_model": "infer"}

    def __init__(self, ctx):
        self.device = actors.default_device()
        self.model = actors.load_reward_model(ctx.params["reward_model"], self.device)

    @torch.no_grad()
    def __call__(self, ctx, rollouts: Batch):
        tokens, positions, mask = model_inputs(rollouts, next(self.model.parameters()).device)
        values = self.model(tokens, positions, mask)
        last = mask.shape[1] - 1 - mask.long().flip(1).argmax(1)  # last real token
        rewards = values[torch.arange(len(rollouts)), last].cpu()
        ctx.log_mean(len(rewards), **{"reward/mean": rewards.mean()})
        return {"scored": rollouts.only(rewards=rewards)}


class RefLogprobs(_PhaseLocalModel):
    """Log-probs of the responses under the frozen reference policy."""

    holds = {"reference": "infer"}

    def __init__(self, ctx):
        self.model = actors.reference(ctx)
        self.device = actors.default_device()

    def __call__(self, ctx, rollouts: Batch):
        with torch.inference_mode():  # copied out: the actor update uses these
            logp = response_logprobs(self.model, rollouts)
        return {"with_ref": rollouts.only(ref_logprobs=logp.cpu().clone())}


class Values:
    """PPO: the critic's value of every response position."""

    holds = {"critic": "infer"}

    def __init__(self, ctx):
        self.critic, _ = actors.critic(ctx)

    def __call__(self, ctx, rollouts: Batch):
        with torch.inference_mode():
            values = _values(self.critic, rollouts)
        return {"with_values": rollouts.only(values=values.cpu().clone())}


def _values(critic, batch: Batch) -> torch.Tensor:
    return response_outputs(critic, batch)


# -- advantages ----------------------------------------------------------------------------
class Advantages:
    """Joins the rollouts with their rewards and reference log-probs (and, for PPO, the
    values), which arrive from parallel branches, and computes advantages with the
    registered estimator named in ``advantage`` (grpo, rloo, reinforce_pp; gae for PPO,
    with the KL penalty folded into the token rewards)."""

    def __init__(self, ctx):
        self.name = ctx.params["advantage"]
        self.fn = get_advantage(self.name)

    def __call__(self, ctx, rollouts: Batch, scored: Batch, with_ref: Batch,
                 with_values: Batch | None = None):
        batch = rollouts.join(scored, with_ref, *([with_values] if with_values is not None else []))
        mask = batch["response_mask"].float()
        if self.name == "gae":
            kl = kl_divergence(batch["old_logprobs"], batch["ref_logprobs"], "k1") * mask
            token_rewards = -ctx.params["kl_coef"] * kl
            last = (mask.sum(1).long() - 1).clamp(min=0)
            token_rewards[torch.arange(len(batch)), last] += batch["rewards"]
            adv, ret = self.fn(token_rewards, batch["values"], mask, gamma=ctx.params["gamma"],
                               lam=ctx.params["lam"], whiten=False)
            adv = whiten_over_group(adv, mask, ctx.process_group)
        elif self.name == "reinforce_pp":
            adv, ret = self.fn(batch["rewards"], mask, batch.groups, whiten=False)
            adv = whiten_over_group(adv, mask, ctx.process_group)
        else:  # per-prompt-group estimators: groups never span ranks
            adv, ret = self.fn(batch["rewards"], mask, batch.groups)
        return {"train_batch": batch.with_columns(advantages=adv, returns=ret)}


def whiten_over_group(x: torch.Tensor, mask: torch.Tensor, group) -> torch.Tensor:
    """``masked_whiten`` with mean and (unbiased) variance over every rank of ``group``,
    so the result does not depend on how the batch is sharded."""
    m = mask.bool()
    stats = torch.tensor([float(x[m].sum()), float((x[m].double() ** 2).sum()), float(m.sum())],
                         dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(stats, group=group)
    total, total_sq, n = stats.tolist()
    mean = total / max(n, 1.0)
    var = (total_sq - n * mean * mean) / (n - 1) if n > 1 else 0.0
    out = (x - mean) * torch.rsqrt(torch.tensor(max(var, 0.0) + 1e-8, dtype=x.dtype))
    return torch.where(m, out, torch.zeros((), dtype=out.dtype))


# -- updates -------------------------------------------------------------------------------
class ActorUpdate:
    """Clipped policy-gradient step(s); for GRPO a KL-to-reference loss term as well."""

    holds = {"policy": "train"}

    def __init__(self, ctx):
        self.actor = actors.actor(ctx)
        self.loss = get_policy_loss(ctx.params.get("policy_loss", "ppo_clip"))

    def _loss(self, ctx, batch: Batch):
        p = ctx.params
        logp, entropy = response_logprobs(self.actor.model, batch, entropy=True)
        dev = logp.device
        mask = batch["response_mask"].to(dev).float()
        n_tok = mask.sum()
        pg, stats = self.loss(logp, batch["old_logprobs"].to(dev), batch["advantages"].to(dev),
                              mask, clip_eps=p["clip_eps"])
        kl = kl_divergence(logp, batch["ref_logprobs"].to(dev), p["kl_estimator"])
        kl_sum = (kl * mask).sum()
        loss = pg * n_tok + (p["kl_coef"] * kl_sum if p["kl_loss"] else 0.0)
        with torch.no_grad():
            ent = (entropy * mask).sum()
        tok = float(n_tok)
        return loss, {"pg_loss": float(pg.detach()) * tok, "kl": float(kl_sum.detach()), "entropy": float(ent),
                      "clipfrac": stats.get("clipfrac", 0.0) * tok, "tokens": tok}

    _SUMS = ("pg_loss", "kl", "entropy", "clipfrac", "tokens")

    def __call__(self, ctx, batch: Batch):
        engine = self.actor.train
        for _ in range(ctx.params["ppo_epochs"]):
            # normalized by the global token count, summed with the gradients and the
            # metrics' sums (the same keys in the same order on every rank): one collective
            stats = engine.step(len(batch), batch.lengths, lambda i: self._loss(ctx, batch.select(i)),
                                normalizer="tokens", sums=self._SUMS)
        if ctx.weight_sync is not None:
            ctx.weight_sync.publish(self.actor.model, ctx.step)
        sums = {k: stats.get(k, 0.0) for k in self._SUMS}
        t = max(sums.pop("tokens"), 1.0)
        ctx.log(**{f"actor/{k}": v / t for k, v in sums.items()},
                **{"actor/grad_norm": stats["grad_norm"], "actor/lr": ctx.params["lr"]},
                **engine.sync_stats())

    def save_checkpoint(self, ctx, directory: Path) -> None:
        self.actor.train.save(directory, ctx.island)
        actors.save_model_files(ctx, self.actor.train, directory)  # what `distflow export` reads

    def load_checkpoint(self, ctx, directory: Path) -> None:
        self.actor.train.load(directory, ctx.island)
        if ctx.weight_sync is not None:
            ctx.weight_sync.resume(self.actor.model, ctx.step)


class CriticUpdate:
    """PPO: clipped value-loss step on the critic."""

    holds = {"critic": "train"}

    def __init__(self, ctx):
        self.critic, self.engine = actors.critic(ctx)

    def __call__(self, ctx, batch: Batch):
        def loss_fn(i):
            b = batch.select(i)
            values = _values(self.critic, b)
            dev = values.device
            mask = b["response_mask"].to(dev).float()
            loss, stats = value_loss(values, b["values"].to(dev), b["returns"].to(dev), mask,
                                     clip_eps=ctx.params["value_clip"])
            n_tok = float(mask.sum())
            return loss * mask.sum(), {"vf_loss": float(loss) * n_tok, "tokens": n_tok}

        # normalized by the global token count; one collective (see TrainEngine.step)
        stats = self.engine.step(len(batch), batch.lengths, loss_fn, normalizer="tokens",
                                 sums=("vf_loss",))
        ctx.log(**{"critic/vf_loss": stats.get("vf_loss", 0.0) / max(stats.get("tokens", 0.0), 1.0),
                   "critic/grad_norm": stats["grad_norm"]},
                **{f"critic/{k}": v for k, v in self.engine.sync_stats().items()})

    def save_checkpoint(self, ctx, directory: Path) -> None:
        self.engine.save(directory, ctx.island)

    def load_checkpoint(self, ctx, directory: Path) -> None:
        self.engine.load(directory, ctx.island)
