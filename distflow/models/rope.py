"""Rotary position embeddings: the inverse frequencies of each ``rope_type`` checkpoints use.

``rope_scaling`` is the HF dict (``config.json``'s ``rope_scaling`` in transformers 4.x,
``rope_parameters`` in 5.x) normalised by ``normalize_rope_scaling``: ``None`` for plain
RoPE, else ``{"rope_type": ..., <that type's keys>}``. ``inv_frequencies`` returns what HF's
``ROPE_INIT_FUNCTIONS`` return for the same config: ``(inv_freq [d/2] fp32,
attention_scaling)``, the factor cos and sin are multiplied by.

Supported: ``default``, ``linear`` (position interpolation), ``llama3`` (Llama 3.1+),
``yarn`` (Qwen2.5 long context, DeepSeek's ``mscale`` variant). Not supported, refused
with an error: ``dynamic`` (its frequencies change with the longest sequence seen, which a
KV cache cannot follow), ``longrope``, and ``partial_rotary_factor`` < 1.
"""
from __future__ import annotations

import math
from typing import Any

import torch

ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # (required, optional)
    "linear": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "yarn": (("factor", "original_max_position_embeddings"),
             ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")),
}
# keys HF writes into the dict that carry no information for us
_IGNORED = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


def normalize_rope_scaling(hf: dict[str, Any], max_position_embeddings: int) -> dict[str, Any] | None:
    """The rope-scaling dict of an HF ``config.json`` (either spelling), or ``None`` for plain
    RoPE. ``original_max_position_embeddings`` defaults to ``max_position_embeddings`` as in
    transformers. Raises ``ValueError`` naming the unsupported type or key."""
    spec = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    rope_type = spec.get("rope_type", spec.get("type", "default"))
    partial = spec.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"partial_rotary_factor={partial} is not supported (rotary on the whole head only)")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: {ROPE_TYPES}")
    if rope_type == "default":
        return None
    if rope_type in ("llama3", "yarn"):
        spec.setdefault("original_max_position_embeddings",
                        hf.get("original_max_position_embeddings", max_position_embeddings))
    out = {"rope_type": rope_type}
    out.update({k: v for k, v in spec.items() if k not in _IGNORED and v is not None})
    check_rope_scaling(out)
    return out


def check_rope_scaling(scaling: dict[str, Any] | None) -> None:
    """``ValueError`` for a type we do not implement, a missing or unknown key, or a bad value."""
    if scaling is None:
        return
    rope_type = scaling.get("rope_type")
    if rope_type not in _KEYS:
        raise ValueError(f"rope_scaling needs rope_type in {tuple(_KEYS)}, got {rope_type!r}")
    required, optional = _KEYS[rope_type]
    missing = [k for k in required if k not in scaling]
    unknown = sorted(set(scaling) - {"rope_type", *required, *optional})
    if missing or unknown:
        raise ValueError(f"rope_scaling of type {rope_type!r}: missing keys {missing}, unknown keys {unknown} "
                         f"(expected {list(required)} and optionally {list(optional)})")
    if not scaling["factor"] > 0:
        raise ValueError(f"rope_scaling factor must be > 0, got {scaling['factor']}")
    if rope_type == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"] > 0:
        raise ValueError(f"llama3 rope_scaling needs high_freq_factor > low_freq_factor > 0, got "
                         f"{scaling['high_freq_factor']} and {scaling['low_freq_factor']}")


def inv_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None,
                    device: torch.device | str | None = None) -> tuple[torch.Tensor, float]:
    """``(inv_freq [head_dim / 2] fp32, attention_scaling)`` for rotary type ``scaling``."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponent)
    if scaling is None:
        return inv_freq, 1.0
    kind, factor = scaling["rope_type"], scaling["factor"]
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        return _llama3(inv_freq, factor, scaling), 1.0
    return _yarn(inv_freq, head_dim, theta, factor, scaling)


def _llama3(inv_freq: torch.Tensor, factor: float, s: dict[str, Any]) -> torch.Tensor:
    """Long wavelengths (over ``original / low_freq_factor``) divided by ``factor``, short
    ones (under ``original / high_freq_factor``) kept, a linear blend in between."""
    context = s["original_max_position_embeddings"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(medium, blended, scaled)


def _yarn(inv_freq: torch.Tensor, head_dim: int, theta: float, factor: float,
          s: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN: dimensions that rotate fewer than ``beta_slow`` times over the original context
    are interpolated (divided by ``factor``), those over ``beta_fast`` times kept, a linear
    ramp in between; cos/sin are scaled by ``0.1 ln(factor) + 1`` (or the given factor)."""
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s.get("attention_factor")
    if attention is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    context = s["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=inv_freq.device) - low)
            / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    return inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate, float(attention)
