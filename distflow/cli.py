"""``distflow``: the one-machine command line.

    distflow run PIPELINE.py [--nproc N] [--out DIR] [--steps K] [--max-restarts N] [key=value ...]
    distflow plot RUN_DIR
    distflow plan PIPELINE.py [--nproc N] [key=value ...]
    distflow export CHECKPOINT_DIR OUT_DIR [--dtype float32|bfloat16]

``run`` checks the pipeline and config in this process first (a mistake fails before any
worker starts), then launches ``torchrun`` with N workers on this machine, and at the end
prints the run's headline figures, or one line naming the rank and stage that failed.
It makes a fresh secret for the run's data plane (``DISTFLOW_SECRET`` in the workers'
environment) unless one is set, and hosts torchrun's rendezvous store itself, on
127.0.0.1 only (``torchrun --standalone`` listens on every interface).
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from distflow.runtime.faults import signal_name
from distflow.runtime.metrics import read_metrics


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
    from distflow.run import prepare

    overrides = [*overrides, *(f"steps={args.steps}" for _ in [0] if args.steps)]
    try:
        plan = prepare(args.pipeline, overrides, args.nproc)
        pipeline, cfg = plan.pipeline, plan.config
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"distflow run: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or f"runs/{pipeline.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    store, port = _loopback_store()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={uuid.uuid4()}",
           "--rdzv-conf=is_host=false", "--local-addr=127.0.0.1",
           f"--nproc_per_node={args.nproc}", f"--max-restarts={args.max_restarts}",
           "-m", "distflow.run", args.pipeline,
           f"out={out}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc))),
        # rank 0 hosts the workers' store on the rendezvous interface, not torchrun's agent
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    if not (os.environ.get("DISTFLOW_SECRET") or cfg.transport.secret_file):
        env["DISTFLOW_SECRET"] = secrets.token_hex(32)
    try:
        rc, report = _call_teeing_stderr(cmd, env)
    finally:
        del store
    if rc != 0:
        print(f"distflow run failed: {root_cause(out, report) or f'torchrun exited with {rc}'}",
              file=sys.stderr)
        return rc
    _summarize(out)
    return 0


def _call_teeing_stderr(cmd: list[str], env: dict) -> tuple[int, str]:
    """Run ``cmd``, passing its stderr through, and keep torchrun's failure report."""
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace")
    tail: list[str] = []
    for line in proc.stderr:
        sys.stderr.write(line)
        tail.append(line)
        del tail[:-400]
    return proc.wait(), "".join(tail)


_ROOT = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)


def signal_death(report: str) -> tuple[int, int] | None:
    """(rank, signal) when torchrun's report says the first failure was a signal death."""
    m = _ROOT.search(report)
    if m and int(m.group(2)) < 0:
        return int(m.group(1)), -int(m.group(2))
    return None


def _loopback_store():
    """torchrun's rendezvous store, hosted here and reachable from this machine only."""
    import torch.distributed as dist

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, is_master=True, multi_tenant=True,
                          wait_for_workers=False, timeout=datetime.timedelta(seconds=300),
                          master_listen_fd=sock.detach())
    return store, port


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


def root_cause(out: Path, report: str = "") -> str | None:
    """The failure that started it: a rank's own error rather than a peer's echo of it, or
    a rank killed by a signal (from torchrun's report: such a rank wrote nothing itself;
    its stage is the one its peers last saw; the line goes to errors/rank<R>.txt too)."""
    lines = [p.read_text().strip() for p in sorted((out / "errors").glob("rank*.txt"))]
    own = [ln for ln in lines if "PeerFailure" not in ln and "terminated by SIG" not in ln]
    dead = signal_death(report)
    if dead and not own:
        rank, signum = dead
        stages = [m.group(1) for ln in lines
                  if (m := re.search(rf"peer rank {rank} \((?:last reported )?stage (\S+?),", ln))]
        line = (f"distflow: rank {rank} stage {stages[0] if stages else '-'} failed: killed by "
                f"{signal_name(signum)} (exit signal {signum})")
        (out / "errors").mkdir(exist_ok=True)
        (out / "errors" / f"rank{rank}.txt").write_text(line + "\n")
        return line
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
    evals = [r for r in rows if "eval/accuracy" in r]
    if evals:
        a, b = evals[0], evals[-1]
        print(f"eval/accuracy (held-out, greedy): step {a['step']} {a['eval/accuracy']:.3f} -> "
              f"step {b['step']} {b['eval/accuracy']:.3f} ({b['eval/accuracy'] - a['eval/accuracy']:+.3f})")
    if rows and "sft/loss" in rows[0]:
        print(f"sft/loss: step 0 {rows[0]['sft/loss']:.3f} -> step {rows[-1]['step']} "
              f"{rows[-1]['sft/loss']:.3f}; model -> {out}/model")


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
    run.add_argument("--max-restarts", type=int, default=0,
                     help="restart the workers this many times after a failure; each restart "
                          "resumes from the newest complete checkpoint (default 0)")
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
