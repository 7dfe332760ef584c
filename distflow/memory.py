"""Per-phase memory accounting and the release / offload policy.

RL alternates phases (generation, reference, training, weight sync) many times; a
caching allocator keeps blocks cut for one phase that the next cannot reuse, so reserved
memory can far exceed allocated memory. Every stage of a run is a phase here: after it,
the worker logs ``memory/<stage>/...``:

- CUDA: ``allocated_gb``, ``reserved_gb``, ``peak_allocated_gb`` (within the phase) and
  ``fragmentation_gb`` (reserved - allocated);
- CPU: ``rss_gb`` (resident set size after the phase) and ``peak_rss_gb`` (process peak).

Policies (``memory.*`` config keys, all off by default until GPU measurements in
benchmarks/RESULTS.md argue otherwise):

- ``memory.release``: return cached blocks to the device at every phase boundary
  (``torch.cuda.empty_cache``; on the CPU, glibc's free heap via ``malloc_trim``);
- ``memory.offload``: stages that hold a model they only need during their own phase
  (reference, reward model, critic values) move it to pinned CPU memory afterwards and
  back before their next phase;
- ``memory.expandable_segments``: start CUDA with ``expandable_segments:True``, which lets
  the allocator grow segments instead of cutting new ones.
"""
from __future__ import annotations

import os
import resource
from dataclasses import dataclass

import torch

from distflow.transport import heap

GB = float(1 << 30)


@dataclass(kw_only=True)
class MemoryConfig:
    release: bool = False
    offload: bool = False
    expandable_segments: bool = False


def configure_allocator(cfg: MemoryConfig) -> None:
    """Must run before CUDA is first used."""
    if cfg.expandable_segments:
        conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
        if "expandable_segments" not in conf:
            os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ",".join(
                x for x in (conf, "expandable_segments:True") if x)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_and_peak_bytes() -> tuple[int, int]:
    """(resident set, its peak) of this process: one read of ``/proc/self/status``
    (``VmRSS``, ``VmHWM``) where there is one, else ``statm`` + ``getrusage`` (which
    profiled at ~0.7 ms a call inside busy 2-worker GRPO runs, 6 calls a step)."""
    try:
        with open("/proc/self/status", "rb") as fh:
            text = fh.read()
        rss, peak = (int(text[text.index(k) + 6:text.index(b"kB", text.index(k))]) * 1024
                     for k in (b"VmRSS:", b"VmHWM:"))
        return rss, peak
    except (OSError, ValueError):
        return _rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def offload_module(module: torch.nn.Module) -> None:
    """Move a module's weights to pinned CPU memory (no-op when already on the CPU)."""
    for p in module.parameters():
        if p.device.type != "cpu":
            p.data = p.data.to("cpu").pin_memory()


def onload_module(module: torch.nn.Module, device: torch.device) -> None:
    for p in module.parameters():
        if p.device != device:
            p.data = p.data.to(device, non_blocking=True)


class MemoryPolicy:
    def __init__(self, cfg: MemoryConfig):
        self.cfg = cfg
        self.cuda = torch.cuda.is_available()

    def before(self, stage) -> None:
        if self.cfg.offload and hasattr(stage, "onload"):
            stage.onload()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def after(self, name: str, stage) -> dict[str, float]:
        if self.cfg.offload and hasattr(stage, "offload"):
            stage.offload()
        if self.cfg.release:
            if self.cuda:
                torch.cuda.empty_cache()
            else:
                heap.release()
        return self.measure(name)

    def measure(self, name: str) -> dict[str, float]:
        key = f"memory/{name}/"
        if self.cuda:
            alloc, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
            return {key + "allocated_gb": alloc / GB, key + "reserved_gb": reserved / GB,
                    key + "peak_allocated_gb": torch.cuda.max_memory_allocated() / GB,
                    key + "fragmentation_gb": (reserved - alloc) / GB}
        rss, peak = _rss_and_peak_bytes()
        return {key + "rss_gb": rss / GB, key + "peak_rss_gb": peak / GB}
