"""Small all-reduces over the data plane, for data-parallel groups of a few CPU ranks.

A gradient all-reduce of a small model on the CPU is latency-bound: gloo's TCP all-reduce
of 300 KB between two ranks takes 0.5 ms at its median but 4-5 ms at its 90th percentile
on a 2-core box (its I/O thread has to be scheduled between the busy ranks), and every
rank waits for the slowest. ``PeerAllReduce`` sends the tensor straight to the other
members over the rank's ZeroMQ sockets (a Unix socket on one machine) and sums what
arrives: one message per peer, no extra thread, and the receive is the same bounded,
liveness-checked wait as every other distflow receive (a dead member raises
``PeerFailure`` naming it, not a hang). benchmarks/allreduce.py measures both.

Every member adds the members' tensors in ascending rank order, so all of them hold the
same bits afterwards (replicas stay identical). Each member sends ``n - 1`` copies of
the tensor where a ring all-reduce sends ``2 (n - 1) / n``: the same bytes for two ranks,
``(n - 1)(n - 2) / n`` copies more beyond. So it is used for CPU tensors of at most
``transport.peer_all_reduce_mb`` whose extra bytes stay under ``EXTRA_BYTES``, in groups
of at most ``MAX_RANKS``; everything else goes through ``torch.distributed``. Measured
(benchmarks/RESULTS.md): 2 ranks win at every size to 16 MiB; 4 ranks win at 300 KiB
(2.5x) and lose at 4 MiB (0.8x), where the extra bytes are 6 MiB.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from distflow.transport.wire import Message

MAX_RANKS = 8
EXTRA_BYTES = 1 << 20
"""Most bytes a member may send beyond what a ring all-reduce would."""


class PeerAllReduce:
    """Sum tensors over ``ranks`` (this rank among them). Every member must make the same
    sequence of calls (as data-parallel replicas do): the n-th call of each is one sum."""

    def __init__(self, peer, ranks: tuple[int, ...], max_bytes: int, process_group=None):
        if peer.rank not in ranks:
            raise ValueError(f"rank {peer.rank} is not in the group {ranks}")
        self.peer, self.ranks = peer, tuple(sorted(ranks))
        self.max_bytes, self.process_group = max_bytes, process_group
        self.others = [r for r in self.ranks if r != peer.rank]
        self._tag = ",".join(map(str, self.ranks))
        self._calls = 0

    def handles(self, t: torch.Tensor) -> bool:
        """Whether ``sum`` goes over the data plane for ``t`` (else ``torch.distributed``)."""
        n, size = len(self.ranks), t.numel() * t.element_size()
        return (t.device.type == "cpu" and n <= MAX_RANKS and size <= self.max_bytes
                and (n - 1) * (n - 2) * size <= EXTRA_BYTES * n)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of every member's ``t`` (same shape and dtype on all), a new tensor;
        ``t`` itself is left as it was (it may still be on its way to the peers)."""
        if not self.others:
            return t.clone()
        if not self.handles(t):
            out = t.clone()
            dist.all_reduce(out, group=self.process_group)
            return out
        self._calls += 1
        key = (self._tag, self._calls)
        for r in self.others:
            self.peer.send(r, Message(self.peer.rank, "allreduce", key, None, {"t": t}))
        got = self.peer.recv("allreduce", key, self.others)
        parts = []
        for r in self.ranks:
            part = t if r == self.peer.rank else got[r].tensors.get("t")
            if part is None or part.shape != t.shape or part.dtype != t.dtype:
                raise ValueError(f"all-reduce over ranks {self.ranks}: rank {r} sent "
                                 f"{None if part is None else (tuple(part.shape), part.dtype)}, "
                                 f"expected {(tuple(t.shape), t.dtype)}")
            parts.append(part)
        out = parts[0].clone()
        for part in parts[1:]:
            out += part
        return out
