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

    Two ways, the same result at every real (unmasked) position: the prefixes in one
    pass and the continuations in a second that reads their keys/values
    (``packed=False``), or one pass over one packed row per prefix holding only real
    tokens, ``[prefix ; cont_1 ; ... ; cont_G]``, under a block mask (``packed=True``):
    no padding token is computed, but attention is dense over the packed row, so it is
    chosen (``packed=None``) when its estimated cost (``_packing_pays``) is lower.
    Outputs at padding positions are zeros in the packed way.
    """
    if packed is not False and (pieces := even_groups(index, prefix_ids.shape[0])) is not None:
        # a prompt drawn twice in a step makes its group twice the others: pack it as two
        piece_index, pick, first_piece = pieces
        prefix_mask_p = prefix_mask.index_select(0, pick)
        if packed or _packing_pays(model.config, prefix_mask_p, piece_index, key_mask):
            prefix_out, out = forward_packed(
                model, *(x.index_select(0, pick) for x in (prefix_ids, prefix_positions)), prefix_mask_p,
                piece_index, ids, positions, key_mask)
            return prefix_out.index_select(0, first_piece), out
    if packed is None:
        packed = _packing_pays(model.config, prefix_mask, index, key_mask)
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


def _packed_layout(prefix_mask: torch.Tensor, index: torch.Tensor, cont_mask: torch.Tensor):
    """Where each real token goes in the packed rows: ``(pcol [U, P], ccol [N, T],
    row_len [U])``: prefix token ``(u, j)`` at column ``pcol[u, j]`` of row ``u``,
    continuation token ``(i, j)`` at column ``ccol[i, j]`` of row ``index[i]`` (meaningful
    where the masks are True); continuations follow their prefix in row order."""
    u = prefix_mask.shape[0]
    pvalid, cvalid = prefix_mask.bool(), cont_mask.bool()
    plen, clen = pvalid.sum(1), cvalid.sum(1)
    order = torch.argsort(index, stable=True)                 # rows grouped by prefix
    clen_sorted = clen[order]
    before = clen_sorted.cumsum(0) - clen_sorted              # tokens of earlier rows, all groups
    counts = torch.bincount(index, minlength=u)
    group_first = counts.cumsum(0) - counts
    offset = torch.empty_like(clen)
    offset[order] = plen[index[order]] + before - before[group_first.clamp(max=max(len(index) - 1, 0))][index[order]]
    pcol = pvalid.long().cumsum(1) - 1
    ccol = offset[:, None] + cvalid.long().cumsum(1) - 1
    row_len = plen + torch.zeros(u, dtype=clen.dtype, device=clen.device).index_add_(0, index, clen)
    return pcol, ccol, row_len


def _bins(row_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """First-fit decreasing of packed groups (lengths ``row_len`` [U]) into bins as long
    as the longest group: ``(bin [U], offset [U], bins)``."""
    lengths = row_len.tolist()
    capacity = max(max(lengths), 1)
    free: list[int] = []
    bin_of, offset = [0] * len(lengths), [0] * len(lengths)
    for g in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for k, room in enumerate(free):
            if room >= lengths[g]:
                break
        else:
            k = len(free)
            free.append(capacity)
        bin_of[g], offset[g] = k, capacity - free[k]
        free[k] -= lengths[g]
    dev = row_len.device
    return (torch.tensor(bin_of, dtype=torch.int64, device=dev),
            torch.tensor(offset, dtype=torch.int64, device=dev), len(free))


def _packing_pays(config, prefix_mask: torch.Tensor, index: torch.Tensor, key_mask: torch.Tensor) -> bool:
    """Whether one packed pass (real tokens only, dense attention over each packed row,
    rows padded to the longest) is estimated cheaper than the two-pass way (the ``U``
    prefixes, then ``N`` continuations of ``T`` tokens, padding included). Cost in
    multiply-adds: a token through the projections and MLP, plus 2 * hidden per
    query-key pair (scores and weighted values). Packed rows of at most 64 tokens always
    pay: there per-call overhead dominates, and packing makes one call instead of two."""
    u, p = prefix_mask.shape
    n, t = len(index), key_mask.shape[1] - p
    if n == 0 or t <= 0:
        return False
    h = config.hidden_size
    per_token = 4 * h * h + 3 * h * config.intermediate_size
    _, _, row_len = _packed_layout(prefix_mask, index, key_mask[:, p:])
    length = int(row_len.max())
    if length <= 64:  # short rows: one call instead of two matters more than any flop
        return True
    _, _, bins = _bins(row_len)
    packed = bins * length * per_token + bins * length * length * 2 * h
    two_pass = (u * p + n * t) * per_token + (u * p * p + n * t * (p + t)) * 2 * h
    return packed <= two_pass


def forward_packed(model, prefix_ids: torch.Tensor, prefix_positions: torch.Tensor,
                   prefix_mask: torch.Tensor, index: torch.Tensor, ids: torch.Tensor,
                   positions: torch.Tensor, key_mask: torch.Tensor):
    """``forward_shared`` in one pass over real tokens only. A group is the real tokens
    of prefix ``u`` followed by the real tokens of each of its continuations (in row
    order), back to back; groups are packed into rows as long as the longest group (first
    fit decreasing), the rest of a row is padding. A continuation token sees its group's
    prefix tokens and the earlier tokens of its own continuation, as in the plain forward
    over ``[prefix ; continuation]`` with its key mask. Outputs at padding positions of
    the inputs are zeros."""
    u, p = prefix_ids.shape
    n, t = ids.shape
    dev = ids.device
    pvalid, cvalid = prefix_mask.bool(), key_mask[:, p:].bool()
    pcol, ccol, row_len = _packed_layout(pvalid, index, cvalid)
    bin_of, offset, bins = _bins(row_len)
    length = max(int(row_len.max()), 1)
    pu, pj = pvalid.nonzero(as_tuple=True)
    ci, cj = cvalid.nonzero(as_tuple=True)
    prow, pc = bin_of[pu], offset[pu] + pcol[pu, pj]
    crow, cc = bin_of[index[ci]], offset[index[ci]] + ccol[ci, cj]
    packed_ids = torch.zeros((bins, length), dtype=ids.dtype, device=dev)
    packed_pos = torch.zeros((bins, length), dtype=positions.dtype, device=dev)
    segment = torch.full((bins, length), -2, dtype=torch.int64, device=dev)  # -2 padding, -1 prefix, i row
    group = torch.full((bins, length), -1, dtype=torch.int64, device=dev)
    packed_ids[prow, pc] = prefix_ids[pu, pj]
    packed_pos[prow, pc] = prefix_positions[pu, pj]
    segment[prow, pc] = -1
    group[prow, pc] = pu
    packed_ids[crow, cc] = ids[ci, cj]
    packed_pos[crow, cc] = positions[ci, cj]
    segment[crow, cc] = ci
    group[crow, cc] = index[ci]
    col = torch.arange(length, device=dev)
    valid = segment > -2                                                     # [R, L]
    sees = (group[:, None, :] == group[:, :, None]) & \
        ((segment[:, None, :] == -1) | (segment[:, None, :] == segment[:, :, None]))
    allowed = (sees & valid[:, None, :] & (col[None, :] <= col[:, None])[None]) \
        | torch.eye(length, dtype=torch.bool, device=dev)[None]
    out = model(packed_ids, packed_pos, allowed)                              # [R, L, ...]
    tail = out.shape[2:]
    prefix_out = out.new_zeros((u, p, *tail)).index_put((pu, pj), out[prow, pc])
    cont = out.new_zeros((n, t, *tail)).index_put((ci, cj), out[crow, cc])
    return prefix_out, cont


def forward_distinct(model, ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor,
                     p: int) -> torch.Tensor:
    """``model``'s outputs [N, S, ...] for ``N`` rows of distinct prompts (``ids``,
    ``positions``, ``key_mask`` [N, S], the first ``p`` columns the left-padded prompt):
    several rows' real tokens packed per row where the cost model says that pays
    (outputs at padding positions are then zeros), else the plain padded forward."""
    n, s = ids.shape
    if 0 < p < s and n > 1:
        ident = torch.arange(n, device=ids.device)
        if _packing_pays(model.config, key_mask[:, :p], ident, key_mask):
            prefix_out, out = forward_packed(model, ids[:, :p], positions[:, :p], key_mask[:, :p], ident,
                                             ids[:, p:], positions[:, p:], key_mask)
            return torch.cat([prefix_out, out], 1)
    return model(ids, positions, key_mask)
