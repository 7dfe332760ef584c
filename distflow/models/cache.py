"""A preallocated key/value cache for incremental decoding with ``DecoderLM``."""
from __future__ import annotations

import torch

from distflow.models.config import ModelConfig


class KVCache:
    """Per-layer keys and values ``[B, num_key_value_heads, max_len, head_dim]``.

    Slots ``[0, length)`` are filled. A ``DecoderLM`` forward with ``T`` new tokens writes
    every layer's keys/values at ``[length, length + T)`` and then advances ``length`` by
    ``T`` (once, after the last layer). Keys are stored after rotary embedding.

    The storage may hold more rows than are in use: ``keys``/``values`` are views of the
    first ``batch`` rows (``start`` picks how many), so an engine allocates one cache and
    reuses it across calls, and ``select`` drops finished rows in place (compaction).
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        if not keys or len(keys) != len(values):
            raise ValueError(f"need one key and one value tensor per layer, "
                             f"got {len(keys)} and {len(values)}")
        shape = keys[0].shape
        for k, v in zip(keys, values):
            if k.dim() != 4 or k.shape != shape or v.shape != shape:
                raise ValueError(f"every cache tensor must be [B, kv_heads, max_len, head_dim] of one shape; "
                                 f"got {tuple(k.shape)} and {tuple(v.shape)} (first {tuple(shape)})")
        self._keys, self._values = keys, values
        self.keys, self.values = keys, values
        self.length = 0

    @classmethod
    def allocate(cls, config: ModelConfig, batch: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> KVCache:
        """An empty cache for ``batch`` rows of up to ``max_len`` tokens (prompt + generated)."""
        if batch < 1 or max_len < 1:
            raise ValueError(f"batch ({batch}) and max_len ({max_len}) must be >= 1")
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        n = config.num_hidden_layers
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)])

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def batch(self) -> int:
        """Rows in use."""
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        """Rows the storage holds."""
        return self._keys[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def fits(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether ``start(batch)`` can serve ``max_len`` slots of ``dtype`` on ``device``."""
        k = self._keys[0]
        return (batch <= self.capacity and max_len <= self.max_len and k.dtype == dtype
                and k.device == torch.device(device))

    def start(self, batch: int) -> None:
        """Reuse the storage for ``batch`` rows (``<= capacity``), nothing cached."""
        if not 1 <= batch <= self.capacity:
            raise ValueError(f"cache holds {self.capacity} rows, asked to start {batch}")
        self._use(batch)
        self.length = 0

    def _use(self, rows: int) -> None:
        self.keys = [k[:rows] for k in self._keys]
        self.values = [v[:rows] for v in self._values]

    def select(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (int64 [M], any rows in use, repeats allowed, M <= capacity)
        as rows ``0..M-1``, in that order: finished rows leave the batch (compaction), or
        one prefilled prompt's row is copied to each of its samples. Only the filled slots
        ``[0, length)`` are copied."""
        m = len(index)
        if not 1 <= m <= self.capacity:
            raise ValueError(f"cannot keep {m} rows in a cache of {self.capacity}")
        end = self.length
        for store in (self._keys, self._values):
            for k in store:
                k[:m, :, :end] = k[:self.batch].index_select(0, index)[:, :, :end]
        self._use(m)

    def move(self, src: torch.Tensor, dst: torch.Tensor, rows: int) -> None:
        """Copy rows ``src`` to rows ``dst`` (int64 [K], disjoint), then keep the first
        ``rows`` rows in use: finished rows leave the batch by having the last live rows
        moved into their places, copying only those."""
        if not 1 <= rows <= self.batch:
            raise ValueError(f"cannot keep {rows} of {self.batch} rows")
        end = self.length
        if len(src):
            for store in (self._keys, self._values):
                for k in store:
                    k[dst, :, :end] = k[src, :, :end]
        self._use(rows)

    def check_fits(self, batch: int, new: int) -> None:
        """Raise ``ValueError`` unless ``new`` tokens of ``batch`` rows fit after ``length``."""
        if batch != self.batch:
            raise ValueError(f"cache was allocated for batch {self.batch}, got input batch {batch}")
        if self.length + new > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length} cached + {new} new tokens "
                             f"> max_len {self.max_len}")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v [B, kv_heads, T, head_dim]`` at ``[length, length + T)`` of ``layer``.

        Returns that layer's keys and values for slots ``[0, length + T)``
        (views ``[B, kv_heads, length + T, head_dim]``). Does not advance ``length``.
        """
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length} cached + {k.shape[2]} new tokens "
                             f"> max_len {self.max_len}")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Mark ``n`` more slots as filled (called by the model after its last layer)."""
        if self.length + n > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length} + {n} > max_len {self.max_len}")
        self.length += n
