"""Trainer -> rollout weight sync for disaggregated placement.

The trainer group's first rank broadcasts the policy, flattened into one fp32/bf16 buffer,
to every rank of the rollout group over a dedicated torch.distributed group (gloo on CPU,
NCCL on GPU). Model replicas are whole on every rank, so groups of any sizes work: the
broadcast re-shards from one trainer copy to R rollout copies.

Each sync carries a header ``[version, numel, checksum]``. The receiver copies into its
model only after the whole buffer arrived and its checksum matches, so a sync cut by a
dead peer raises (``PeerFailure`` from the liveness check, polled while waiting) and never
leaves a half-written or silently stale model.

The staleness rule lives here and nowhere else. Version ``v`` is the weights after ``v``
updates. Before generating step ``k`` a rollout needs a version of at least
``k - max_staleness`` (``refresh``); after the update of step ``k`` the trainer sends
version ``k + 1`` only if some later step will take it, i.e. ``k + 1 <= steps - 1 -
max_staleness`` (``publish``). Both sides therefore agree on the number of broadcasts.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

_CHUNK = 1 << 20


def flatten(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def checksum(flat: torch.Tensor) -> int:
    """An order-sensitive 62-bit checksum of the raw bits of ``flat`` (cheap, vectorized)."""
    bits = flat.contiguous().view(torch.uint8)
    total = 0
    for start in range(0, bits.numel(), _CHUNK):
        chunk = bits[start:start + _CHUNK].long()
        weights = torch.arange(start, start + chunk.numel(), device=chunk.device) % 65521 + 1
        total = (total + int((chunk * weights).sum())) % (1 << 62)
    return total


def sha256(flat: torch.Tensor) -> str:
    return hashlib.sha256(flat.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


class WeightSync:
    def __init__(self, group, ranks: tuple[int, ...], rank: int, check_peers: Callable[[], None], *,
                 steps: int, max_staleness: int = 0, record_dir: Path | None = None):
        """``ranks``: ``(trainer source, *rollout ranks)``, the members of ``group``."""
        self.group, self.src, self.receivers, self.rank = group, ranks[0], ranks[1:], rank
        self.check_peers, self.record_dir = check_peers, record_dir
        self.steps, self.max_staleness = steps, max_staleness
        self.version = 0
        """Rollout side: the version the model holds."""

    def publish(self, model: torch.nn.Module, step: int) -> None:
        """Trainer side, after the update of ``step``: send version ``step + 1`` if a
        rollout will take it."""
        version = step + 1
        if version <= self.steps - 1 - self.max_staleness:
            self.send(model, version)

    def refresh(self, model: torch.nn.Module, step: int) -> int:
        """Rollout side, before generating ``step``: take syncs until ``model`` is at most
        ``max_staleness`` updates old; returns its version."""
        while self.version < step - self.max_staleness:
            self.version = self.receive(model)
        return self.version

    def resume(self, model: torch.nn.Module, step: int) -> None:
        """Both sides, after loading the checkpoint of ``step``: the trainer's weights
        (version ``step + 1``) go to every rollout, which restarts from them."""
        if self.rank == self.src:
            self.send(model, step + 1)
        elif self.rank in self.receivers:
            self.version = self.receive(model)

    def _broadcast(self, t: torch.Tensor) -> None:
        work = dist.broadcast(t, src=self.src, group=self.group, async_op=True)
        while not work.is_completed():  # never an unbounded wait on a dead peer
            self.check_peers()
            time.sleep(0.0005)
        work.wait()

    def _record(self, version: int, flat: torch.Tensor) -> None:
        if self.record_dir is not None:
            self.record_dir.mkdir(parents=True, exist_ok=True)
            (self.record_dir / f"v{version}.rank{self.rank}.sha256").write_text(sha256(flat))

    def send(self, model: torch.nn.Module, version: int) -> None:
        """Trainer side (only the source rank sends; other trainer ranks return)."""
        if self.rank != self.src:
            return
        flat = flatten(model)
        header = torch.tensor([version, flat.numel(), checksum(flat)], dtype=torch.int64)
        self._broadcast(header.to(flat.device))
        self._broadcast(flat)
        self._record(version, flat)

    def receive(self, model: torch.nn.Module) -> int:
        """Rollout side: the next version, copied into ``model`` once verified."""
        flat = flatten(model)
        header = torch.zeros(3, dtype=torch.int64, device=flat.device)
        self._broadcast(header)
        version, numel, expected = (int(v) for v in header.tolist())
        if numel != flat.numel():
            raise ValueError(f"weight sync: trainer sent {numel} parameters, the rollout "
                             f"model has {flat.numel()}")
        buf = torch.empty_like(flat)
        self._broadcast(buf)
        if checksum(buf) != expected:
            raise ValueError(f"weight sync of version {version} arrived corrupted")
        with torch.no_grad():
            offset = 0
            for p in model.parameters():
                p.copy_(buf[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        self._record(version, buf)
        return version
