"""Per-token KL estimators between the policy and a reference, registered in
``KL_ESTIMATORS``.

Each takes ``logp`` and ``ref_logp`` (same shape, e.g. [N, T]: log-probs of the sampled
tokens, sampled from the policy) and returns a same-shaped per-token estimate of
KL(policy || ref). Reduce with ``masked_mean``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from distflow.algos.core import as_float, check_same_shape, lookup

K3_CLAMP = 10.0     # verl clamps low_var_kl to [-10, 10]
LOG_RATIO_CLAMP = 20.0  # keeps exp() finite (and its backward free of inf * 0)


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = logp - ref_logp: unbiased, high variance, can be negative. [...] -> [...]."""
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = 0.5 * (logp - ref_logp)^2: biased, low variance, >= 0. [...] -> [...]."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 (Schulman's low-variance estimator, verl's "low_var_kl"). [...] -> [...].

    With x = ref_logp - logp: k3 = exp(x) - x - 1, unbiased and >= 0 (0 iff equal).
    Computed as expm1(x) - x for accuracy near 0; x is clamped to +-20 and the result
    to [0, 10] (verl clamps to [-10, 10]; the true value is never negative).
    """
    x = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (torch.expm1(x) - x).clamp(0.0, K3_CLAMP)


KL_ESTIMATORS: dict[str, Callable] = {
    "k1": kl_k1,
    "kl": kl_k1,          # verl's name
    "k2": kl_k2,
    "mse": kl_k2,         # verl's name
    "k3": kl_k3,
    "low_var_kl": kl_k3,  # verl's name
}


def get_kl_estimator(name: str) -> Callable:
    """The estimator registered as ``name`` in KL_ESTIMATORS; ValueError lists the known."""
    return lookup(KL_ESTIMATORS, name, "KL estimator")


def kl_divergence(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL estimate of kind ``kind`` (see KL_ESTIMATORS).

    logp, ref_logp: same shape (e.g. [N, T]) -> same shape, float32 or float64.
    """
    fn = get_kl_estimator(kind)
    check_same_shape("logp", logp, ref_logp=ref_logp)
    return fn(as_float(logp), as_float(ref_logp))
