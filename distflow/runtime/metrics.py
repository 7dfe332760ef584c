"""Per-step metrics: each rank reports, rank 0 reduces and appends to metrics.jsonl.

Reduction across the ranks that report a key: ``timing_s/*`` and ``comm_s/*`` take the
maximum (the slowest rank sets the pace); keys starting with ``count/`` are summed;
keys logged with ``ctx.log_mean`` are weighted by their sample counts; everything else
is averaged. When stages report ``count/tokens``, rank 0 adds verl's
``perf/throughput``: tokens per second per worker over the whole step.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from distflow.runtime.context import WEIGHT


def reduce_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    out = _reduce(per_rank)
    if "count/tokens" in out and out.get("timing_s/step"):
        out["perf/throughput"] = out["count/tokens"] / out["timing_s/step"] / len(per_rank)
    return out


def _reduce(per_rank: list[dict[str, float]]) -> dict[str, float]:
    values: dict[str, list[float]] = {}
    weights: dict[str, list[float]] = {}
    for m in per_rank:
        for k, v in m.items():
            if not k.startswith(WEIGHT):
                values.setdefault(k, []).append(float(v))
                weights.setdefault(k, []).append(float(m.get(WEIGHT + k, 1.0)))
    weighted = {k[len(WEIGHT):] for m in per_rank for k in m if k.startswith(WEIGHT)}
    out = {}
    for k in sorted(values):
        vs = values[k]
        if k in weighted:
            total = sum(weights[k])
            out[k] = sum(v * w for v, w in zip(vs, weights[k])) / total if total else 0.0
        elif k.startswith(("timing_s/", "comm_s/")):
            out[k] = max(vs)
        elif k.startswith("count/"):
            out[k] = sum(vs)
        else:
            out[k] = sum(vs) / len(vs)
    return out


def checked_metrics(meta) -> tuple[dict[str, float], list[str]]:
    """The finite numbers of one rank's report (they come off the wire), and a reason for
    each entry left out."""
    if not isinstance(meta, dict):
        return {}, [f"report is {type(meta).__name__}, not a map of metrics"]
    ok, bad = {}, []
    for k, v in meta.items():
        if not isinstance(k, str):
            bad.append(f"key {k!r:.40} is not a string")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            bad.append(f"{k[:80]}={v!r:.40} is not a finite number")
        else:
            ok[k] = v
    return ok, bad


class MetricsLog:
    """``metrics.jsonl``, plus the loggers named by ``logger=`` (``distflow.loggers``)."""

    def __init__(self, path: Path, loggers: str = "", name: str = "distflow", config: dict | None = None):
        from distflow.loggers import make_loggers
        self.path = path
        self._fh = open(path, "a", buffering=1)
        self._loggers = make_loggers(loggers, path.parent, name, config)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self._fh.write(json.dumps({"step": step, **metrics}) + "\n")
        for logger in self._loggers:
            logger.log(step, metrics)

    def sync(self) -> None:
        """Flush the rows written so far to disk (before a checkpoint is committed)."""
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def truncate_after(self, step: int) -> None:
        """Drop rows of steps after ``step`` (they will be run again on resume)."""
        self._fh.close()
        rows = [r for r in read_metrics(self.path) if r["step"] <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.path)
        self._fh = open(self.path, "a", buffering=1)

    def close(self) -> None:
        self._fh.close()
        for logger in self._loggers:
            logger.close()


def read_metrics(path: Path | str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
