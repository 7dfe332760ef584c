"""Token sampling: temperature, top-k, top-p (nucleus), greedy."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(kw_only=True, frozen=True)
class SamplingParams:
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 keeps every token."""
    max_new_tokens: int = 32

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"bad sampling params: temperature={self.temperature} (>= 0), "
                             f"top_p={self.top_p} (in (0, 1]), top_k={self.top_k} (>= 0)")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``logits`` [B, V] with tokens outside the top-k / top-p set at -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already cover top_p
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _MIX1, _MIX2 = (_signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9),
                         _signed(0x94D049BB133111EB))


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 mix of int64 [...] (int64 arithmetic wraps, as the hash needs)."""
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def uniform(keys: torch.Tensor) -> torch.Tensor:
    """float64 [B] in [0, 1), a pure function of each int64 key: counter-based
    randomness, so a sample's draw does not depend on which rank or batch it is in."""
    return _shr(splitmix64(keys), 11).double() * 2.0 ** -53


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           uniforms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [B] and their log-probs [B] under the temperature-scaled policy.

    With ``uniforms`` (float64 [B] in [0, 1), e.g. ``uniform(keys)`` of one counter-based
    key per row and decoding step) each row draws by inverse CDF from its own stream: the
    same sample gets the same tokens on any placement; without, ``torch.multinomial``.
    The log-prob is taken before top-k/top-p truncation: it is the policy's own
    probability, the one an RL loss compares against (as verl and TRL do).
    """
    logits = logits.float()
    if params.greedy:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    scaled = logits / params.temperature
    probs = torch.softmax(filter_logits(scaled, params.top_k, params.top_p), -1)
    if uniforms is None:
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    else:  # inverse-CDF sampling with one uniform per row
        cdf = probs.double().cumsum(-1)
        u = uniforms.to(cdf.device)[:, None] * cdf[:, -1:]
        tokens = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)
        # never pick a token the filters removed (possible only at a float boundary)
        tokens = torch.where(probs.gather(-1, tokens[:, None]).squeeze(-1) > 0, tokens, probs.argmax(-1))
    return tokens, torch.log_softmax(scaled, -1).gather(-1, tokens[:, None]).squeeze(-1)
