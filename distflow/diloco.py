"""Outer synchronization between islands: DiLoCo (arXiv 2311.08105) and Streaming DiLoCo
(arXiv 2501.18512).

A trainer group is split into islands (replica groups). Inside an island gradients are
all-reduced every inner step (``TrainEngine``); between islands only this module talks,
through a ``Reducer`` that connects a rank with the same-position rank of every other
island. Every rank of an island runs its own ``DiLoCo`` on the same (identical) params.

- ``ddp``: no-op; the caller all-reduces gradients over all ranks, as plain data parallel.
- ``diloco``: every ``H`` inner steps, ``pseudo_gradient = global - local`` is averaged over
  islands and applied to the global params by SGD with Nesterov momentum; local := global.
- ``streaming``: the params are split into ``P`` fragments; fragment ``f`` starts its sync at
  inner steps ``t`` with ``(t - offset_f) % H == 0``, ``offset_f = f * H // P`` (so its first
  round is ``offset_f`` steps long when ``offset_f > 0``). The pseudo-gradient is taken at
  the start; the exchange finishes ``tau`` inner steps later (training goes on meanwhile),
  then the outer step gives ``g'`` and ``local := alpha * local + (1 - alpha) * g'``.

``diloco`` is ``streaming`` with one fragment, ``tau = 0``, ``alpha = 0``: one code path.

The model a user gets (and the one to evaluate) is the global model, as in both papers:
the outer parameters, bit-identical on every island. Mid-run, ``global_params`` holds it
(each fragment as of its last finished outer step; no communication). At the end of
training, ``consensus()`` gives the global model brought up to date: every in-flight
exchange completed and every fragment whose last pseudo-gradient predates the current step
synced once more, as if each island ended with ``local := global``. It works on copies, so
the training state (and an exact resume) is untouched; the bytes of its extra exchanges are
counted in ``diloco/export_bytes``.

Exchange: each island encodes its pseudo-gradient with the codec of ``quantize``
(``distflow.quantize``), the payloads are all-gathered, and every island decodes them and
sums in fp32 in island order, so all islands compute bit-identical global params and outer
momentum. ``diloco/bytes_sent`` counts this rank's payload bytes (one payload per fragment
sync, whatever the number of islands or the collective's algorithm).
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable, Protocol

import torch
import torch.distributed as dist

from distflow.quantize import FORMATS, get_codec

MODES = ("ddp", "diloco", "streaming")


@dataclass(kw_only=True)
class DiLoCoConfig:
    """``diloco.*`` config keys: low-communication sync between the islands of one
    trainer group."""

    mode: str = "ddp"
    """ddp | diloco | streaming."""
    group: str = ""
    """The worker group split into islands (default: the only group that trains)."""
    islands: int = 1
    """Number of islands; must divide the group's size."""
    inner_steps: int = 30
    """H: inner steps between two syncs of a fragment."""
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    fragments: int = 1
    """P (streaming)."""
    overlap_steps: int = 0
    """tau (streaming): inner steps a fragment's exchange overlaps; must be < H / P."""
    alpha: float = 0.0
    """Merge (streaming): local := alpha * local + (1 - alpha) * global."""
    quantize: str = "fp32"
    """Format of the exchanged pseudo-gradient, one of ``distflow.quantize.FORMATS``."""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown diloco mode {self.mode!r}; choose one of {MODES}")
        if self.quantize not in FORMATS:
            raise ValueError(f"unknown quantize format {self.quantize!r}; choose one of {FORMATS}")
        if self.islands < 1:
            raise ValueError(f"diloco.islands must be >= 1, got {self.islands}")
        if self.inner_steps < 1:
            raise ValueError(f"inner_steps (H) must be >= 1, got {self.inner_steps}")
        if self.fragments < 1:
            raise ValueError(f"fragments (P) must be >= 1, got {self.fragments}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.overlap_steps < 0:
            raise ValueError(f"overlap_steps (tau) must be >= 0, got {self.overlap_steps}")
        if not self.outer_lr > 0:
            raise ValueError(f"outer_lr must be > 0, got {self.outer_lr}")
        if not 0.0 <= self.outer_momentum < 1.0:
            raise ValueError(f"outer_momentum must be in [0, 1), got {self.outer_momentum}")
        if self.mode == "streaming" and self.overlap_steps >= self.inner_steps / self.fragments:
            raise ValueError(
                f"overlap_steps (tau={self.overlap_steps}) must be < inner_steps / fragments "
                f"(H/P = {self.inner_steps}/{self.fragments} = "
                f"{self.inner_steps / self.fragments:g}) so one exchange is in flight at a time")
        if self.mode == "diloco" and (self.fragments, self.overlap_steps, self.alpha) != (1, 0, 0.0):
            raise ValueError(
                f"fragments={self.fragments}, overlap_steps={self.overlap_steps}, "
                f"alpha={self.alpha} are streaming options; mode 'diloco' needs 1, 0, 0.0 "
                "(use mode='streaming')")


# --------------------------------------------------------------------------- reducers

class GatherHandle(Protocol):
    def wait(self) -> list[torch.Tensor]:
        """The payloads of every island, in island order (own included)."""


class Reducer(Protocol):
    """How islands talk: one instance per rank; peers are the same-position rank of every
    other island. Every island must issue the same sequence of gathers."""

    num_islands: int

    def all_gather_bytes(self, payload: torch.Tensor) -> list[torch.Tensor]:
        """``uint8 [n]`` (same ``n`` on every island) -> ``num_islands`` payloads, island order."""

    def start_all_gather(self, payload: torch.Tensor) -> GatherHandle:
        """Start ``all_gather_bytes``; the handle's ``wait()`` returns its result."""


class CompletedGather:
    """A handle whose result is already there (synchronous reducers, resumed state)."""

    def __init__(self, result: list[torch.Tensor]):
        self.result = result

    def wait(self) -> list[torch.Tensor]:
        return self.result


class ProcessGroupReducer:
    """Islands over a ``torch.distributed`` process group with one rank per island (gloo on
    CPU, nccl on GPU). Payloads travel on ``device``: CPU for gloo, the current CUDA device
    otherwise."""

    def __init__(self, group=None, device: torch.device | str | None = None, timeout_s: float = 300.0):
        self.group = group
        self.num_islands = dist.get_world_size(group)
        if device is None:
            device = "cpu" if dist.get_backend(group) == "gloo" else torch.device("cuda", torch.cuda.current_device())
        self.device = torch.device(device)
        self.timeout = timedelta(seconds=timeout_s)

    def all_gather_bytes(self, payload: torch.Tensor) -> list[torch.Tensor]:
        return self.start_all_gather(payload).wait()

    def start_all_gather(self, payload: torch.Tensor) -> GatherHandle:
        payload = payload.to(self.device)
        out = [torch.empty_like(payload) for _ in range(self.num_islands)]
        work = dist.all_gather(out, payload, group=self.group, async_op=True)
        return _WorkHandle(work, out, self.timeout)


class _WorkHandle:
    def __init__(self, work, out: list[torch.Tensor], timeout: timedelta):
        self.work, self.out, self.timeout = work, out, timeout

    def wait(self) -> list[torch.Tensor]:
        if self.work is not None:
            self.work.wait(self.timeout)
            self.work = None
        return self.out


# --------------------------------------------------------------------------- fragments

def make_fragments(named_params: Iterable[tuple[str, torch.Tensor]], num_fragments: int | None = None,
                   block_pattern: str = r"layers\.(\d+)\.") -> list[list[str]]:
    """Split parameters into fragments for Streaming DiLoCo.

    Blocks (params whose name matches ``block_pattern``; group 1 is the block index) are
    dealt strided across depth: the ``i``-th block goes to fragment ``i % P``. The other
    params (embeddings, final norm, lm_head) go one by one, in model order, to the fragment
    with the fewest elements so far, which keeps the per-sync payloads even.
    ``num_fragments=None`` picks about 3 blocks per fragment. Returns ``P`` lists of names,
    each in model order, covering every param exactly once.
    """
    named = list(named_params)
    block_of = {n: int(m.group(1)) for n, _ in named if (m := re.search(block_pattern, n))}
    blocks = sorted(set(block_of.values()))
    others = [n for n, _ in named if n not in block_of]
    if num_fragments is None:
        num_fragments = max(1, round(len(blocks) / 3))
    if num_fragments < 1 or num_fragments > len(blocks) + len(others):
        raise ValueError(f"num_fragments={num_fragments} must be in [1, {len(blocks) + len(others)}] "
                         f"({len(blocks)} blocks + {len(others)} other params)")
    position = {b: i for i, b in enumerate(blocks)}
    fragment_of, sizes = {}, [0] * num_fragments
    numel = {n: p.numel() for n, p in named}
    for n, b in block_of.items():
        fragment_of[n] = position[b] % num_fragments
        sizes[fragment_of[n]] += numel[n]
    for n in others:
        fragment_of[n] = min(range(num_fragments), key=lambda f: (sizes[f], f))
        sizes[fragment_of[n]] += numel[n]
    fragments = [[n for n, _ in named if fragment_of[n] == f] for f in range(num_fragments)]
    validate_fragments(fragments, [n for n, _ in named])
    return fragments


def validate_fragments(fragments: list[list[str]], names: Iterable[str]) -> None:
    """ValueError unless ``fragments`` are non-empty and cover every name exactly once."""
    names = list(names)
    seen: dict[str, int] = {}
    for fragment in fragments:
        for n in fragment:
            seen[n] = seen.get(n, 0) + 1
    missing = [n for n in names if n not in seen]
    duplicated = [n for n, k in seen.items() if k > 1]
    unknown = sorted(set(seen) - set(names))
    empty = [f for f, fragment in enumerate(fragments) if not fragment]
    if missing or duplicated or unknown or empty or not fragments:
        raise ValueError(f"fragments must cover every parameter exactly once: missing {missing}, "
                         f"duplicated {duplicated}, unknown {unknown}, empty fragments {empty}")


# --------------------------------------------------------------------------- DiLoCo

class _InFlight:
    """A fragment whose exchange started at some step and finishes at ``finish_step``."""

    def __init__(self, fragment: int, finish_step: int, handle: GatherHandle | None,
                 reduced: dict[str, torch.Tensor] | None = None):
        self.fragment, self.finish_step, self.handle, self.reduced = fragment, finish_step, handle, reduced


class DiLoCo:
    """Outer optimizer of one rank. Call ``after_inner_step()`` after every inner
    ``optimizer.step()``; it starts and finishes fragment syncs on schedule and writes the
    merged values into the model's params in place (the inner optimizer state is kept).

    All islands must start from identical params. ``state_dict`` holds the global params,
    outer momentum, step counter and in-flight exchanges; the model and the inner optimizer
    are checkpointed by their owner.
    """

    def __init__(self, model: torch.nn.Module, cfg: DiLoCoConfig, reducer: Reducer | None,
                 fragments: list[list[str]] | None = None):
        self.cfg, self.reducer = cfg, reducer
        self.step, self.bytes_sent, self.syncs = 0, 0, 0
        self.export_bytes = 0
        self._pending: list[_InFlight] = []
        self.params: dict[str, torch.nn.Parameter] = {}
        self.fragments: list[list[str]] = []
        if cfg.mode == "ddp":
            return
        if reducer is None:
            raise ValueError(f"mode {cfg.mode!r} needs a reducer between islands")
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.fragments = self._resolve_fragments(fragments)
        self.offsets = [f * cfg.inner_steps // len(self.fragments) for f in range(len(self.fragments))]
        self.codec = get_codec(cfg.quantize)
        self.global_params = {n: p.detach().to(torch.float32, copy=True) for n, p in self.params.items()}
        self.momentum = {n: torch.zeros_like(g) for n, g in self.global_params.items()}

    def _resolve_fragments(self, fragments):
        names = list(self.params)
        if fragments is None:
            if self.cfg.mode == "diloco":
                return [names]
            return make_fragments(self.params.items(), self.cfg.fragments)
        validate_fragments(fragments, names)
        expected = 1 if self.cfg.mode == "diloco" else self.cfg.fragments
        if len(fragments) != expected:
            raise ValueError(f"got {len(fragments)} fragments, mode {self.cfg.mode!r} with "
                             f"fragments={self.cfg.fragments} needs {expected}")
        return [list(f) for f in fragments]

    # ---- schedule

    @torch.no_grad()
    def after_inner_step(self) -> None:
        """Count one inner step; finish the exchanges due now, then start those due now."""
        self.step += 1
        if self.cfg.mode == "ddp":
            return
        for item in [x for x in self._pending if x.finish_step <= self.step]:
            self._pending.remove(item)
            self._finish(item)
        for f, offset in enumerate(self.offsets):
            # offset < H, so a negative (step - offset) is never a multiple of H
            if (self.step - offset) % self.cfg.inner_steps == 0:
                item = self._start(f)
                if self.cfg.overlap_steps == 0:
                    self._finish(item)
                else:
                    self._pending.append(item)

    def _start(self, f: int) -> _InFlight:
        payload = torch.cat([self.codec.encode(self.global_params[n] - self.params[n].detach().float())
                             for n in self.fragments[f]])
        self.bytes_sent += payload.numel()
        handle = self.reducer.start_all_gather(payload)
        return _InFlight(f, self.step + self.cfg.overlap_steps, handle)

    def _reduce(self, item: _InFlight) -> dict[str, torch.Tensor]:
        """The island-average pseudo-gradient of ``item``'s fragment (waits for the gather)."""
        if item.reduced is None:
            payloads = item.handle.wait()
            if len(payloads) != self.reducer.num_islands:
                raise RuntimeError(f"gathered {len(payloads)} payloads from {self.reducer.num_islands} islands")
            total: dict[str, torch.Tensor] = {}
            for payload in payloads:  # island order: the same float sum on every island
                for n, value in self._decode(item.fragment, payload).items():
                    total[n] = total[n].add_(value) if n in total else value
            item.reduced = {n: t.div_(len(payloads)) for n, t in total.items()}
            item.handle = None
        return item.reduced

    def _decode(self, f: int, payload: torch.Tensor) -> dict[str, torch.Tensor]:
        out, offset = {}, 0
        for n in self.fragments[f]:
            g = self.global_params[n]
            size = self.codec.payload_bytes(g.numel())
            part = payload[offset:offset + size].to(g.device)
            out[n] = self.codec.decode(part, g.numel()).view_as(g)
            offset += size
        if offset != payload.numel():
            raise RuntimeError(f"fragment {f} payload has {payload.numel()} bytes, expected {offset}")
        return out

    def _outer_step(self, pseudo_gradient: torch.Tensor, g: torch.Tensor, buf: torch.Tensor) -> None:
        """SGD (Nesterov) on ``g`` in place with momentum buffer ``buf`` (torch's, dampening 0)."""
        cfg = self.cfg
        buf.mul_(cfg.outer_momentum).add_(pseudo_gradient)
        update = pseudo_gradient.add(buf, alpha=cfg.outer_momentum) if cfg.nesterov else buf
        g.sub_(update, alpha=cfg.outer_lr)

    def _finish(self, item: _InFlight) -> None:
        cfg = self.cfg
        for n, pseudo_gradient in self._reduce(item).items():
            g = self.global_params[n]
            self._outer_step(pseudo_gradient, g, self.momentum[n])
            local = self.params[n]
            if cfg.alpha == 0.0:
                local.copy_(g)
            elif cfg.alpha < 1.0:
                local.copy_(local.float().mul(cfg.alpha).add_(g, alpha=1.0 - cfg.alpha))
        self.syncs += 1

    # ---- the model to deploy / evaluate

    def last_start(self, f: int) -> int | None:
        """The latest step ``<= self.step`` at which fragment ``f`` started a sync (None: never)."""
        s = self.step - (self.step - self.offsets[f]) % self.cfg.inner_steps
        return s if s >= 1 else None

    @torch.no_grad()
    def consensus(self) -> dict[str, torch.Tensor]:
        """The global model as of now, fp32, identical on every island: for each fragment,
        its in-flight exchanges are completed (outer step, then the ``alpha`` merge into a
        copy of the local params), and if its last pseudo-gradient was taken before the
        current step, one more exchange of ``global - local`` and outer step follow. No
        training state changes (global params, momentum, local params, schedule, in-flight
        exchanges), only ``export_bytes``. Every island must call it at the same step (it
        may gather)."""
        if self.cfg.mode == "ddp":
            raise RuntimeError("consensus() needs mode diloco or streaming; in ddp the model is the global model")
        cfg = self.cfg
        out: dict[str, torch.Tensor] = {}
        for f, names in enumerate(self.fragments):
            g = {n: self.global_params[n].clone() for n in names}
            buf = {n: self.momentum[n].clone() for n in names}
            local = {n: self.params[n].detach().float().clone() for n in names}
            for item in [x for x in self._pending if x.fragment == f]:
                for n, pseudo_gradient in self._reduce(item).items():
                    self._outer_step(pseudo_gradient, g[n], buf[n])
                    local[n].mul_(cfg.alpha).add_(g[n], alpha=1.0 - cfg.alpha)
            last = self.last_start(f)
            if last is None or last < self.step:
                payload = torch.cat([self.codec.encode(g[n] - local[n]) for n in names])
                self.export_bytes += payload.numel()
                item = _InFlight(f, self.step, self.reducer.start_all_gather(payload))
                for n, pseudo_gradient in self._reduce(item).items():
                    self._outer_step(pseudo_gradient, g[n], buf[n])
            out.update(g)
        return out

    @contextlib.contextmanager
    def swapped_in(self, values: dict[str, torch.Tensor]):
        """Within the block the model's params hold ``values`` (e.g. ``global_params`` or
        ``consensus()``); restored exactly afterwards."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(values[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(saved[n])

    # ---- metrics and checkpoints

    def stats(self) -> dict[str, float]:
        """``diloco/bytes_sent``: payload bytes this rank sent for training syncs;
        ``diloco/syncs``: fragment syncs finished (a diloco round counts 1, a streaming
        fragment sync counts 1); ``diloco/export_bytes``: payload bytes of ``consensus()``."""
        return {"diloco/bytes_sent": float(self.bytes_sent), "diloco/syncs": float(self.syncs),
                "diloco/export_bytes": float(self.export_bytes)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """CPU tensors only: ``diloco/{step,bytes_sent,syncs}``, ``diloco/global/<param>``,
        ``diloco/momentum/<param>``, and for an in-flight fragment ``f``
        ``diloco/pending/<f>/finish_step`` plus its island-average pseudo-gradient
        ``diloco/pending/<f>/<param>`` (waits for that exchange to arrive)."""
        sd = {f"diloco/{k}": torch.tensor(getattr(self, k), dtype=torch.int64)
              for k in ("step", "bytes_sent", "syncs")}
        for n in self.params:
            sd[f"diloco/global/{n}"] = self.global_params[n].cpu().clone()
            sd[f"diloco/momentum/{n}"] = self.momentum[n].cpu().clone()
        for item in self._pending:
            sd[f"diloco/pending/{item.fragment}/finish_step"] = torch.tensor(item.finish_step, dtype=torch.int64)
            for n, value in self._reduce(item).items():
                sd[f"diloco/pending/{item.fragment}/{n}"] = value.cpu().clone()
        return sd

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Restore ``state_dict()``; the fragment schedule continues where it stopped."""
        expected = {f"diloco/{k}" for k in ("step", "bytes_sent", "syncs")}
        expected |= {f"diloco/{kind}/{n}" for kind in ("global", "momentum") for n in self.params}
        pending_fragments = sorted(int(m.group(1)) for k in sd
                                   if (m := re.fullmatch(r"diloco/pending/(\d+)/finish_step", k)))
        for f in pending_fragments:
            if f >= len(self.fragments):
                raise ValueError(f"checkpoint has in-flight fragment {f}, this run has {len(self.fragments)}")
            expected |= {f"diloco/pending/{f}/finish_step"}
            expected |= {f"diloco/pending/{f}/{n}" for n in self.fragments[f]}
        missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
        if missing or unexpected:
            raise ValueError(f"diloco state mismatch: missing {missing[:5]} ({len(missing)}), "
                             f"unexpected {unexpected[:5]} ({len(unexpected)})")
        for n in self.params:
            for kind, target in (("global", self.global_params[n]), ("momentum", self.momentum[n])):
                value = sd[f"diloco/{kind}/{n}"]
                if value.shape != target.shape:
                    raise ValueError(f"diloco/{kind}/{n}: checkpoint shape {tuple(value.shape)}, "
                                     f"param shape {tuple(target.shape)}")
                target.copy_(value)
        self.step, self.bytes_sent, self.syncs = (int(sd[f"diloco/{k}"]) for k in ("step", "bytes_sent", "syncs"))
        self._pending = [
            _InFlight(f, int(sd[f"diloco/pending/{f}/finish_step"]), None,
                      {n: sd[f"diloco/pending/{f}/{n}"].to(self.global_params[n].device, torch.float32)
                       for n in self.fragments[f]})
            for f in pending_fragments]
