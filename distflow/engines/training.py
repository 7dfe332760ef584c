"""The training engine of one rank: AdamW, micro-batches by token budget, gradient
clipping, data parallel over a torch.distributed group, fp32 master weights for a model in
bf16 (the model's dtype is the compute dtype, on CPU and GPU alike).

Exactness across layouts: a loss is a *sum* over the tokens of a micro-batch divided by
the token count of the whole global batch (all ranks), and gradients are summed over
ranks once per optimizer step. So the update does not depend on how the batch is split
into ranks or micro-batches (up to floating-point summation order).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from safetensors.torch import load_file, load_model, save_file, save_model

from distflow.checkpoint import load_optimizer, save_optimizer


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_tokens: int = 4096
    """Token budget of one micro-batch (gradient accumulation splits by it)."""

    def __post_init__(self):
        if self.lr <= 0 or self.micro_batch_tokens < 1 or self.grad_clip < 0:
            raise ValueError(f"bad optimizer config: lr={self.lr} (> 0), micro_batch_tokens="
                             f"{self.micro_batch_tokens} (>= 1), grad_clip={self.grad_clip} (>= 0)")


def micro_batches(lengths: torch.Tensor, budget: int) -> list[torch.Tensor]:
    """Consecutive index ranges whose token sums stay within ``budget`` (a lone sample
    longer than the budget gets a micro-batch of its own)."""
    out, start, used = [], 0, 0
    for i, n in enumerate(lengths.tolist()):
        if i > start and used + n > budget:
            out.append(torch.arange(start, i))
            start, used = i, 0
        used += n
    if start < len(lengths):
        out.append(torch.arange(start, len(lengths)))
    return out


class MasterWeights:
    """fp32 master copies of a low-precision (bf16) model's parameters.

    The optimizer steps the masters, so its state is fp32 too; forward and backward run in
    the model's dtype. Each parameter's gradient moves into its master's fp32 ``.grad`` as
    soon as backward has accumulated it (micro-batches add up in fp32; the model keeps no
    gradient), and ``copy_back`` rounds the updated masters into the model after a step.
    """

    def __init__(self, named_params):
        self.names, self.params = zip(*named_params) if named_params else ((), ())
        self.masters = [torch.nn.Parameter(p.detach().float().clone(), requires_grad=p.requires_grad)
                        for p in self.params]
        self._by_param = {id(p): m for p, m in zip(self.params, self.masters)}
        for p, m in zip(self.params, self.masters):
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda p, m=m: self._move_grad(p, m))

    @staticmethod
    def needed(model: torch.nn.Module) -> bool:
        return any(p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters())

    def master(self, param: torch.nn.Parameter) -> torch.nn.Parameter:
        return self._by_param[id(param)]

    @staticmethod
    def _move_grad(param: torch.Tensor, master: torch.Tensor) -> None:
        if master.grad is None:
            master.grad = param.grad.float()
        else:
            master.grad.add_(param.grad)
        param.grad = None

    @torch.no_grad()
    def copy_back(self) -> None:
        torch._foreach_copy_(list(self.params), self.masters)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: m.detach().cpu().contiguous() for n, m in zip(self.names, self.masters)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.names):
            raise ValueError(f"master weights do not match the model: missing "
                             f"{sorted(set(self.names) - set(state))[:5]}, unexpected "
                             f"{sorted(set(state) - set(self.names))[:5]}")
        for n, m in zip(self.names, self.masters):
            m.copy_(state[n])
        self.copy_back()


class TrainEngine:
    """``group``: the data-parallel group (gradients are summed over it every step).
    ``sync``: an optional outer synchronization between replicas of this group (DiLoCo,
    see ``distflow.diloco``), told after every optimizer step."""

    def __init__(self, model: torch.nn.Module, cfg: OptimConfig, group=None, sync=None,
                 reducer=None):
        self.model, self.cfg, self.group, self.sync = model, cfg, group, sync
        self.reducer = reducer
        """``PeerAllReduce`` over ``group``'s ranks (``StageContext.reducer``): small CPU sums
        go over the data plane instead of ``torch.distributed``."""
        self.master = MasterWeights(list(model.named_parameters())) if MasterWeights.needed(model) else None
        """fp32 copies the optimizer steps when the model is in bf16 (else None)."""
        if self.master is not None and sync is not None:
            raise ValueError("a bfloat16 model with DiLoCo islands is not supported (the outer step "
                             "would bypass the fp32 master weights); use dtype=float32")
        own = self.master.master if self.master is not None else (lambda p: p)
        decay = [own(p) for n, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [own(p) for n, p in model.named_parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        # the fused kernel: one pass over all parameters (the same AdamW update, rounded
        # differently in the last bit); the default per-tensor loop where it is unsupported
        fused = all(p.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
                    and p.device.type in ("cpu", "cuda") for p in model.parameters())
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)
        self._params = [own(p) for p in model.parameters()]  # walked several times a step
        if self.master is not None:  # after every optimizer step, the model gets the new masters
            self.optimizer.register_step_post_hook(lambda *_: self.master.copy_back())
        self.world = (len(reducer.ranks) if reducer is not None else
                      dist.get_world_size(group) if dist.is_initialized() else 1)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _autocast(self):
        """No autocast: the model's dtype (``dtype=``) is the compute dtype on every device."""
        return contextlib.nullcontext()

    def global_sum(self, value: float) -> float:
        """``value`` summed over the data-parallel group."""
        return self.global_sums([value])[0]

    def global_sums(self, values: list[float]) -> list[float]:
        """Each value summed over the data-parallel group, in one collective."""
        if self.world == 1:
            return [float(v) for v in values]
        return self._sum(torch.tensor([float(v) for v in values], dtype=torch.float64)).tolist()

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the group (a new tensor, or ``t`` summed in place)."""
        if self.reducer is not None:  # decides between the data plane and torch.distributed
            return self.reducer.sum(t)
        dist.all_reduce(t, group=self.group)
        return t

    def step(self, n_samples: int, lengths: torch.Tensor,
             loss_fn: Callable[[torch.Tensor], tuple[torch.Tensor, dict]],
             normalizer: float | str, sums: Sequence[str] = ()) -> dict[str, float]:
        """One optimizer step over ``n_samples`` local samples.

        ``loss_fn(index)`` returns (summed loss of those samples, stats) for a micro-batch
        given as sample indices; the loss is divided by ``normalizer``: a number (e.g. the
        global token count), or the name of a stat of ``loss_fn`` (e.g. ``"tokens"``) whose
        sum over the whole group is the normalizer. In that case the gradients are summed
        unnormalized and divided once after the all-reduce, which also sums that stat and
        the stats named in ``sums`` over the group: one collective per step, and those
        stats come back as global sums. Returns the (local, or global for those) sums of
        the stats plus ``grad_norm``.
        """
        self.model.train()
        self.optimizer.zero_grad(set_to_none=False)
        stats: dict[str, float] = {}
        by_stat = isinstance(normalizer, str)
        for index in (micro_batches(lengths, self.cfg.micro_batch_tokens) if n_samples else []):
            with self._autocast():
                loss, mb_stats = loss_fn(index)
            (loss if by_stat else loss / normalizer).backward()
            for k, v in mb_stats.items():
                stats[k] = stats.get(k, 0.0) + float(v)
        if by_stat:
            keys = list(dict.fromkeys([normalizer, *sums]))
            stats.update(zip(keys, self._all_reduce_grads([stats.get(k, 0.0) for k in keys])))
            grads = [p.grad for p in self._params if p.grad is not None]
            if grads:
                torch._foreach_div_(grads, max(stats[normalizer], 1.0))
        else:
            self._all_reduce_grads()
        params = [p for p in self._params if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip or float("inf"))
        self.optimizer.step()
        if self.sync is not None:
            self.sync.after_inner_step()
        return {**stats, "grad_norm": float(norm)}

    def sync_stats(self) -> dict[str, float]:
        return self.sync.stats() if self.sync is not None else {}

    # -- checkpoints: safetensors + JSON, nothing pickled ---------------------------------
    def _leader(self) -> bool:
        return not dist.is_initialized() or dist.get_rank(self.group) == 0

    def checkpoint_path(self, directory: Path, island: int = 0) -> Path | None:
        """The folder ``save`` writes into (``None`` on ranks that do not write). Replicas of a
        group hold the same state, so its first rank writes; each island writes its own."""
        if not self._leader():
            return None
        return directory / f"island{island}" if self.sync is not None else directory

    def save(self, directory: Path, island: int = 0) -> None:
        """Weights, optimizer (and outer-sync) state, into ``checkpoint_path``."""
        path = self.checkpoint_path(directory, island)
        if path is None:
            return
        path.mkdir(parents=True, exist_ok=True)
        save_model(self.model, str(path / "model.safetensors"))  # handles tied weights
        save_optimizer(self.optimizer, path)
        if self.master is not None:
            save_file(self.master.state_dict(), str(path / "master.safetensors"))
        if self.sync is not None:
            save_file({k: v.contiguous() for k, v in self.sync.state_dict().items()},
                      str(path / "outer.safetensors"))

    def load(self, directory: Path, island: int = 0) -> None:
        path = directory / f"island{island}" if self.sync is not None else directory
        missing, unexpected = load_model(self.model, str(path / "model.safetensors"))
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not match the model: missing "
                             f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        load_optimizer(self.optimizer, path)
        if self.master is not None:
            self.master.load_state_dict(load_file(str(path / "master.safetensors")))
        if self.sync is not None:
            self.sync.load_state_dict(load_file(str(path / "outer.safetensors")))

    def _all_reduce_grads(self, values: Sequence[float] = ()) -> list[float]:
        """Sum the gradients over the group and, in the same collective, ``values``
        (returned summed). Each value travels as a float32 pair (x, x - float32(x)), so
        sums of integers up to 2^24 (token counts) are exact and the rest is within
        float32 rounding of the float64 sum."""
        if self.world == 1:
            return [float(v) for v in values]
        for p in self._params:  # a rank with no samples still joins the sum
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self._params if p.grad is not None]
        parts = [g.reshape(-1) for g in grads]
        packed = bool(values) and bool(parts) and parts[0].dtype in (torch.float32, torch.float64)
        if packed:
            exact = torch.tensor([float(v) for v in values], dtype=torch.float64)
            hi = exact.to(parts[0].dtype)
            lo = (exact - hi.double()).to(parts[0].dtype)
            parts += [hi.to(parts[0].device), lo.to(parts[0].device)]
        if parts:
            flat = self._sum(torch.cat(parts))  # one collective per step
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        if not values:
            return []
        if not packed:
            return self.global_sums(list(values))
        k = len(values)
        tail = flat[offset:].double().cpu()
        return (tail[:k] + tail[k:]).tolist()
