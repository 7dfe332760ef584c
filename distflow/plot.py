"""The PNG of a run's main curves, made at the end of ``distflow run`` and by ``distflow plot``."""
from __future__ import annotations

from pathlib import Path

from distflow.runtime.metrics import read_metrics

_PREFERRED = ("reward/mean", "eval/accuracy", "sft/loss", "perf/throughput", "actor/pg_loss", "actor/kl", "critic/vf_loss",
              "response_length/mean", "timing_s/step")


def plot_run(run_dir: Path | str, keys: list[str] | None = None) -> Path:
    """Plot ``keys`` (default: the headline metrics present) of ``run_dir/metrics.jsonl``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl has no rows to plot")
    present = set().union(*rows)
    keys = keys or [k for k in _PREFERRED if k in present][:4] or ["timing_s/step"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", lw=1)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "metrics.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
