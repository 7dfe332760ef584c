"""What rank 0 shows while a run goes: a tqdm bar with the step's headline metrics."""
from __future__ import annotations

from tqdm import tqdm

_SHOWN = {"reward/mean": "reward", "perf/throughput": "throughput", "timing_s/step": "step_s"}


class ProgressPrinter:
    def __init__(self, steps: int):
        self._bar = tqdm(total=steps, desc="distflow", unit="step", dynamic_ncols=True)

    def update(self, step: int, metrics: dict[str, float]) -> None:
        shown = {label: f"{metrics[k]:.3g}" for k, label in _SHOWN.items() if k in metrics}
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()
