"""Shared-prefix forwards: many continuations of a few distinct prompts.

In GRPO-style batches every prompt is answered ``group_size`` times, so the rows of a
batch repeat the same prompt. ``forward_shared`` runs each distinct prefix through the
model once and lets every continuation row attend to its prefix's keys and values
(gathered per row, so autograd sums the rows' gradients back into the shared prefix).
The result equals the plain forward over ``[prefix ; continuation]`` up to floating-point
summation order; only the ``U`` distinct prefixes are computed instead of all ``N``.
"""
from __future__ import annotations

import torch


class PrefixRecorder:
    """A KV-cache stand-in that keeps each layer's keys and values of one forward pass
    (nothing preallocated, nothing copied: the tensors stay in the autograd graph)."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def check_fits(self, batch: int, new: int) -> None:
        if self.length:
            raise ValueError("a PrefixRecorder records a single forward pass")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def advance(self, n: int) -> None:
        self.length += n

    def expand(self, index: torch.Tensor) -> SharedPrefix:
        """The cache for a batch whose row ``i`` continues recorded prefix ``index[i]``."""
        return SharedPrefix(self.keys, self.values, index, self.length)


class SharedPrefix:
    """A KV-cache stand-in for continuation rows: layer ``l``'s keys are the recorded
    prefix keys of each row's prefix (``index_select``, differentiable) followed by the
    row's own new keys. Read-only: ``advance`` does not make the new keys visible to a
    later call."""

    def __init__(self, keys, values, index: torch.Tensor, length: int):
        self.keys, self.values, self.index, self.length = keys, values, index, length

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def check_fits(self, batch: int, new: int) -> None:
        if batch != len(self.index):
            raise ValueError(f"shared prefix indexes {len(self.index)} rows, got input batch {batch}")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pk = self.keys[layer].index_select(0, self.index)
        pv = self.values[layer].index_select(0, self.index)
        return torch.cat([pk, k], 2), torch.cat([pv, v], 2)

    def advance(self, n: int) -> None:
        pass


def shared_prefixes(tokens: torch.Tensor, mask: torch.Tensor,
                    max_share: float = 0.5) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(first [U], inverse [N])`` when the ``N`` rows of (left-padded) ``tokens`` /
    ``mask`` [N, P] hold only ``U <= max_share * N`` distinct prompts: row ``i`` equals row
    ``first[inverse[i]]`` (tokens and mask). ``None`` when sharing would not pay."""
    n = tokens.shape[0]
    if n < 2:
        return None
    key = torch.where(mask.bool(), tokens, torch.full_like(tokens, -1))
    # fast path: groups of identical rows next to each other (how GRPO batches are laid out)
    starts = torch.ones(n, dtype=torch.bool, device=tokens.device)
    starts[1:] = (key[1:] != key[:-1]).any(1)
    if int(starts.sum()) <= max_share * n:
        return starts.nonzero().squeeze(1), starts.cumsum(0) - 1
    uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
    u = uniq.shape[0]
    if u > max_share * n:
        return None
    first = torch.full((u,), n, dtype=torch.int64, device=tokens.device)
    first.scatter_reduce_(0, inverse, torch.arange(n, device=tokens.device), "amin")
    return first, inverse


def forward_shared(model, prefix_ids: torch.Tensor, prefix_positions: torch.Tensor,
                   prefix_mask: torch.Tensor, index: torch.Tensor, ids: torch.Tensor,
                   positions: torch.Tensor, key_mask: torch.Tensor):
    """``(prefix_out [U, P, ...], out [N, T, ...])`` of ``model``: a ``DecoderLM``, or any
    module with its ``config`` whose forward takes ``(ids, positions, key_mask, cache)``.

    ``prefix_*`` [U, P]: the distinct prefixes; ``ids``, ``positions`` [N, T]: the
    continuations, row ``i`` continuing prefix ``index[i]``; ``key_mask`` [N, P + T]: the
    row's prefix mask followed by its continuation mask.
    """
    rec = PrefixRecorder(model.config.num_hidden_layers)
    prefix_out = model(prefix_ids, prefix_positions, prefix_mask, rec)
    out = model(ids, positions, key_mask, rec.expand(index))
    return prefix_out, out
