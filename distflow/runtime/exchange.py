"""Moving a stage's output to the ranks of the stages that consume it.

Every edge gets a route, computed identically on every rank from (pipeline, placement,
routing mode). With ``routing=p2p``:

===========  ===========  ==========================================================
producer     consumer     route
===========  ===========  ==========================================================
dp           dp, same     ``local``: the shard stays on its rank, nothing is sent
             ranks
dp           dp, other    ``reshard``: producers swap unit costs, compute one global
             ranks        LPT plan, send each consumer exactly its units
dp           replicated   ``gather``: every producer sends its shard to every consumer
replicated   any          ``replicate``: consumer j takes the batch from itself if it
                          holds a copy, else from producer j mod P; a dp consumer
                          keeps its LPT slice
===========  ===========  ==========================================================

A data-parallel stage with several inputs needs them sharded alike (sample ``i`` of
every input on the same rank). The planner tracks each datum's sharding; where a
stage's inputs disagree, their ``local`` edges are upgraded to ``reshard``, whose LPT
plan depends only on the set of units, so all inputs then agree.

``routing=hub`` sends every edge through rank 0 (gather there, split, send out): the
single-controller shape of verl-style drivers, kept as the benchmark baseline.
A consumer always knows exactly which ranks it waits for; every sample arrives once.

Data move per datum, not per edge: the edges of one datum whose routes are the same
(kind, consumer ranks, consumer layout) share one *transfer* (``Route.key``), sent once
and handed to every stage on the consumer rank that reads it. So when reward, reference
and advantages all live on the trainer's workers, the rollouts cross the wire once.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from distflow.dag import Edge, Pipeline
from distflow.placement import Placement
from distflow.runtime.batch import Batch
from distflow.runtime.routing import reshard_plan, split_by_plan, unit_keys, units_of
from distflow.transport.peer import Peer
from distflow.transport.wire import Message

HUB = 0


@dataclass(frozen=True)
class Route:
    edge: Edge
    kind: str
    src: tuple[int, ...]
    dst: tuple[int, ...]
    src_dp: bool
    dst_dp: bool
    key: str = field(default="", compare=False)
    """The transfer this edge's data travel in; edges with the same key share it."""


def transfer_key(r: Route) -> str:
    """Edges of one datum with equal routes get equal keys (``routing=hub``: one per edge)."""
    if r.kind == "hub":
        return r.edge.key
    layout = "dp" if r.dst_dp else "whole"
    return f"{r.edge.src}.{r.edge.name}:{r.kind}->{layout}{list(r.dst)}".replace(" ", "")


def plan_routes(pipeline: Pipeline, placement: Placement, routing: str) -> dict[Edge, Route]:
    routes: dict[Edge, Route] = {}
    sharding: dict[str, str] = {}  # stage -> how its outputs are sharded
    for name in pipeline.order:
        c = pipeline.stage(name)
        dst = placement.ranks(c.group)
        incoming = {}
        for e in pipeline.in_edges(name):
            p = pipeline.stage(e.src)
            src = placement.ranks(p.group)
            if routing == "hub":
                kind = "hub"
            elif not p.data_parallel:
                kind = "replicate"
            elif not c.data_parallel:
                kind = "gather"
            else:
                kind = "local" if src == dst else "reshard"
            incoming[e] = Route(e, kind, src, dst, p.data_parallel, c.data_parallel)
        balanced = f"lpt:{dst}"
        labels = {e: sharding[e.src] if r.kind == "local" else balanced for e, r in incoming.items()}
        if c.data_parallel and len(set(labels.values())) > 1:
            incoming = {e: Route(e, "reshard", r.src, r.dst, r.src_dp, r.dst_dp)
                        if r.kind == "local" else r for e, r in incoming.items()}
            labels = dict.fromkeys(incoming, balanced)
        routes.update(incoming)
        if not c.data_parallel:
            sharding[name] = "whole"
        else:
            sharding[name] = next(iter(labels.values()), f"source:{name}:{dst}")
    return {e: replace(r, key=transfer_key(r)) for e, r in routes.items()}


def _split(batch: Batch, n: int) -> list[Batch]:
    """A whole batch split over ``n`` consumers by LPT (consumer j gets part j)."""
    _, costs = units_of(batch)
    return split_by_plan(batch, reshard_plan([costs], n, [unit_keys(batch)])[0], n)


def _nbytes(batch: Batch) -> int:
    return sum(t.numel() * t.element_size() for t in batch.tensors().values())


def _to_message(src: int, kind: str, key: tuple, batch: Batch) -> Message:
    return Message(src, kind, key, batch.meta, batch.tensors())


def _from_messages(msgs: dict[int, Message], order: tuple[int, ...]) -> Batch:
    return Batch.cat([Batch.from_tensors(msgs[r].tensors, msgs[r].meta) for r in order])


class Exchange:
    """Sends and receives the batches of one rank, transfer by transfer, step by step."""

    def __init__(self, peer: Peer, routes: dict[Edge, Route]):
        self.peer, self.routes, self.rank = peer, routes, peer.rank
        self._readers: dict[str, int] = {}  # transfer key -> edges that read it
        for r in routes.values():
            self._readers[r.key] = self._readers.get(r.key, 0) + 1
        self._held: dict[tuple, list] = {}  # (step, key) -> [batch, reads left] on a consumer
        self.bytes_sent: dict[str, int] = {}
        """Tensor bytes this rank put on the wire since ``take_counts``, per transfer."""

    def _send(self, dst: int, kind: str, key: tuple, batch: Batch, step: int) -> None:
        if dst != self.rank:
            label = key[1]
            self.bytes_sent[label] = self.bytes_sent.get(label, 0) + _nbytes(batch)
        self.peer.send(dst, _to_message(self.rank, kind, key, batch), step=step)

    def take_counts(self) -> dict[str, float]:
        """``count/bytes_sent/<transfer>`` (and their total) since the last call, then zero."""
        counts = {f"count/bytes_sent/{k}": float(v) for k, v in self.bytes_sent.items()}
        counts["count/bytes_sent"] = float(sum(self.bytes_sent.values()))
        self.bytes_sent = {}
        return counts

    # -- producer side ------------------------------------------------------------------
    def publish_outputs(self, edges: list[Edge], step: int, outputs: dict[str, Batch]) -> None:
        """A stage's outputs along its out-edges, each transfer once."""
        done = set()
        for e in edges:
            if self.routes[e].key not in done:
                done.add(self.routes[e].key)
                self.publish(e, step, outputs[e.name])

    def publish(self, edge: Edge, step: int, batch: Batch) -> None:
        r = self.routes[edge]
        key = (step, r.key)
        if r.kind == "local":
            self._hold(key, batch)
        elif r.kind == "hub":
            if r.src_dp or self.rank == r.src[0]:
                self._send(HUB, "hub", key, batch, step)
        elif r.kind == "gather":
            for d in r.dst:
                self._send(d, "data", key, batch, step)
        elif r.kind == "replicate":
            mine = [j for j in range(len(r.dst)) if self._replica_source(r, j) == self.rank]
            parts = _split(batch, len(r.dst)) if r.dst_dp and mine else None
            for j in mine:
                self._send(r.dst[j], "data", key, parts[j] if parts else batch, step)
        else:
            self._reshard(r, key, batch, step)

    def _reshard(self, r: Route, key: tuple, batch: Batch, step: int) -> None:
        _, mine = units_of(batch)
        units = {self.rank: {"costs": mine, "keys": unit_keys(batch)}}
        others = [s for s in r.src if s != self.rank]
        for s in others:
            self.peer.send(s, Message(self.rank, "costs", key, units[self.rank]), step=step)
        for s, msg in self.peer.recv("costs", key, others).items():
            units[s] = _checked_units(msg, s)
        _check_groups_whole(units, r.edge)
        plan = reshard_plan([units[s]["costs"] for s in r.src], len(r.dst),
                            [units[s]["keys"] for s in r.src])
        parts = split_by_plan(batch, plan[r.src.index(self.rank)], len(r.dst))
        for d, part in zip(r.dst, parts):
            self._send(d, "data", key, part, step)

    @staticmethod
    def _replica_source(r: Route, j: int) -> int:
        return r.dst[j] if r.dst[j] in r.src else r.src[j % len(r.src)]

    # -- the hub (routing=hub, rank 0 only) ---------------------------------------------
    def forward(self, edge: Edge, step: int) -> None:
        r = self.routes[edge]
        key = (step, r.key)
        senders = r.src if r.src_dp else r.src[:1]
        whole = _from_messages(self.peer.recv("hub", key, list(senders)), senders)
        parts = _split(whole, len(r.dst)) if r.dst_dp else [whole] * len(r.dst)
        for d, part in zip(r.dst, parts):
            self._send(d, "data", key, part, step)

    # -- consumer side ------------------------------------------------------------------
    def _hold(self, key: tuple, batch: Batch) -> None:
        self._held[key] = [batch, self._readers[key[1]]]

    def collect(self, edge: Edge, step: int) -> Batch:
        """``edge``'s data for ``step``; a transfer several edges read arrives once."""
        r = self.routes[edge]
        key = (step, r.key)
        if key not in self._held:
            if r.kind == "local":
                raise KeyError(f"edge {edge.key}: nothing published for step {step}")
            if r.kind == "hub":
                senders: tuple[int, ...] = (HUB,)
            elif r.kind == "replicate":
                senders = (self._replica_source(r, r.dst.index(self.rank)),)
            else:
                senders = r.src
            self._hold(key, _from_messages(self.peer.recv("data", key, list(senders)), senders))
        held = self._held[key]
        held[1] -= 1
        if held[1] == 0:
            del self._held[key]
        return held[0]


def _check_groups_whole(units: dict[int, dict[str, list[int]]], edge: Edge) -> None:
    owner: dict[int, int] = {}
    for rank, u in sorted(units.items()):
        for g in u["keys"]:
            if owner.setdefault(g, rank) != rank:
                raise ValueError(f"edge {edge.key}: sample group {g} is split across ranks "
                                 f"{owner[g]} and {rank}; a group must be produced whole on one rank")


def _checked_units(msg: Message, src: int) -> dict[str, list[int]]:
    meta = msg.meta if isinstance(msg.meta, dict) else {}
    costs, keys = meta.get("costs"), meta.get("keys")
    ok = (isinstance(costs, list) and isinstance(keys, list) and len(costs) == len(keys)
          and all(isinstance(v, int) for v in costs + keys))
    if not ok:
        raise ValueError(f"rank {src} sent malformed routing costs")
    return {"costs": costs, "keys": keys}
