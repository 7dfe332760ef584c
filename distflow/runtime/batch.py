"""``Batch``: the unit of data that flows along the DAG's edges.

A batch is columnar: a dict of tensors that all share dim 0, the sample dim, plus three
per-sample int64 vectors the runtime itself reads:

- ``sample_ids`` [n]: unique within an iteration; they make "delivered exactly once"
  checkable and give a canonical order.
- ``lengths`` [n]: the cost of a sample (its token count); re-sharding balances on it.
- ``groups`` [n]: samples with the same group id (e.g. the responses to one prompt in
  GRPO) always travel to the same consumer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

_RESERVED = ("__sample_id", "__length", "__group")


def _as_index(values, n: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.int64)
    if t.shape != (n,):
        raise ValueError(f"{what} must have shape [{n}], got {list(t.shape)}")
    return t


@dataclass
class Batch:
    data: dict[str, torch.Tensor]
    sample_ids: torch.Tensor
    lengths: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        n = int(torch.as_tensor(self.sample_ids).numel())
        self.sample_ids = _as_index(self.sample_ids, n, "sample_ids")
        self.lengths = (torch.ones(n, dtype=torch.int64) if self.lengths is None
                        else _as_index(self.lengths, n, "lengths"))
        self.groups = (self.sample_ids.clone() if self.groups is None
                       else _as_index(self.groups, n, "groups"))
        for name, t in self.data.items():
            if name in _RESERVED:
                raise ValueError(f"column name {name!r} is reserved")
            if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != n:
                shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"column {name!r} has shape {shape}; dim 0 must be the "
                                 f"{n} samples of this batch")

    def __len__(self) -> int:
        return int(self.sample_ids.numel())

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.data[name]

    def __contains__(self, name: str) -> bool:
        return name in self.data

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def with_columns(self, **columns: torch.Tensor) -> "Batch":
        """A new batch with the same samples and extra (or replaced) columns."""
        return Batch({**self.data, **columns}, self.sample_ids, self.lengths,
                     self.groups, dict(self.meta))

    def only(self, **columns: torch.Tensor) -> "Batch":
        """A new batch of the same samples with just ``columns``: what a stage that adds
        columns (a reward, reference log-probs, values) sends on, for a consumer to
        ``join`` with the batch it already has."""
        return Batch(dict(columns), self.sample_ids, self.lengths, self.groups, dict(self.meta))

    def join(self, *others: "Batch") -> "Batch":
        """This batch with the columns of ``others``, which hold the same samples in the
        same order (the worker aligns a stage's inputs by sample id)."""
        data = dict(self.data)
        for other in others:
            if not torch.equal(other.sample_ids, self.sample_ids):
                missing = sorted(set(self.sample_ids.tolist()) ^ set(other.sample_ids.tolist()))
                raise ValueError(f"cannot join batches of different samples ({len(self)} and "
                                 f"{len(other)} samples; ids in only one: {missing[:8]})"
                                 if missing else "cannot join batches whose samples are in a different order")
            data.update(other.data)
        return Batch(data, self.sample_ids, self.lengths, self.groups, dict(self.meta))

    def select(self, index: torch.Tensor | list[int]) -> "Batch":
        """The samples at ``index`` (positions, in that order)."""
        idx = torch.as_tensor(index, dtype=torch.int64)
        return Batch({k: v[idx] for k, v in self.data.items()}, self.sample_ids[idx],
                     self.lengths[idx], self.groups[idx], dict(self.meta))

    def sorted(self) -> "Batch":
        """The same samples in ascending sample-id order (a canonical order)."""
        ids = self.sample_ids
        if bool((ids[1:] >= ids[:-1]).all()):
            return self
        return self.select(torch.argsort(ids, stable=True))

    @staticmethod
    def cat(batches: list["Batch"]) -> "Batch":
        """Concatenate batches with the same columns; meta is taken from the first."""
        if not batches:
            raise ValueError("Batch.cat needs at least one batch")
        names = list(batches[0].data)
        for b in batches[1:]:
            if list(b.data) != names:
                raise ValueError(f"cannot concatenate batches with columns {names} and {list(b.data)}")
        return Batch({k: torch.cat([b.data[k] for b in batches]) for k in names},
                     torch.cat([b.sample_ids for b in batches]),
                     torch.cat([b.lengths for b in batches]),
                     torch.cat([b.groups for b in batches]), dict(batches[0].meta))

    def tensors(self) -> dict[str, torch.Tensor]:
        """All tensors of the batch, for the wire (see ``from_tensors``)."""
        return {**self.data, "__sample_id": self.sample_ids, "__length": self.lengths,
                "__group": self.groups}

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor], meta: dict | None = None) -> "Batch":
        missing = [k for k in _RESERVED if k not in tensors]
        if missing:
            raise ValueError(f"tensors lack the batch index columns {missing}")
        data = {k: v for k, v in tensors.items() if k not in _RESERVED}
        return Batch(data, tensors["__sample_id"], tensors["__length"], tensors["__group"],
                     dict(meta or {}))
