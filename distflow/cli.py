"""``distflow``: the one-machine command line.

    distflow run PIPELINE.py [--nproc N] [--out DIR] [--steps K] [key=value ...]
    distflow plot RUN_DIR
    distflow plan PIPELINE.py [--nproc N] [key=value ...]
    distflow export CHECKPOINT_DIR OUT_DIR [--dtype float32|bfloat16]

``run`` checks the pipeline and config in this process first (a mistake fails before any
worker starts), then launches ``torchrun --standalone`` with N workers, and at the end
prints the run's headline figures, or one line naming the rank and stage that failed.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from distflow.runtime.metrics import read_metrics


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
    from distflow.run import prepare

    overrides = [*overrides, *(f"steps={args.steps}" for _ in [0] if args.steps)]
    try:
        pipeline = prepare(args.pipeline, overrides, args.nproc).pipeline
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"distflow run: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or f"runs/{pipeline.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={args.nproc}", "-m", "distflow.run", args.pipeline,
           f"out={out}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))}
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        print(f"distflow run failed: {root_cause(out) or f'torchrun exited with {rc}'}",
              file=sys.stderr)
        return rc
    _summarize(out)
    return 0


def _plan(args: argparse.Namespace, overrides: list[str]) -> int:
    from distflow.config import parse_overrides, resolve
    from distflow.plan import describe
    from distflow.run import load_pipeline

    try:
        pipeline = load_pipeline(args.pipeline)
        cfg = resolve(pipeline, parse_overrides(overrides))
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"distflow plan: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(describe(pipeline, args.nproc, cfg.groups, cfg.params))
    return 0


def root_cause(out: Path) -> str | None:
    """The failure that started it: a rank's own error rather than a peer's echo of it."""
    lines = [p.read_text().strip() for p in sorted((out / "errors").glob("rank*.txt"))]
    own = [ln for ln in lines if "PeerFailure" not in ln]
    return (own or lines or [None])[0]


def _summarize(out: Path) -> None:
    from distflow.plot import plot_run

    rows = read_metrics(out / "metrics.jsonl")
    png = plot_run(out)
    print(f"distflow run: {len(rows)} steps -> {out}/metrics.jsonl, {png}")
    if rows and "reward/mean" in rows[0]:
        k = max(1, min(10, len(rows) // 2))
        first = sum(r["reward/mean"] for r in rows[:k]) / k
        last = sum(r["reward/mean"] for r in rows[-k:]) / k
        print(f"reward/mean: first {k} steps {first:.3f} -> last {k} steps {last:.3f} "
              f"({last - first:+.3f})")


def _export(argv: list[str]) -> int:
    """``distflow export``: a run's (or one checkpoint's) policy as an HF checkpoint folder."""
    from distflow.export import export

    parser = argparse.ArgumentParser(
        prog="distflow export", description="Write a checkpoint's model as a folder transformers "
        "loads with from_pretrained (config.json, model.safetensors, tokenizer files).")
    parser.add_argument("checkpoint_dir", help="a run directory (its newest checkpoint), a "
                        "checkpoints/step_<k> folder, or the folder of one stage's model")
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="cast the weights (default: the dtype they were trained in)")
    parser.add_argument("--model", default=None, help="take config.json and the tokenizer from "
                        "this HF checkpoint (for checkpoints that lack them)")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint_dir, args.out_dir, args.dtype, args.model)
    except (ValueError, FileNotFoundError) as e:
        print(f"distflow export: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(f"distflow export: wrote {out} (AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        return _export(argv[1:])
    parser = argparse.ArgumentParser(prog="distflow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a pipeline on this machine")
    run.add_argument("pipeline")
    run.add_argument("--nproc", type=int, default=2, help="number of workers (default 2)")
    run.add_argument("--out", default="", help="run directory (default runs/<name>-<time>)")
    run.add_argument("--steps", type=int, default=0, help="iterations (default: pipeline's)")
    plot = sub.add_parser("plot", help="plot a run's metrics.jsonl to metrics.png")
    plot.add_argument("run_dir")
    plan = sub.add_parser("plan", help="compare placements for a pipeline before launching")
    plan.add_argument("pipeline")
    plan.add_argument("--nproc", type=int, default=2)
    sub.add_parser("export", help="write a checkpoint's model as a transformers folder",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "plot":
        from distflow.plot import plot_run
        print(plot_run(args.run_dir))
        return 0
    if args.command == "plan":
        return _plan(args, rest)
    bad = [a for a in rest if "=" not in a]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (config overrides are key=value)")
    return _run(args, rest)


if __name__ == "__main__":
    sys.exit(main())
