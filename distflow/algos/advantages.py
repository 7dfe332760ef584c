"""Advantage estimators, registered by name in ``ADVANTAGES``.

Every estimator returns ``(advantages [N, T], returns [N, T])``, zero on padding.

Signatures::

    grpo(rewards [N], mask [N, T], group_ids [N], norm_by_std=True, eps=1e-6)
    rloo(rewards [N], mask [N, T], group_ids [N])
    reinforce_pp(rewards [N] or [N, T], mask [N, T], group_ids=None, gamma=1.0, whiten=True)
    gae(token_rewards [N, T] or [N], values [N, T], mask [N, T], gamma=1.0, lam=0.95,
        whiten=True)

``group_ids`` (int) marks the samples that answer the same prompt. A sequence-level
reward ``[N]`` given where token rewards are expected sits on the last real token of
its row. For grpo and rloo ``returns`` equals ``advantages`` (as in verl).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from distflow.algos.core import (as_float, as_mask, check_2d, check_same_shape, lookup,
                                 masked_whiten)

GRPO_EPS = 1e-6  # verl's epsilon in compute_grpo_outcome_advantage


# ------------------------------------------------------------------------- helpers

def _check_group_ids(group_ids: torch.Tensor, n: int) -> None:
    """ValueError unless group_ids is an integer tensor of shape [n]."""
    if not isinstance(group_ids, torch.Tensor) or tuple(group_ids.shape) != (n,):
        got = (list(group_ids.shape) if isinstance(group_ids, torch.Tensor)
               else type(group_ids).__name__)
        raise ValueError(f"group_ids must be [N] = [{n}], got {got}")
    dt = group_ids.dtype
    if dt.is_floating_point or dt.is_complex or dt == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {dt}")


def _check_seq_inputs(rewards: torch.Tensor, mask: torch.Tensor,
                      group_ids: torch.Tensor | None) -> torch.Tensor:
    """Validate rewards [N], mask [N, T], group_ids [N] (int) and return mask as bool."""
    check_2d("mask", mask)
    n = mask.shape[0]
    if not isinstance(rewards, torch.Tensor) or tuple(rewards.shape) != (n,):
        got = list(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"rewards must be [N] = [{n}] (N from mask {list(mask.shape)}), got {got}")
    if group_ids is not None:
        _check_group_ids(group_ids, n)
    return as_mask(mask, mask.shape)


def _broadcast(seq_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """seq_values [N] -> [N, T]: the value on every real token, 0 on padding."""
    zero = torch.zeros((), dtype=seq_values.dtype, device=seq_values.device)
    return torch.where(mask, seq_values[:, None], zero)


def _group_sum(x: torch.Tensor, inv: torch.Tensor, g: int) -> torch.Tensor:
    """Per-sample sum of ``x`` [N] over its group; inv [N] in [0, g)."""
    return torch.zeros(g, dtype=x.dtype, device=x.device).index_add_(0, inv, x)[inv]


def _group_stats(r: torch.Tensor, group_ids: torch.Tensor):
    """For r, group_ids [N]: (group index inv [N], number of groups g, and per sample
    its group's size, reward sum and "all rewards equal" flag, each [N])."""
    _, inv = torch.unique(group_ids, return_inverse=True)
    g = int(inv.max()) + 1 if inv.numel() else 0
    count = torch.bincount(inv, minlength=g)[inv].to(r.dtype)
    fill = torch.full((g,), torch.inf, dtype=r.dtype, device=r.device)
    hi = (-fill).scatter_reduce(0, inv, r, "amax")[inv]
    lo = fill.scatter_reduce(0, inv, r, "amin")[inv]
    return inv, g, count, _group_sum(r, inv, g), hi == lo


def place_at_last_token(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token rewards [N, T] from rewards [N] (put on each row's last real token) or
    [N, T] (kept, padding zeroed). A row with no real token gets no reward."""
    check_2d("mask", mask)
    mask = as_mask(mask, mask.shape)
    if not isinstance(rewards, torch.Tensor) or rewards.dim() not in (1, 2):
        got = list(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"rewards must be [N] or [N, T] with [N, T] = {list(mask.shape)}, "
                         f"got {got}")
    rewards = as_float(rewards)
    if rewards.dim() == 2:
        check_same_shape("mask", mask, rewards=rewards)
        return torch.where(mask, rewards, torch.zeros((), dtype=rewards.dtype,
                                                      device=rewards.device))
    _check_seq_inputs(rewards, mask, None)
    t = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, t, -1).max(dim=-1, keepdim=True).values  # [N, 1]; -1 if empty
    return torch.where(t[None, :] == last, rewards[:, None],
                       torch.zeros((), dtype=rewards.dtype, device=rewards.device))


# --------------------------------------------------------------------- estimators

def grpo(rewards: torch.Tensor, mask: torch.Tensor, group_ids: torch.Tensor,
         norm_by_std: bool = True, eps: float = GRPO_EPS):
    """GRPO outcome advantage: A_i = (r_i - mean_g) / (std_g + eps), on every real token.

    rewards [N], mask [N, T], group_ids [N] -> (advantages [N, T], returns [N, T]).
    std_g is the UNBIASED std (divides by n_g - 1), as torch.std in verl.
    norm_by_std=False gives Dr.GRPO's A_i = r_i - mean_g. A group of size 1, or one whose
    rewards are all equal, gets exactly 0 (verl gives a size-1 group A = r).
    """
    mask = _check_seq_inputs(rewards, mask, group_ids)
    r = as_float(rewards)
    inv, g, count, total, all_equal = _group_stats(r, group_ids)
    centered = torch.where(all_equal, torch.zeros_like(r), r - total / count)
    if norm_by_std:
        std = torch.sqrt(_group_sum(centered ** 2, inv, g) / (count - 1).clamp(min=1))
        centered = centered / (std + eps)
    adv = _broadcast(centered, mask)
    return adv, adv.clone()


def rloo(rewards: torch.Tensor, mask: torch.Tensor, group_ids: torch.Tensor):
    """RLOO: A_i = r_i - mean of the OTHER samples of i's group, on every real token.

    rewards [N], mask [N, T], group_ids [N] -> (advantages [N, T], returns [N, T]).
    Equals n/(n-1) * (r_i - mean_g). A group of size 1 gets 0 (verl gives A = r).
    """
    mask = _check_seq_inputs(rewards, mask, group_ids)
    r = as_float(rewards)
    _, _, count, total, all_equal = _group_stats(r, group_ids)
    others_mean = (total - r) / (count - 1).clamp(min=1)
    adv_seq = torch.where((count > 1) & ~all_equal, r - others_mean, torch.zeros_like(r))
    adv = _broadcast(adv_seq, mask)
    return adv, adv.clone()


def reinforce_pp(rewards: torch.Tensor, mask: torch.Tensor,
                 group_ids: torch.Tensor | None = None, gamma: float = 1.0,
                 whiten: bool = True):
    """REINFORCE++: discounted reward-to-go per token, whitened over the whole batch.

    rewards [N] (put on the last real token) or token rewards [N, T] (e.g. with a
    per-token KL penalty already folded in by the caller); mask [N, T]; group_ids is
    accepted for a uniform signature and unused.
    returns_t = sum_{k >= t, real} gamma^(#real tokens between) * r_k  (padding skipped);
    advantages = masked_whiten(returns) if whiten else returns. Both [N, T], 0 on padding.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    check_2d("mask", mask)
    mask = as_mask(mask, mask.shape)
    if group_ids is not None:
        _check_group_ids(group_ids, mask.shape[0])
    tok = place_at_last_token(rewards, mask)
    returns = torch.zeros_like(tok)
    running = torch.zeros_like(tok[:, 0])
    for t in reversed(range(tok.shape[1])):
        running = torch.where(mask[:, t], tok[:, t] + gamma * running, running)
        returns[:, t] = torch.where(mask[:, t], running, 0.0)
    adv = masked_whiten(returns, mask) if whiten else returns.clone()
    return adv, returns


def gae(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
        gamma: float = 1.0, lam: float = 0.95, whiten: bool = True):
    """PPO's generalized advantage estimation.

    token_rewards [N, T] (or [N], put on the last real token), values [N, T], mask [N, T]
    -> (advantages [N, T], returns [N, T]), 0 on padding.
    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1},
    with V and A beyond the last real token = 0. Padded positions are skipped by the
    recursion (so masked tokens inside a row, e.g. tool outputs, are passed over as in
    verl). returns = A + V (unwhitened); advantages = masked_whiten(A) over the batch
    when whiten=True (as verl / OpenRLHF).
    """
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
    check_2d("values", values)
    check_same_shape("values", values, mask=mask)
    mask = as_mask(mask, values.shape)
    tok = place_at_last_token(token_rewards, mask)
    v = torch.where(mask, as_float(values).to(tok.dtype), 0.0)
    adv = torch.zeros_like(tok)
    next_v = torch.zeros_like(tok[:, 0])
    last_a = torch.zeros_like(tok[:, 0])
    for t in reversed(range(tok.shape[1])):
        delta = tok[:, t] + gamma * next_v - v[:, t]
        a_t = delta + gamma * lam * last_a
        real = mask[:, t]
        next_v = torch.where(real, v[:, t], next_v)
        last_a = torch.where(real, a_t, last_a)
        adv[:, t] = torch.where(real, a_t, 0.0)
    returns = adv + v
    if whiten:
        adv = masked_whiten(adv, mask)
    return adv, returns


ADVANTAGES: dict[str, Callable] = {
    "grpo": grpo,
    "rloo": rloo,
    "reinforce_pp": reinforce_pp,
    "gae": gae,
}


def get_advantage(name: str) -> Callable:
    """The estimator registered as ``name`` in ADVANTAGES; ValueError lists the known."""
    return lookup(ADVANTAGES, name, "advantage estimator")
