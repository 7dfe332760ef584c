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
                   positions: torch.Tensor, key_mask: torch.Tensor, packed: bool | None = None):
    """``(prefix_out [U, P, ...], out [N, T, ...])`` of ``model``: a ``DecoderLM``, or any
    module with its ``config`` whose forward takes ``(ids, positions, key_mask, cache)``.

    ``prefix_*`` [U, P]: the distinct prefixes; ``ids``, ``positions`` [N, T]: the
    continuations, row ``i`` continuing prefix ``index[i]``; ``key_mask`` [N, P + T]: the
    row's prefix mask followed by its continuation mask.

    Two ways, the same result: the prefixes in one pass and the continuations in a second
    that reads their keys/values (``packed=False``), or one pass over one packed row per
    prefix, ``[prefix ; cont_1 ; ... ; cont_G]``, under a block mask (``packed=True``): half
    the ops, but dense attention over the packed row, so it is chosen (``packed=None``)
    only where that costs little: short packed rows, balanced groups.
    """
    if packed is not False and (pieces := even_groups(index, prefix_ids.shape[0])) is not None:
        # a prompt drawn twice in a step makes its group twice the others: pack it as two
        piece_index, pick, first_piece = pieces
        if packed or _packing_pays(prefix_ids.shape[1], ids.shape[1], piece_index, len(pick)):
            prefix_out, out = forward_packed(
                model, *(x.index_select(0, pick) for x in (prefix_ids, prefix_positions, prefix_mask)),
                piece_index, ids, positions, key_mask)
            return prefix_out.index_select(0, first_piece), out
    if packed is None:
        packed = _packing_pays(prefix_ids.shape[1], ids.shape[1], index, prefix_ids.shape[0])
    if packed:
        return forward_packed(model, prefix_ids, prefix_positions, prefix_mask, index, ids,
                              positions, key_mask)
    rec = PrefixRecorder(model.config.num_hidden_layers)
    prefix_out = model(prefix_ids, prefix_positions, prefix_mask, rec)
    out = model(ids, positions, key_mask, rec.expand(index))
    return prefix_out, out


def even_groups(index: torch.Tensor, u: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Split the groups of ``index`` [N] (row ``i`` continues prefix ``index[i] < u``) that
    are larger than the most common group size into pieces of that size, so a GRPO batch
    where a prompt was drawn twice still packs evenly instead of taking the two-pass path.

    Returns ``(piece_index [N], pick [U'], first_piece [u])``: row ``i`` continues piece
    ``piece_index[i]``, piece ``j`` is prefix ``pick[j]`` (each prefix has at least one
    piece), prefix ``k``'s first piece is ``first_piece[k]``. ``None`` when no group is
    oversized."""
    n = len(index)
    if n == 0:
        return None
    counts = torch.bincount(index, minlength=u)
    sizes = counts[counts > 0]
    freq = torch.bincount(sizes)
    mode = int((freq == freq.max()).nonzero().max())  # most common size (ties: the largest)
    if int(sizes.max()) <= mode:
        return None
    rank = _rank_in_group(index, counts)
    pieces = ((counts + mode - 1) // mode).clamp(min=1)
    first_piece = pieces.cumsum(0) - pieces
    pick = torch.repeat_interleave(torch.arange(u, device=index.device), pieces)
    return first_piece[index] + rank // mode, pick, first_piece


def _rank_in_group(index: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Row ``i``'s position among the rows of its group ``index[i]`` (in row order);
    ``counts = bincount(index)``."""
    order = torch.argsort(index, stable=True)
    rank = torch.empty(len(index), dtype=torch.int64, device=index.device)
    rank[order] = torch.arange(len(index), device=index.device) - (counts.cumsum(0) - counts)[index[order]]
    return rank


def _packing_pays(p: int, t: int, index: torch.Tensor, u: int) -> bool:
    n = len(index)
    g = int(torch.bincount(index, minlength=u).max()) if n else 0
    length = p + g * t
    if u * g > 1.25 * n:  # unequal groups: padding slots would be computed too
        return False
    # attention scores: packed rows vs prefix + each continuation over its prefix
    return length <= 64 or u * length * length <= 2 * (u * p * p + n * t * (p + t))


def forward_packed(model, prefix_ids: torch.Tensor, prefix_positions: torch.Tensor,
                   prefix_mask: torch.Tensor, index: torch.Tensor, ids: torch.Tensor,
                   positions: torch.Tensor, key_mask: torch.Tensor):
    """``forward_shared`` in one pass: row ``u`` holds prefix ``u`` followed by the (up to
    ``G``) continuations of it, each in its own slot of ``T`` tokens; a continuation token
    sees the valid prefix keys and the valid earlier keys of its own slot, as in the plain
    forward over ``[prefix ; continuation]``. Slots no row fills are masked padding."""
    u, p = prefix_ids.shape
    t = ids.shape[1]
    dev = ids.device
    counts = torch.bincount(index, minlength=u)
    g = int(counts.max())
    slot = _rank_in_group(index, counts)

    def pack(x: torch.Tensor, fill) -> torch.Tensor:
        out = torch.full((u, g, t), fill, dtype=x.dtype, device=dev)
        out[index, slot] = x
        return out.view(u, g * t)

    all_ids = torch.cat([prefix_ids, pack(ids, 0)], 1)
    all_pos = torch.cat([prefix_positions, pack(positions, 0)], 1)
    valid = torch.cat([prefix_mask.bool(), pack(key_mask[:, p:].bool(), False)], 1)   # [U, L]
    length = p + g * t
    block = torch.cat([torch.full((p,), -1, device=dev),
                       torch.arange(g, device=dev).repeat_interleave(t)])            # [L]
    pos = torch.arange(length, device=dev)
    structure = (pos[None, :] <= pos[:, None]) & ((block[None, :] == -1) | (block[None, :] == block[:, None]))
    allowed = (structure[None] & valid[:, None, :]) | torch.eye(length, dtype=torch.bool, device=dev)[None]
    out = model(all_ids, all_pos, allowed)
    cont = out[:, p:].reshape(u, g, t, *out.shape[2:])[index, slot]
    return out[:, :p], cont
