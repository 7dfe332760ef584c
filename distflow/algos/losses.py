"""Policy / value losses and logit helpers.

Losses return ``(loss scalar tensor, stats dict[str, float])``. Policy losses are
registered in ``POLICY_LOSSES`` and share the signature::

    fn(logp [N, T], old_logp [N, T], advantages [N, T], mask [N, T], **kw)

Low-precision inputs (bf16 / fp16) are computed in float32.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from distflow.algos.core import (AGG_MODES, aggregate, as_float, as_mask, check_2d,
                                 check_same_shape, lookup, masked_mean)
from distflow.algos.kl import LOG_RATIO_CLAMP, kl_k1, kl_k3


def _check_token_inputs(first_name: str, first: torch.Tensor, mask: torch.Tensor,
                        **others: torch.Tensor) -> torch.Tensor:
    """Check ``first`` is [N, T] and mask / others match it; return mask as bool."""
    check_2d(first_name, first)
    check_same_shape(first_name, first, mask=mask, **others)
    return as_mask(mask, first.shape)


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_eps: float = 0.2,
                    clip_eps_high: float | None = None, agg: str = "token-mean"):
    """PPO clipped surrogate: per token max(-A * ratio, -A * clip(ratio, 1-eps, 1+eps_hi)).

    logp, old_logp, advantages, mask: [N, T]; ratio = exp(logp - old_logp) with the
    log-ratio clamped to +-20. clip_eps_high (DAPO's clip-higher) defaults to clip_eps.
    agg: one of AGG_MODES (see ``aggregate``). Returns (loss scalar, stats) with stats
    clipfrac (share of real tokens where the clipped term is active), approx_kl (k3 mean,
    KL(old || new), >= 0), ppo_kl (k1 mean, verl's ppo_kl) and ratio_mean.
    """
    if agg not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation {agg!r}; known: {', '.join(AGG_MODES)}")
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    if not (0.0 <= clip_eps < 1.0 and hi >= 0.0):
        raise ValueError(f"need 0 <= clip_eps < 1 and clip_eps_high >= 0, "
                         f"got clip_eps={clip_eps}, clip_eps_high={clip_eps_high}")
    mask = _check_token_inputs("logp", logp, mask, old_logp=old_logp, advantages=advantages)
    logp, old_logp, adv = as_float(logp), as_float(old_logp), as_float(advantages)
    log_ratio = (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + hi)
    loss = aggregate(torch.maximum(unclipped, clipped), mask, agg)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(logp.dtype), mask).item(),
            "approx_kl": masked_mean(kl_k3(old_logp, logp), mask).item(),
            "ppo_kl": masked_mean(kl_k1(old_logp, logp), mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
        }
    return loss, stats


POLICY_LOSSES: dict[str, Callable] = {"ppo_clip": ppo_policy_loss}


def get_policy_loss(name: str) -> Callable:
    """The policy loss registered as ``name`` in POLICY_LOSSES; ValueError lists the known."""
    return lookup(POLICY_LOSSES, name, "policy loss")


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip_eps: float = 0.2):
    """Clipped value loss, token-mean of 0.5 * max((v - R)^2, (v_clip - R)^2).

    values, old_values, returns, mask: [N, T]; v_clip = old + clamp(v - old, -eps, eps).
    Returns (loss scalar, stats) with vf_clipfrac (share of real tokens where the
    clipped term is strictly larger) and vf_loss.
    """
    if clip_eps < 0:
        raise ValueError(f"clip_eps must be >= 0, got {clip_eps}")
    mask = _check_token_inputs("values", values, mask, old_values=old_values, returns=returns)
    v, old, ret = as_float(values), as_float(old_values), as_float(returns)
    v_clip = old + (v - old).clamp(-clip_eps, clip_eps)
    err, err_clip = (v - ret) ** 2, (v_clip - ret) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clip), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((err_clip > err).to(v.dtype), mask).item(),
                 "vf_loss": loss.item()}
    return loss, stats


# --------------------------------------------------------------------- logit helpers

def _check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2:
        got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be [N, T, V] (or [..., V]), got {got}")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position: logits [N, T, V] -> [N, T] (float32+).

    H = logsumexp(z) - sum softmax(z) * z with z shifted by its (detached) max, so
    large logits lose no precision. Computed in row chunks whose float32 temporaries
    stay under ``_CHUNK_ELEMENTS``. Logits must be finite (-inf entries give NaN).
    """
    _check_logits(logits)
    if logits.shape[0] == 0:
        return torch.zeros(logits.shape[:-1], dtype=as_float(logits).dtype,
                           device=logits.device)
    parts = []
    for z in _row_chunks(logits):
        z = as_float(z)
        z = z - z.detach().amax(dim=-1, keepdim=True)
        lse = torch.logsumexp(z, dim=-1)
        parts.append(lse - (torch.softmax(z, dim=-1) * z).sum(-1))
    return torch.cat(parts)


_CHUNK_ELEMENTS = 1 << 25  # 128 MiB of float32 temporaries per chunk


def _row_chunks(x: torch.Tensor, *others: torch.Tensor):
    """``x`` (and ``others``) split along dim 0 into chunks of bounded size."""
    per_row = max(1, x[0].numel())
    step = max(1, _CHUNK_ELEMENTS // per_row)
    for start in range(0, x.shape[0], step):
        if others:
            yield (x[start:start + step], *(o[start:start + step] for o in others))
        else:
            yield x[start:start + step]


def _check_tokens(tokens: torch.Tensor, shape, vocab: int, what: str) -> None:
    """``tokens`` is an integer tensor of ``shape`` with ids in ``[0, vocab)``."""
    if not isinstance(tokens, torch.Tensor) or tuple(tokens.shape) != tuple(shape):
        got = list(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must have shape {list(shape)} ({what}), got {got}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be an integer tensor, got {tokens.dtype}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        raise ValueError(f"token ids must be in [0, {vocab}), got min {int(tokens.min())} "
                         f"max {int(tokens.max())}")


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per position: logits [N, T, V], tokens [N, T] -> [N, T].

    Computed as z[token] - logsumexp(z) with z shifted by its detached max, in row
    chunks of bounded size (never a full float32 [N, T, V] log_softmax of a large
    batch). Every token id, padding included, must be in [0, V).
    """
    _check_logits(logits)
    _check_tokens(tokens, logits.shape[:-1], logits.shape[-1], f"logits {list(logits.shape)}")
    if logits.shape[0] == 0:
        return torch.zeros(tokens.shape, dtype=as_float(logits).dtype, device=logits.device)
    parts = []
    for z, tok in _row_chunks(logits, tokens):
        z = as_float(z)
        z = z - z.detach().amax(dim=-1, keepdim=True)   # exact shift: large logits stay precise
        picked = z.gather(-1, tok.long().unsqueeze(-1)).squeeze(-1)
        parts.append(picked - torch.logsumexp(z, dim=-1))
    return torch.cat(parts)


# ----------------------------------------------------------- log-probs from hidden states

# Bytes the float32 logits of one micro-batch may take. Below it the RL stages make the
# full [N, R, V] logits (``logprobs_from_logits``: every small run, bit for bit as before);
# above it they apply the lm head in chunks of tokens whose [chunk, V] float32 logits take
# at most this much (``logprobs_from_hidden``). At Qwen2's 151,936-token vocabulary a
# chunk is 441 tokens, where the full logits of 256 x 512 tokens would be 80 GB.
LOGITS_BUDGET = 256 << 20


def logprobs_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
                         entropy: bool = False, budget: int = LOGITS_BUDGET):
    """``logprobs_from_logits(F.linear(hidden, weight), tokens)`` (and, with
    ``entropy``, ``entropy_from_logits`` of the same logits) without ever holding more
    than a chunk of those logits, in forward or backward.

    hidden [..., H] (the final, normed hidden states), weight [V, H] (the lm head; an
    embedding when tied), tokens [...] -> log-probs [...], or ``(log-probs, entropy)``;
    float32 (float64 for float64 weights). Positions go through the head in chunks whose
    [chunk, V] float32 logits take at most ``budget`` bytes (two such temporaries are
    alive at once, see ``_ChunkedLogprobs``); backward recomputes each chunk's logits from
    ``hidden`` and ``weight`` instead of saving them, as verl's and Liger's fused linear +
    cross-entropy do. Both outputs are differentiable with respect to ``hidden`` and
    ``weight``; values and gradients equal the full-logits path's up to float summation
    order.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
        raise ValueError(f"hidden must be [..., H], got {type(hidden).__name__}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        got = list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be [V, H] with H = {hidden.shape[-1]}, got {got}")
    if budget <= 0:
        raise ValueError(f"budget must be > 0 bytes, got {budget}")
    vocab = weight.shape[0]
    _check_tokens(tokens, hidden.shape[:-1], vocab, f"hidden {list(hidden.shape)}")
    rows = max(1, budget // (4 * vocab))                      # positions per chunk
    logp, ent = _ChunkedLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                       tokens.reshape(-1).long(), rows, entropy)
    logp = logp.view(tokens.shape)
    return (logp, ent.view(tokens.shape)) if entropy else logp


class _ChunkedLogprobs(torch.autograd.Function):
    """``(logp [M], entropy [M] or empty)`` of ``hidden [M, H]`` through ``weight [V, H]``,
    ``rows`` positions at a time. Saved for backward: the inputs and per-position
    ``[M]`` max, logsumexp and entropy, never logits. Chunk temporaries are updated in
    place: forward holds two [rows, V] tensors at most (the logits and logsumexp's or
    softmax's), backward one (two with the entropy's gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, rows, want_entropy):
        m = hidden.shape[0]
        acc = torch.promote_types(weight.dtype, torch.float32)  # as_float's dtype
        f32 = dict(dtype=acc, device=hidden.device)
        logp, shift, lse = (torch.empty(m, **f32) for _ in range(3))
        ent = torch.empty(m if want_entropy else 0, **f32)
        for lo in range(0, m, rows):
            sl = slice(lo, lo + rows)
            # the same values as logprobs_from_logits / entropy_from_logits on these rows
            z = torch.nn.functional.linear(hidden[sl], weight).to(acc)  # [c, V], a fresh tensor
            shift[sl] = z.amax(dim=-1)
            z.sub_(shift[sl, None])
            lse[sl] = torch.logsumexp(z, dim=-1)
            logp[sl] = z.gather(-1, tokens[sl, None]).squeeze(-1) - lse[sl]
            if want_entropy:
                ent[sl] = lse[sl] - torch.softmax(z, dim=-1).mul_(z).sum(-1)
            del z
        ctx.rows, ctx.want_entropy = rows, want_entropy
        ctx.save_for_backward(hidden, weight, tokens, shift, lse, ent)
        ctx.set_materialize_grads(False)
        if not want_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, tokens, shift, lse, ent = ctx.saved_tensors
        if not ctx.want_entropy:
            g_ent = None
        need_h, need_w = ctx.needs_input_grad[:2]
        if (g_logp is None and g_ent is None) or not (need_h or need_w):
            return None, None, None, None, None
        grad_h = torch.empty_like(hidden) if need_h else None
        # weight's gradient accumulates over chunks in float32 (or float64), cast once at the end
        acc = lse.dtype
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for lo in range(0, hidden.shape[0], ctx.rows):
            sl = slice(lo, lo + ctx.rows)
            h = hidden[sl]
            # d logp[tok] / dz = onehot(tok) - p;  d entropy / dz = -p * (log p + entropy);
            # so dz = -p * (g_logp + g_ent * (log p + entropy)) + onehot(tok) * g_logp
            g = torch.nn.functional.linear(h, weight).to(acc)  # recomputed logits [c, V]
            g.sub_(shift[sl, None]).sub_(lse[sl, None])         # log p, as in forward
            if g_ent is None:
                g.exp_().mul_(-g_logp[sl, None])
            else:
                p = g.exp()
                g.add_(ent[sl, None]).mul_(g_ent[sl, None])
                if g_logp is not None:
                    g.add_(g_logp[sl, None])
                g.mul_(p).neg_()
                del p
            if g_logp is not None:
                g.scatter_add_(-1, tokens[sl, None], g_logp[sl, None])
            g = g.to(weight.dtype)
            if need_h:
                grad_h[sl] = g @ weight
            if need_w:
                if g.dtype == acc:
                    grad_w.addmm_(g.t(), h)
                else:
                    grad_w += g.t() @ h
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None
