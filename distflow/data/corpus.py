"""Small real data that ships with every machine: the Python standard library's source.

``stdlib_corpus(split)`` concatenates the stdlib's top-level ``*.py`` files (about 4.7 MB
on CPython 3.11); a file belongs to the held-out split when ``crc32(name) % 10 == 0``, so
the split is fixed and no file is in both. Text is modelled as bytes (vocab 256).
"""
from __future__ import annotations

import sysconfig
import zlib
from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=2)
def stdlib_corpus(split: str) -> torch.Tensor:
    """uint8 [n_bytes] of the ``train`` or ``heldout`` split."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    chosen = [f for f in files if (zlib.crc32(f.name.encode()) % 10 == 0) == (split == "heldout")]
    if not chosen:
        raise FileNotFoundError("no Python standard-library sources found")
    data = b"".join(f.read_bytes() for f in chosen)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def windows(corpus: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """int64 [len(starts), length] byte windows."""
    idx = starts[:, None] + torch.arange(length)
    return corpus[idx].long()


def window_starts(corpus_len: int, length: int, seed: int, step: int, n: int) -> torch.Tensor:
    """The step's ``n`` random window starts, a pure function of (seed, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, corpus_len - length, (n,), generator=g)
