"""Loss vs bytes: data parallel vs DiLoCo vs Streaming DiLoCo on ``pipelines/lm_diloco.py``.

Three runs of ``distflow run pipelines/lm_diloco.py --nproc 2`` with the same steps, batch,
seed, model and inner optimizer (AdamW, same ``lr`` and lr schedule), so equal tokens:

- ``dp``: ``diloco.mode=ddp``: both ranks all-reduce gradients every step (plain DP);
- ``diloco``: ``diloco.mode=diloco diloco.islands=2 diloco.inner_steps=H`` (fp32 payload);
- ``streaming``: ``diloco.mode=streaming diloco.islands=2 diloco.inner_steps=H
  diloco.fragments=2 diloco.overlap_steps=1 diloco.alpha=0.5 diloco.quantize=e3m0``
  (tau=1 < H/P).

Metrics: the held-out ``eval/loss`` of the global model (every ``eval_every`` steps and at
the end, where DiLoCo/Streaming complete every in-flight exchange and bring every fragment
up to date: ``DiLoCo.consensus()``, the model a user deploys) and the bytes each island
contributes ("payload contributed"): for DiLoCo/Streaming the logged ``diloco/bytes_sent``
plus ``diloco/export_bytes`` (the encoded pseudo-gradient payloads this rank put in the
all-gathers, training syncs plus the final one); for DP ``4 bytes x trainable params x steps`` (the fp32 gradient each rank
contributes to the all-reduce every step). Neither counts collective-algorithm overhead
(a ring all-reduce moves ~2x its input per rank; an all-gather of N payloads moves
(N-1) x payload into each rank), so the same definition is used for all three.

    python benchmarks/diloco_loss.py [--steps 2400] [--quick] [--out benchmarks/results]

Defaults (the recorded run, ``benchmarks/RESULTS.md``): 2400 steps, inner lr 6e-3 with linear
warmup (steps // 20) and cosine decay to 10%, outer lr 0.7, outer momentum 0.8, H=30.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import main_of  # noqa: E402
from distflow.models import DecoderLM, preset  # noqa: E402
from distflow.run import load_pipeline  # noqa: E402
PIPELINE = "pipelines/lm_diloco.py"


def modes(h: int, fragments: int = 2) -> dict[str, list[str]]:
    return {
        "dp": ["diloco.mode=ddp"],
        "diloco": ["diloco.mode=diloco", "diloco.islands=2", f"diloco.inner_steps={h}"],
        "streaming": ["diloco.mode=streaming", "diloco.islands=2", f"diloco.inner_steps={h}",
                      "diloco.quantize=e3m0", "diloco.overlap_steps=1", "diloco.alpha=0.5",
                      f"diloco.fragments={fragments}"],
    }


def sent_bytes(row: dict) -> float:
    return row.get("diloco/bytes_sent", 0.0) + row.get("diloco/export_bytes", 0.0)


def count_params(params: dict) -> int:
    """Trainable params of the exact model ``lm_diloco.py`` builds for ``params``."""
    cfg = preset("tiny", vocab_size=256, hidden_size=params["hidden"],
                 num_hidden_layers=params["layers"], intermediate_size=4 * params["hidden"],
                 max_position_embeddings=params["seq_len"] + 1)
    return sum(p.numel() for p in DecoderLM(cfg).parameters() if p.requires_grad)


def run_one(name: str, overrides: list[str], steps: int, run_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "distflow.cli", "run", PIPELINE, "--nproc", "2",
           "--out", str(run_dir), "--steps", str(steps), *overrides]
    print(f"[{name}] {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return {"rows": rows, "wall_s": wall, "command": "distflow " + " ".join(cmd[3:])}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--inner-steps", type=int, default=30, help="H")
    ap.add_argument("--fragments", type=int, default=2, help="P (streaming)")
    ap.add_argument("--lr", type=float, default=6e-3,
                    help="inner AdamW peak lr (all runs; 6e-3 is DP's best of 1.5e-3/3e-3/6e-3/1e-2)")
    ap.add_argument("--lr-schedule", default="cosine", choices=["constant", "cosine"],
                    help="inner lr schedule (all runs): cosine = linear warmup + cosine decay")
    ap.add_argument("--warmup", type=int, default=None, help="warmup steps (default: steps // 20)")
    ap.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor, fraction of --lr")
    ap.add_argument("--outer-lr", type=float, default=0.7)
    ap.add_argument("--outer-momentum", type=float, default=0.8)
    ap.add_argument("--modes", default="dp,diloco,streaming", help="comma-separated subset (dp needed for ratios)")
    ap.add_argument("--eval-every", type=int, default=None, help="default: 4 x H")
    ap.add_argument("--eval-batch", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0, help="run seed (data order, init) for every mode")
    ap.add_argument("--quick", action="store_true", help="smoke test: 40 steps")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                    help="directory for diloco_loss.json/.png")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every, args.eval_batch = 40, 20, 64
    if args.eval_every is None:
        args.eval_every = 4 * args.inner_steps
    if args.warmup is None:
        args.warmup = args.steps // 20
    args.out = Path(args.out)
    return args


def run(args: argparse.Namespace) -> dict:
    """One run per mode; the results doc."""
    pipe_params = dict(load_pipeline(str(ROOT / PIPELINE)).params)
    common = [f"lr={args.lr}", f"lr_schedule={args.lr_schedule}", f"warmup={args.warmup}",
              f"min_lr_ratio={args.min_lr_ratio}", f"eval_every={args.eval_every}",
              f"eval_batch={args.eval_batch}", f"seed={args.seed}",
              f"diloco.outer_lr={args.outer_lr}", f"diloco.outer_momentum={args.outer_momentum}"]
    pipe_params.update(lr=args.lr, lr_schedule=args.lr_schedule, warmup=args.warmup,
                       min_lr_ratio=args.min_lr_ratio, eval_every=args.eval_every,
                       eval_batch=args.eval_batch)
    n_params = count_params(pipe_params)

    results = {}
    with tempfile.TemporaryDirectory(prefix="diloco_loss_") as tmp:
        selected = args.modes.split(",")
        for name, overrides in modes(args.inner_steps, args.fragments).items():
            if name not in selected:
                continue
            r = run_one(name, [*overrides, *common], args.steps, Path(tmp) / name)
            rows = r["rows"]
            curve = []
            for row in rows:
                if "eval/loss" not in row:
                    continue
                step = row["step"] + 1
                sent = 4 * n_params * step if name == "dp" else sent_bytes(row)
                curve.append({"step": step, "bytes": float(sent), "eval_loss": row["eval/loss"]})
            last = rows[-1]
            total = 4 * n_params * len(rows) if name == "dp" else sent_bytes(last)
            tokens = sum(row.get("count/tokens", 0) for row in rows)
            results[name] = {
                "command": r["command"], "wall_s": round(r["wall_s"], 1),
                "final_eval_loss": curve[-1]["eval_loss"], "final_train_loss": last["train/loss"],
                "bytes_per_island": float(total), "syncs": last.get("diloco/syncs"),
                "export_bytes": last.get("diloco/export_bytes"),
                "tokens": tokens, "median_step_s": sorted(x["timing_s/step"] for x in rows)[len(rows) // 2],
                "curve": curve}
            print(f"[{name}] eval/loss {results[name]['final_eval_loss']:.4f}  "
                  f"bytes/island {total / 1e6:.3f} MB  wall {r['wall_s']:.0f}s", flush=True)

    dp = results.get("dp", {"final_eval_loss": float("nan"), "bytes_per_island": 4.0 * n_params * args.steps})
    for name, r in results.items():
        r["loss_ratio_vs_dp"] = r["final_eval_loss"] / dp["final_eval_loss"]
        r["bytes_reduction_vs_dp"] = dp["bytes_per_island"] / r["bytes_per_island"] if r["bytes_per_island"] else None
    doc = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "steps": args.steps, "quick": args.quick,
           "nproc": 2, "islands": 2, "trainable_params": n_params,
           "pipeline_params": pipe_params, "inner_steps": args.inner_steps,
           "fragments": args.fragments, "outer_lr": args.outer_lr, "outer_momentum": args.outer_momentum,
           "bytes_definition": "payload contributed per island: DP = 4 B x trainable params x steps "
                               "(fp32 gradient into the all-reduce); DiLoCo/Streaming = diloco/bytes_sent "
                               "+ diloco/export_bytes (training syncs + the final consensus exchange)",
           "eval_definition": "held-out loss of the global model: outer params mid-run, "
                              "DiLoCo.consensus() at the last step (DP: the model)",
           "goal": "eval loss within 2% of DP with >= 100x fewer bytes",
           "results": results}
    for name in ("diloco", "streaming"):
        if name not in results:
            continue
        r = results[name]
        doc.setdefault("goal_met", {})[name] = bool(r["loss_ratio_vs_dp"] <= 1.02 and
                                                    (r["bytes_reduction_vs_dp"] or 0) >= 100)
    return doc


def report(doc: dict, args: argparse.Namespace) -> None:
    """``diloco_loss.json``, ``diloco_loss.png`` and a Markdown table on stdout."""
    out, results, n_params = args.out, doc["results"], doc["trainable_params"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "diloco_loss.json").write_text(json.dumps(doc, indent=2))
    dp = results.get("dp", {})

    print(f"\ntrainable params {n_params}, steps {args.steps}, tokens/run {dp.get('tokens', 0):.0f}")
    print("| mode | final held-out eval/loss | bytes / island | loss / DP | DP bytes / bytes | syncs | wall s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['final_eval_loss']:.4f} | {r['bytes_per_island'] / 1e6:.3f} MB | "
              f"{r['loss_ratio_vs_dp']:.4f} | {r['bytes_reduction_vs_dp']:.1f}x | "
              f"{r['syncs'] if r['syncs'] is not None else '-'} | {r['wall_s']:.0f} |")
    print(f"goal met: {doc['goal_met']}")

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for name, r in results.items():
            pts = [c for c in r["curve"] if c["bytes"] > 0]
            ax.plot([c["bytes"] for c in pts], [c["eval_loss"] for c in pts], marker="o", ms=3, label=name)
        ax.set_xscale("log")
        ax.set_xlabel("cumulative bytes contributed per island")
        ax.set_ylabel("held-out eval loss (nats/byte)")
        ax.set_title(f"lm_diloco, 2 islands, {args.steps} steps, H={args.inner_steps}, "
                     f"{args.lr_schedule} lr")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "diloco_loss.png", dpi=120)
    except ImportError as e:
        print(f"no plot: {e}")


main = main_of(parse, run, report)


if __name__ == "__main__":
    sys.exit(main())
