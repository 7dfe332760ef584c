"""Microbatches streamed along an edge inside one step, for pipelining across groups.

A DAG edge moves a stage's whole output once the stage returns. A pipeline whose groups
should work on different microbatches of the same step at the same time (an encoder
group forwarding microbatch ``i + 1`` while the LLM group trains on microbatch ``i``,
and gradients flowing back as each microbatch finishes) instead sends each microbatch
the moment it exists and lets the consumer take them one at a time::

    s = ctx.streams
    for i in range(m):                      # producer stage (encoder group)
        s.send("embeds", ctx.step, i, dst, part)
    for i in range(m):                      # consumer stage (LLM group)
        batch = s.recv("embeds", ctx.step, i, srcs)

Messages are keyed ``(step, edge, index)`` and travel over the same data plane as DAG
edges (msgpack header + raw tensor frames, nothing pickled, the ``transport.window`` flow
control, heartbeats). Like every DAG edge the plan of who sends what is the pipeline's,
computed alike on every rank, so a consumer always knows exactly which ranks to wait
for; ``recv`` times out after ``transport.recv_timeout_s`` and a dead sender is an error
naming it. Tensors are detached before sending (a send to the same rank hands over the
tensor without a copy, and must not carry the producer's autograd graph).

``ranks(group)`` gives any group's ranks, so a stage can address another group.
``wait_s`` accumulates the time spent blocked in ``recv`` (for ``comm_s`` metrics).
"""
from __future__ import annotations

import time

from distflow.runtime.batch import Batch
from distflow.transport.wire import Message

KIND = "stream"


class Streams:
    def __init__(self, peer, groups: dict[str, tuple[int, ...]]):
        self.peer, self.groups, self.rank = peer, groups, peer.rank
        self.wait_s = 0.0
        self.sent_bytes = 0

    def ranks(self, group: str) -> tuple[int, ...]:
        if group not in self.groups:
            raise ValueError(f"no group {group!r} (groups: {sorted(self.groups)})")
        return self.groups[group]

    def send(self, edge: str, step: int, index: int, dst: int, batch: Batch) -> None:
        """Send microbatch ``index`` of ``edge`` (this step) to rank ``dst``, now."""
        tensors = {k: v.detach() for k, v in batch.tensors().items()}
        if dst != self.rank:
            self.sent_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        self.peer.send(dst, Message(self.rank, KIND, (step, edge, index), batch.meta, tensors),
                       step=step)

    def recv(self, edge: str, step: int, index: int, srcs: list[int] | tuple[int, ...]) -> Batch:
        """Microbatch ``index`` of ``edge``: one part from each rank of ``srcs``,
        concatenated in the order of ``srcs``."""
        if not srcs:
            raise ValueError(f"stream {edge!r} microbatch {index}: no sender to wait for")
        t0 = time.perf_counter()
        msgs = self.peer.recv(KIND, (step, edge, index), list(srcs))
        self.wait_s += time.perf_counter() - t0
        return Batch.cat([Batch.from_tensors(msgs[s].tensors, msgs[s].meta) for s in srcs])
