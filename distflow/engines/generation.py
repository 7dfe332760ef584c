"""Batched generation with a KV cache over ragged (left-padded) prompts."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from distflow.engines.sampling import SamplingParams, sample, splitmix64, uniform
from distflow.models.prefix import shared_prefixes


@dataclass
class Generation:
    prompts: torch.Tensor
    """[N, P] prompt tokens, left-padded with ``pad_id``."""
    prompt_mask: torch.Tensor
    """[N, P] bool, True at real prompt tokens."""
    responses: torch.Tensor
    """[N, R] generated tokens (EOS included), right-padded with ``pad_id``."""
    response_mask: torch.Tensor
    """[N, R] bool, True at generated tokens up to and including EOS."""
    logprobs: torch.Tensor
    """[N, R] float32 log-prob of each generated token under the sampling policy (0 on padding)."""
    lengths: torch.Tensor
    """[N] int64 number of generated tokens."""


def left_pad(prompts: list[list[int]], pad_id: int,
             width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [N, P], mask [N, P])`` with each prompt right-aligned; P = ``width`` or
    the longest prompt."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    width = width or longest
    if longest > width:
        raise ValueError(f"a prompt has {longest} tokens, more than the width {width}")
    # padded in Python, one tensor each: a slice assignment per row costs more
    tokens = torch.tensor([[pad_id] * (width - len(p)) + [int(t) for t in p] for p in prompts],
                          dtype=torch.int64)
    mask = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts])
    return tokens, mask


PREFILL_GROUPS = 4
"""At most this many prompt-length groups in one prefill (``prefill_groups``)."""
PREFILL_MIN_POSITIONS = 4096
"""Below this many padded prompt positions one padded forward is cheaper than several."""


def prefill_groups(lengths: list[int], width: int) -> list[tuple[torch.Tensor, int]] | None:
    """Rows split into up to ``PREFILL_GROUPS`` groups of similar prompt length (sorted,
    equal counts), each with the longest length in it: ``[(rows, longest), ...]``; or
    ``None`` where one forward over all rows padded to ``width`` is the better deal (fewer
    than ``PREFILL_MIN_POSITIONS`` positions, or grouping saves under a fifth of them)."""
    n = len(lengths)
    if n < 2 or n * width < PREFILL_MIN_POSITIONS:
        return None
    order = sorted(range(n), key=lengths.__getitem__)
    size = -(-n // PREFILL_GROUPS)
    groups = [order[i:i + size] for i in range(0, n, size)]
    if sum(len(g) * lengths[g[-1]] for g in groups) > 0.8 * n * width:
        return None
    return [(torch.tensor(g, dtype=torch.int64), lengths[g[-1]]) for g in groups]


class InferenceEngine:
    """Generates with a ``DecoderLM`` (its KV cache) on the model's device.

    Work is done only for live rows: a row that samples EOS leaves the decode batch at
    once (the last live rows move into its cache slots, so a step costs what its live
    rows cost). The KV cache is allocated once per engine and reused by later calls
    that fit in it (``cache``; ``release_cache`` frees it). ``compact=False`` keeps
    finished rows in the batch until the longest ends (the former behaviour, kept for
    benchmarks and tests); the outputs are the same either way.

    ``max_batch``: at most this many rows decode at once; a call with more prompts runs
    continuous batching: each row that finishes gives its slot to the next waiting
    prompt, which is prefilled and joins the running batch at once."""

    def __init__(self, model, eos_id: int, pad_id: int, max_context: int | None = None,
                 compact: bool = True, max_batch: int | None = None):
        self.model, self.eos_id, self.pad_id = model, eos_id, pad_id
        self.max_context = max_context or model.config.max_position_embeddings
        self.compact = compact
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self.cache = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def release_cache(self) -> None:
        """Drop the preallocated KV cache (the next call allocates a new one)."""
        self.cache = None

    def _cache_for(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        from distflow.models import KVCache

        c = self.cache
        if c is None or not c.fits(batch, max_len, dtype, device):
            if c is not None:  # grow to cover both the old and the new request
                batch, max_len = max(batch, c.capacity), max(max_len, c.max_len)
            self.cache = c = None  # free the old storage first
            c = self.cache = KVCache.allocate(self.model.config, batch, max_len, dtype, device)
        return c

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 generator: torch.Generator | None = None,
                 row_seeds: torch.Tensor | None = None) -> Generation:
        """Sample up to ``max_new_tokens`` per prompt. ``row_seeds`` (int64 [N]) makes each
        row's draws a function of its own seed only (see ``sampling.uniform``)."""
        tokens, mask = left_pad(prompts, self.pad_id)
        return self.generate_padded(tokens, mask, params, generator, row_seeds)

    @torch.no_grad()
    def generate_padded(self, tokens: torch.Tensor, mask: torch.Tensor, params: SamplingParams,
                        generator: torch.Generator | None = None,
                        row_seeds: torch.Tensor | None = None) -> Generation:
        """``generate`` for prompts already left-padded: ``tokens``, ``mask`` [N, P] (every
        row with at least one real token). Leading columns that are padding in every row
        are dropped, so the result is the same as ``generate`` on the unpadded prompts.

        Rows that repeat a prompt (GRPO groups) share its prefill: each distinct prompt
        is run through the model once and its KV cache copied to its rows.

        With ``row_seeds`` a row's draws depend on its seed and step only, so compaction
        (which changes which rows share a batch) leaves sampled tokens unchanged; without,
        rows draw from ``generator`` with ``torch.multinomial`` over the live rows.

        Runs in ``torch.inference_mode`` (less bookkeeping per op than ``no_grad``: 8% on a
        tiny model's forward); the returned tensors are ordinary ones (copied out), so a
        training step can use them."""
        with torch.inference_mode():
            out = self._generate(tokens, mask, params, generator, row_seeds)
        return Generation(*(getattr(out, f.name).clone() for f in dataclasses.fields(out)))

    def _generate(self, tokens, mask, params, generator, row_seeds) -> Generation:
        mask = mask.bool()
        if len(tokens) == 0 or not bool(mask.any(1).all()):
            raise ValueError("every prompt needs at least one token")
        width = int(mask.sum(1).max())
        tokens, mask = tokens[:, tokens.shape[1] - width:], mask[:, mask.shape[1] - width:]
        n, p = tokens.shape
        max_new = params.max_new_tokens
        if p + max_new > self.max_context:
            raise ValueError(f"prompt of {p} tokens + max_new_tokens={max_new} "
                             f"exceeds the model context of {self.max_context}")
        if self.max_batch is not None and n > self.max_batch:
            return self._generate_continuous(tokens, mask, params, generator, row_seeds)
        dev = self.device
        was_training = self.model.training
        self.model.eval()
        dtype = next(self.model.parameters()).dtype
        cache = self._cache_for(n, p + max_new, dtype, dev)
        key_mask = torch.zeros((n, p + max_new), dtype=torch.bool, device=dev)
        key_mask[:, :p] = mask.to(dev)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0).to(dev)
        tokens_dev = tokens.to(dev)
        shared = shared_prefixes(tokens, mask)
        if shared is None:
            cache.start(n)
            logits = self._prefill(tokens_dev, positions, key_mask[:, :p], cache)
        else:  # prefill each distinct prompt once, then give every row its prompt's cache
            first, inverse = (t.to(dev) for t in shared)
            cache.start(len(first))
            logits = self._prefill(tokens_dev[first], positions[first], key_mask[first, :p],
                                   cache).index_select(0, inverse)
            cache.select(inverse)
        next_pos = positions[:, -1] + 1
        responses = torch.full((n, max_new), self.pad_id, dtype=torch.int64, device=dev)
        logps = torch.zeros((n, max_new), dtype=torch.float32, device=dev)
        lengths = torch.zeros(n, dtype=torch.int64, device=dev)
        live = torch.arange(n, device=dev)      # the output row of each batch row
        done = torch.zeros(n, dtype=torch.bool, device=dev)  # only used when compact=False
        uniforms = None  # every step's draw of every row at once: [N, max_new_tokens]
        if row_seeds is not None and not params.greedy:
            row_keys = splitmix64(row_seeds.to(torch.int64))
            uniforms = uniform(splitmix64(row_keys[:, None] + torch.arange(max_new))).to(dev)
        steps = 0
        for t in range(max_new):
            tok, logp = sample(logits, params, generator, uniforms=None if uniforms is None else uniforms[:, t])
            steps = t + 1
            if self.compact:
                responses[live, t] = tok
                logps[live, t] = logp.float()
                lengths[live] = t + 1
                finished = tok == self.eos_id
            else:
                tok = torch.where(done, torch.full_like(tok, self.pad_id), tok)
                responses[:, t] = tok
                logps[:, t] = torch.where(done, torch.zeros_like(logp), logp).float()
                lengths += (~done).long()
                key_mask[:, p + t] = ~done  # the EOS token itself is a key, as before
                done = done | (tok == self.eos_id)
                finished = None
            if t == max_new - 1:
                break
            if finished is not None and bool(finished.any()):
                keep = ~finished
                m = int(keep.sum())
                if m == 0:
                    break
                # the last live rows move into the places of rows that finished
                holes = finished[:m].nonzero().squeeze(1)
                movers = keep[m:].nonzero().squeeze(1) + m
                cache.move(movers, holes, m)
                order = torch.arange(len(live), device=dev)
                order[holes] = movers
                order = order[:m]
                live, tok, next_pos = live[order], tok[order], next_pos[order]
                key_mask = key_mask[order]
                if uniforms is not None:
                    uniforms = uniforms[order]
            elif finished is None and bool(done.all()):
                break
            if finished is not None:
                key_mask[:, p + t] = True
            logits = self.model(tok[:, None], next_pos[:, None], key_mask[:, :p + t + 1], cache)[:, -1]
            next_pos = next_pos + 1
        self.model.train(was_training)
        responses = responses[:, :steps].cpu()
        lengths = lengths.cpu()
        response_mask = torch.arange(steps)[None, :] < lengths[:, None]
        return Generation(tokens, mask, responses, response_mask, logps[:, :steps].cpu(), lengths)

    def _prefill(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 cache) -> torch.Tensor:
        """Logits [n, V] at each prompt's last slot; keys and values written at ``[0, P)`` of
        the cache's ``n`` rows (left-padded ``tokens``/``positions``/``mask`` [n, P]).

        Prompts of very different lengths are run in a few groups of similar length, each
        padded only to its own longest (``prefill_groups``), their keys and values copied
        right-aligned into the cache; the columns left of a group stay masked. At batch 256
        of 16-64-token prompts this computes 0.72x the positions of one padded forward."""
        from distflow.models import KVCache

        n, p = tokens.shape
        groups = prefill_groups(mask.sum(1).tolist(), p)
        if groups is None:
            return self.model(tokens, positions, mask, cache)[:, -1]
        scratch = KVCache.allocate(self.model.config, max(len(rows) for rows, _ in groups), p,
                                   cache.keys[0].dtype, tokens.device)
        logits = None
        for rows, width in groups:
            rows = rows.to(tokens.device)
            scratch.start(len(rows))
            cols = slice(p - width, p)
            out = self.model(tokens[rows, cols], positions[rows, cols], mask[rows, cols], scratch)[:, -1]
            if logits is None:
                logits = out.new_empty((n, out.shape[-1]))
            logits[rows] = out
            for dst, src in ((cache.keys, scratch.keys), (cache.values, scratch.values)):
                for d, s_ in zip(dst, src):
                    d[rows, :, cols] = s_[:, :, :width]
        cache.length = p
        return logits

    def _generate_continuous(self, tokens, mask, params, generator, row_seeds) -> Generation:
        """``_generate`` for more prompts than ``max_batch``: rows decode in one batch of at
        most ``max_batch``; a finished row leaves it and the next waiting prompt takes its
        slot. Every row of the batch writes its keys at one shared cache column per step;
        a prompt joining at column ``c`` is placed at columns ``[c - P, c)`` (``P`` the
        prompt width) and masked out everywhere before, so each row attends exactly its
        own prompt and tokens. While prompts wait the batch is full, so at most
        ``ceil(N / max_batch) + 1`` times ``max_new_tokens`` decode steps run: the cache
        holds ``max_batch`` rows of ``P`` plus that many columns."""
        from distflow.models import KVCache

        n, p = tokens.shape
        max_new, b = params.max_new_tokens, self.max_batch
        dev = self.device
        was_training = self.model.training
        self.model.eval()
        dtype = next(self.model.parameters()).dtype
        width = p + max_new * (-(-n // b) + 1)
        cache = self._cache_for(b, width, dtype, dev)
        scratch = KVCache.allocate(self.model.config, b, p, dtype, dev)  # prefill of joining rows
        tokens_dev, mask_dev = tokens.to(dev), mask.to(dev)
        positions = (mask_dev.long().cumsum(-1) - 1).clamp(min=0)
        responses = torch.full((n, max_new), self.pad_id, dtype=torch.int64, device=dev)
        logps = torch.zeros((n, max_new), dtype=torch.float32, device=dev)
        lengths = torch.zeros(n, dtype=torch.int64, device=dev)
        uniforms = None
        if row_seeds is not None and not params.greedy:
            row_keys = splitmix64(row_seeds.to(torch.int64))
            uniforms = uniform(splitmix64(row_keys[:, None] + torch.arange(max_new))).to(dev)

        def prefill(rows: torch.Tensor, column: int):
            """Logits of ``rows``' prompts, their keys/values written at ``[column - p, column)``
            of cache rows ``[cache.batch, cache.batch + len(rows))``."""
            k = len(rows)
            scratch.start(k)
            logits = self.model(tokens_dev[rows], positions[rows], mask_dev[rows], scratch)[:, -1]
            m = cache.batch
            for dst, src in ((cache._keys, scratch.keys), (cache._values, scratch.values)):
                for d, s_ in zip(dst, src):
                    d[m:m + k, :, column - p:column] = s_
            cache._use(m + k)
            km = torch.zeros((k, width), dtype=torch.bool, device=dev)
            km[:, column - p:column] = mask_dev[rows]
            return logits, km

        cache.start(min(b, n))
        cache._use(0)  # prefill adds the rows; the first prompts end at column p
        cache.length = p
        first = torch.arange(min(b, n), device=dev)
        logits, key_mask = prefill(first, p)
        live, steps_done = first, torch.zeros(len(first), dtype=torch.int64, device=dev)
        next_pos = positions[first, -1] + 1
        waiting = n - len(first)
        while len(live):
            u = None if uniforms is None else uniforms[live, steps_done]
            tok, logp = sample(logits, params, generator, uniforms=u)
            responses[live, steps_done] = tok
            logps[live, steps_done] = logp.float()
            steps_done = steps_done + 1
            lengths[live] = steps_done
            finished = (tok == self.eos_id) | (steps_done == max_new)
            keep = ~finished
            m = int(keep.sum())
            if m < len(live):
                holes = finished[:m].nonzero().squeeze(1)
                movers = keep[m:].nonzero().squeeze(1) + m
                if m:
                    cache.move(movers, holes, m)
                else:
                    cache._use(0)
                order = torch.arange(len(live), device=dev)
                order[holes] = movers
                order = order[:m]
                live, tok, next_pos = live[order], tok[order], next_pos[order]
                steps_done, key_mask = steps_done[order], key_mask[order]
            parts = []
            if m:
                c = cache.length
                key_mask[:, c] = True
                parts.append(self.model(tok[:, None], next_pos[:, None], key_mask[:, :c + 1], cache)[:, -1])
                next_pos = next_pos + 1
            if waiting and m < b:
                k = min(b - m, waiting)
                rows = torch.arange(n - waiting, n - waiting + k, device=dev)
                waiting -= k
                new_logits, new_mask = prefill(rows, cache.length)
                parts.append(new_logits)
                live = torch.cat([live, rows])
                steps_done = torch.cat([steps_done, torch.zeros(k, dtype=torch.int64, device=dev)])
                next_pos = torch.cat([next_pos, positions[rows, -1] + 1])
                key_mask = torch.cat([key_mask, new_mask])
            if not parts:
                break
            logits = torch.cat(parts) if len(parts) > 1 else parts[0]
        self.model.train(was_training)
        steps = int(lengths.max())
        responses, lengths = responses[:, :steps].cpu(), lengths.cpu()
        response_mask = torch.arange(steps)[None, :] < lengths[:, None]
        return Generation(tokens, mask, responses, response_mask, logps[:, :steps].cpu(), lengths)
