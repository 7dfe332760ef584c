"""Multimodal (DistTrain-style) training: monolithic vs disaggregated ``pipelines/vlm.py``.

Two parts, each a set of ``torchrun --standalone`` runs on this machine:

``--part real``: the real model on the real (generated) digit data, 4 workers,
``placement=monolithic`` vs ``placement=disaggregated`` (preprocess 1, encoder 1, llm 2,
``reorder=both``), same seed and steps: samples/s from the wall clock between the
metrics lines of the measured steps, the loss curve and the held-out exact match with
the wall clock (from the torchrun launch) at which each evaluation came out. Defaults:
the full data set (1-8 images per sample, ``--max-images 8``, all four questions),
``batch=32 microbatches=4 lr=1e-3``, the first 200 steps on one image per sample
(``--align-steps``, stage-1 alignment), 1500 steps, evaluation on 256 held-out samples
every 100 steps.

``--part emulated``: the same pipeline with ``emulate=true``: real processes, real
streams over the data plane (tensors of the small model's shapes), but every compute
block is a timed wait from a cost model of a real configuration:

- encoder ViT-H/14 (632M params) at up to 336 px, LLM a 7B decoder (LLaVA-1.5 layout: the
  LLM sees every ViT token), one H100 SXM per GPU worker at 400 TFLOP/s achieved in bf16
  (40% of the 989 TFLOP/s dense peak; DistTrain reports 54.7% MFU for its best run);
- an image of our data with 1/4/9 patches of 8 px stands for a 112/224/336 px image with
  64/256/576 ViT tokens (14 px patches): ``llm_tokens_per_patch=64``;
- ViT forward: 2 x 632M FLOPs per token x 64 tokens per patch / 400 TFLOP/s = 0.2 ms per
  patch (``cost_enc=2e-4``); backward is 2x forward;
- LLM forward + backward: 6 x 6.7B FLOPs per token / 400 TFLOP/s = 0.1 ms per token
  (``cost_llm=1e-4``); a text token of ours stands for 8 real ones (``text_scale=8``:
  prompts and answers of 100-350 tokens);
- gradient sums: a one-element sum per group and step (the synchronization point; its
  cost, the same in both layouts, is not modelled);
- preprocessing: 2 ms per image (decode + resize of a 336 px JPEG), inline on every GPU
  worker in the monolithic layout, on CPU workers of their own (``groups.preprocess``,
  one per 16 GPU workers, counted apart from the GPU workers) in the disaggregated one;
- every duration is multiplied by ``--time-scale`` (default 0.2) so a run takes seconds;
  ratios do not depend on it.

Calibration: these are FLOP counts at an assumed utilization, not measurements on an
H100 (none is reachable from here); the encoder is 7% of a sample's compute, which with
the image-count spread of the data decides the group sizes (``groups.encoder`` about
7.5% of the GPU workers). Not modelled: tensor/pipeline parallelism inside the LLM,
the gradient all-reduce (the same in both layouts) and the network.

Per emulated run: samples/s (wall clock over the measured steps) and bubble time: the
idle time of the GPU workers, sum over encoder and LLM ranks of (step period - busy time),
from ``util/<group>`` (busy / period, averaged over the group) and the step period.

    python benchmarks/multimodal.py --part real
    python benchmarks/multimodal.py --part emulated --workers 16,64
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import MetricsWatcher, cpu_model, git_state  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PIPELINE = REPO / "pipelines" / "vlm.py"
RESULTS = HERE / "results"
COST = {"cost_pre": 2e-3, "cost_enc": 2e-4, "cost_llm": 1e-4, "text_scale": 8.0,
        "llm_tokens_per_patch": 64}


def run(nproc: int, overrides: list[str], run_dir: Path, warmup: int, timeout: float) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "distflow.run", str(PIPELINE), f"out={run_dir}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    watcher = MetricsWatcher(run_dir / "metrics.jsonl")
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    watcher.start()
    with open(run_dir / "torchrun.log", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=timeout)
    wall = time.perf_counter() - t0
    watcher.stop()
    if rc != 0:
        raise RuntimeError(f"{overrides}: torchrun exited {rc}\n" + (run_dir / "torchrun.log").read_text()[-3000:])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = len(rows)
    a = watcher.arrivals
    batch = int(rows[0]["count/samples"])
    span = a[-1] - a[warmup - 1]
    return {"nproc": nproc, "overrides": overrides, "rows": rows, "batch": batch,
            "since_start_s": [t - t0 for t in a],
            "samples_per_s": batch * (steps - warmup) / span, "period_s": span / (steps - warmup),
            "run_wall_s": wall, "loadavg_1m_before": load, "loadavg_1m_after": os.getloadavg()[0],
            "command": " ".join(["torchrun", "--standalone", f"--nproc_per_node={nproc}", "-m",
                                 "distflow.run", "pipelines/vlm.py", *overrides])}


def part_real(args, tmp: Path) -> dict:
    common = [f"steps={args.real_steps}", "batch=32", "microbatches=4", f"eval_every={args.eval_every}",
              "eval_samples=256", "seed=0", f"max_images={args.max_images}",
              f"align_steps={args.align_steps}", f"lr={args.lr}"]
    out = {}
    for name, extra in (("monolithic", ["placement=monolithic"]),
                        ("disaggregated", ["placement=disaggregated", "groups.preprocess=1",
                                           "groups.encoder=1", "groups.llm=2", "reorder=both"])):
        r = run(4, common + extra, tmp / name, warmup=5, timeout=args.timeout)
        rows, since = r.pop("rows"), r.pop("since_start_s")
        r["loss"] = [x["loss"] for x in rows]
        r["eval_exact_match"] = {x["step"]: x["eval/exact_match"] for x in rows if "eval/exact_match" in x}
        # wall clock from the torchrun launch to the metrics line of each eval step
        r["eval_at_s"] = {x["step"]: round(t, 1) for x, t in zip(rows, since) if "eval/exact_match" in x}
        hit = [s for s, v in r["eval_exact_match"].items() if v >= 0.9]
        r["first_eval_at_90pct"] = {"step": hit[0], "s": r["eval_at_s"][hit[0]]} if hit else None
        out[name] = r
        print(f"real {name}: {r['samples_per_s']:.1f} samples/s, wall {r['run_wall_s']:.0f} s, loss "
              f"{r['loss'][0]:.3f} -> {statistics.mean(r['loss'][-10:]):.3f}, exact match (step: value @ s) "
              + ", ".join(f"{k}: {v:.3f} @ {r['eval_at_s'][k]:.0f}" for k, v in r["eval_exact_match"].items())
              + f"; first >= 90%: {r['first_eval_at_90pct']}", flush=True)
    return out


def part_emulated(args, tmp: Path) -> list[dict]:
    results = []
    for n in [int(x) for x in args.workers.split(",")]:
        enc = max(1, math.ceil(args.encoder_share * n - 1e-9))  # never fewer ranks than the encoder's share of the work
        pre = max(1, n // 16)
        scaled = [f"{k}={v * args.time_scale if k.startswith('cost') else v}" for k, v in COST.items()]
        common = ["emulate=true", f"steps={args.warmup + args.steps}", f"batch={args.per_gpu * n * args.microbatches}",
                  f"microbatches={args.microbatches}", "eval_every=0", "align_steps=0", "seed=0", *scaled,
                  f"transport.peer_timeout_s={args.peer_timeout}"]
        layouts = [("monolithic", "none", n, ["placement=monolithic"])]
        for reorder in ("none", "intra", "both"):
            layouts.append(("disaggregated", reorder, n + pre,
                            ["placement=disaggregated", f"groups.preprocess={pre}",
                             f"groups.encoder={enc}", f"groups.llm={n - enc}"]))
        for placement, reorder, nproc, extra in layouts:
            r = run(nproc, common + extra + [f"reorder={reorder}"], tmp / f"{n}_{placement}_{reorder}",
                    warmup=args.warmup, timeout=args.timeout)
            rows = r.pop("rows")[args.warmup + 1:]  # util of step k arrives with step k + 1
            groups = {"monolithic": {"llm": n}, "disaggregated": {"encoder": enc, "llm": n - enc}}[placement]
            if placement == "monolithic":
                util = statistics.mean(sum(x.get(f"util/{g}", 0) for g in ("preprocess", "encoder", "llm"))
                                       for x in rows)
                idle = (1 - util) * n * r["period_s"]
            else:
                idle = sum((1 - statistics.mean(x[f"util/{g}"] for x in rows)) * k * r["period_s"]
                           for g, k in groups.items())
            r.update(n_gpu=n, placement=placement, reorder=reorder, groups=groups,
                     preprocess_workers=pre if placement == "disaggregated" else 0,
                     bubble_s=idle, util={g: statistics.mean(x.get(f"util/{g}", 0) for x in rows)
                                          for g in ("preprocess", "encoder", "llm")})
            results.append(r)
            print(f"N={n} {placement:13s} reorder={reorder:5s} {r['samples_per_s']:7.1f} samples/s "
                  f"(scaled time) idle GPU-s/step {idle:.2f} util {r['util']}", flush=True)
        base = next(x for x in results if x["n_gpu"] == n and x["placement"] == "monolithic")
        none = next(x for x in results if x["n_gpu"] == n and x["reorder"] == "none" and x["placement"] == "disaggregated")
        for x in results:
            if x["n_gpu"] == n:
                x["speedup_vs_monolithic"] = x["samples_per_s"] / base["samples_per_s"]
                if x["placement"] == "disaggregated":
                    x["bubble_cut_vs_none"] = 1 - x["bubble_s"] / none["bubble_s"]
        for x in results:
            if x["n_gpu"] == n:
                print(f"  {x['placement']:13s} {x['reorder']:5s} speedup {x['speedup_vs_monolithic']:.2f}x"
                      + (f", idle cut vs reorder=none {100 * x['bubble_cut_vs_none']:.0f}%"
                         if "bubble_cut_vs_none" in x else ""), flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("real", "emulated"), required=True)
    ap.add_argument("--workers", default="16,64")
    ap.add_argument("--per-gpu", type=int, default=2, help="samples per GPU worker per microbatch")
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--time-scale", type=float, default=0.2)
    ap.add_argument("--real-steps", type=int, default=1500)
    ap.add_argument("--max-images", type=int, default=8, help="--part real: images per sample, 1-N")
    ap.add_argument("--align-steps", type=int, default=200,
                    help="--part real: first steps on one image per sample (stage-1 alignment)")
    ap.add_argument("--lr", type=float, default=1e-3, help="--part real")
    ap.add_argument("--eval-every", type=int, default=100, help="--part real")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--encoder-share", type=float, default=0.075,
                    help="GPU workers given to the encoder group, as a share (rounded up; default 0.075: the encoder is ~7%% of the compute)")
    ap.add_argument("--peer-timeout", type=float, default=10,
                    help="transport.peer_timeout_s; 64 processes on 2 cores starve heartbeats at 10 s")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="distflow-mm-"))
    try:
        res = part_real(args, tmp) if args.part == "real" else part_emulated(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"multimodal_{args.part}.json"
    path.write_text(json.dumps({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                                "cpu": cpu_model(), "cores": os.cpu_count(), "git": git_state(),
                                "args": {k: str(v) for k, v in vars(args).items()}, "cost_model": COST,
                                "results": res}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
