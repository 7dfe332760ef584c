"""Per-step metrics: each rank reports, rank 0 reduces and appends to metrics.jsonl.

Reduction across the ranks that report a key: ``timing_s/*`` and ``comm_s/*`` take the
maximum (the slowest rank sets the pace); keys starting with ``count/`` are summed;
everything else is averaged.
"""
from __future__ import annotations

import json
from pathlib import Path


def reduce_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    values: dict[str, list[float]] = {}
    for m in per_rank:
        for k, v in m.items():
            values.setdefault(k, []).append(float(v))
    out = {}
    for k in sorted(values):
        vs = values[k]
        if k.startswith(("timing_s/", "comm_s/")):
            out[k] = max(vs)
        elif k.startswith("count/"):
            out[k] = sum(vs)
        else:
            out[k] = sum(vs) / len(vs)
    return out


class MetricsLog:
    def __init__(self, path: Path):
        self.path = path
        self._fh = open(path, "a", buffering=1)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self._fh.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self) -> None:
        self._fh.close()


def read_metrics(path: Path | str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
