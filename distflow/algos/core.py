"""Masked reductions and input checks shared by the advantage estimators and losses.

Conventions (all of ``distflow.algos``):

- token-level tensors are ``[N, T]`` over the RESPONSE tokens;
- ``mask`` ``[N, T]`` is bool or 0/1 numbers: true for real response tokens, false for
  the padding after EOS;
- padded positions never influence a result: they are selected away with
  ``torch.where`` (not multiplied by 0), so even NaN/inf there is harmless.

An empty mask never divides by zero: the mean of no elements is 0.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

WHITEN_EPS = 1e-8  # as verl's / OpenRLHF's masked_whiten

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


# ------------------------------------------------------------------------- checks

def lookup(registry: Mapping[str, Callable], name: str, what: str) -> Callable:
    """Return ``registry[name]``; ValueError listing the known names otherwise."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(registry))
        raise ValueError(f"unknown {what} {name!r}; known: {known}") from None


def as_mask(mask: torch.Tensor, shape: torch.Size | tuple, name: str = "mask") -> torch.Tensor:
    """Check ``mask`` has ``shape`` and only 0/1 values; return it as a bool tensor."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {list(mask.shape)}, expected {list(shape)}")
    if mask.dtype == torch.bool:
        return mask
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        raise ValueError(f"{name} must hold only 0/1, found {mask[bad][0].item()!r}")
    return mask != 0


def check_same_shape(ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    """ValueError naming both shapes if any of ``others`` differs in shape from ``ref``."""
    for name, t in others.items():
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{name} has shape {list(t.shape)}, "
                             f"but {ref_name} has shape {list(ref.shape)}")


def check_2d(name: str, t: torch.Tensor) -> None:
    """ValueError unless ``t`` is a 2-D ``[N, T]`` tensor."""
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be [N, T], got {got}")


def as_float(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a float tensor of at least float32 precision (float64 stays float64)."""
    if t.dtype == torch.float64:
        return t
    return t.float()


# ---------------------------------------------------------------------- reductions

def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over true ``mask`` entries. x, mask: same shape; dim None = all."""
    mask = as_mask(mask, x.shape)
    picked = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return picked.sum() if dim is None else picked.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over true ``mask`` entries.

    x, mask: same shape (e.g. [N, T]). dim None -> scalar; dim=d -> x's shape without d.
    Where nothing is selected the mean is 0 (not NaN).
    """
    mask = as_mask(mask, x.shape)
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Scalar variance of ``x`` over true ``mask`` entries (x, mask: same shape).

    unbiased=True divides by (n - 1), like verl's masked_var and torch.var; with n < 2
    the variance is 0.
    """
    mask = as_mask(mask, x.shape)
    n = mask.sum()
    sq = masked_sum((x - masked_mean(x, mask)) ** 2, mask)
    denom = (n - 1) if unbiased else n
    return torch.where(denom > 0, sq / denom.clamp(min=1).to(x.dtype), torch.zeros_like(sq))


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over true ``mask`` entries; 0 on padding.

    x, mask: same shape, e.g. [N, T] -> [N, T]. mean and var are taken over the whole
    tensor (the batch), var unbiased as in verl. shift_mean=False adds the mean back
    (scale only). Fewer than 2 real entries -> var 0, so a single entry whitens to 0.
    """
    mask = as_mask(mask, x.shape)
    mean = masked_mean(x, mask)
    out = (x - mean) * torch.rsqrt(masked_var(x, mask) + WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, torch.zeros((), dtype=out.dtype, device=out.device))


def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean") -> torch.Tensor:
    """Reduce a per-token loss ``loss_mat`` [N, T] to a scalar over ``mask`` [N, T].

    - "token-mean": sum over all real tokens / number of real tokens (long answers
      weigh more; verl's default, DAPO).
    - "seq-mean-token-sum": per-sequence sum, then mean over sequences.
    - "seq-mean-token-mean": per-sequence mean, then mean over sequences (original
      GRPO).

    The seq-mean modes average over the sequences that have at least one real token;
    an all-padding batch gives 0.
    """
    if agg not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation {agg!r}; known: {', '.join(AGG_MODES)}")
    check_2d("loss_mat", loss_mat)
    mask = as_mask(mask, loss_mat.shape)
    if agg == "token-mean":
        return masked_mean(loss_mat, mask)
    per_seq = masked_sum(loss_mat, mask, dim=-1)
    if agg == "seq-mean-token-mean":
        per_seq = per_seq / mask.sum(-1).clamp(min=1).to(per_seq.dtype)
    return masked_mean(per_seq, mask.any(-1))
