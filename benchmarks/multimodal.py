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
block is a timed wait from a cost model of a real configuration (``--model``):

``--model 7b`` (a worker is one H100; the LLM fits data parallel, ``pp=1``):

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
- monolithic = data parallel (a 7B model with a distributed optimizer fits one H100, so
  data parallelism is Megatron's best layout here); disaggregated: encoder group
  ``--encoder-share`` (default 0.075) of the GPU workers, rounded up.

``--model 76b`` (an InternVL2-Llama3-76B-like model; a worker is one 8-GPU H100 node running
the tensor-parallel group, 8 x 400 TFLOP/s; the LLM is pipelined, ``pp=4``):

- encoder InternViT-6B (5.9B params), 448 px tiles of 1025 ViT tokens, pixel-shuffled to
  256 LLM tokens each; an image of our data with 1/4/9 patches stands for 1/4/9 tiles
  (InternVL's dynamic tiling uses 1-12): ``llm_tokens_per_patch=256``;
- ViT forward: 2 x 5.9B x 1025 / 3.2 PFLOP/s = 3.8 ms per tile (``cost_enc=3.8e-3``);
- LLM Llama3-70B (70.6B) forward + backward: 6 x 70.6B / 3.2 PFLOP/s = 0.132 ms per token
  (``cost_llm=1.32e-4``), ``text_scale=8``; the encoder is ~25% of a sample's compute;
- monolithic = Megatron-LM's layout: pipelines of 4 stages (80 layers, 20 per stage),
  the encoder and the inline preprocessing in the first stage, data parallel over the
  pipelines; disaggregated: the same 4-stage LLM pipelines without the encoder, and an
  encoder group of ``--encoder-share`` (default 0.25) of the GPU workers, rounded so the
  LLM group is a whole number of pipelines (16 workers: 4 encoder + 3 pipelines).

Both: every duration is multiplied by ``--time-scale`` so a run takes seconds (ratios do
not depend on it); preprocessing 2 ms per image (decode + resize of a JPEG), inline on
the GPU workers in the monolithic layout, on CPU workers of their own
(``groups.preprocess``, one per 16 GPU workers, counted apart from the GPU workers) in the
disaggregated one; gradient sums are a one-element sum per group and step (the
synchronization point; their cost, the same in both layouts, is not modelled); the LLM
pipeline's stages run Megatron's 1F1B schedule, a forward taking 1/3 and a backward 2/3 of
a stage's share.

Calibration: these are FLOP counts at an assumed utilization, not measurements on an
H100 (none is reachable from here); attention FLOPs, tensor-parallel communication, the
gradient all-reduce and the network are not modelled. The encoder share of the compute
and the image-count spread of the data decide the group sizes.

Per emulated run: samples/s (wall clock over the measured steps) and bubble time: the
idle time of the GPU workers, sum over encoder and LLM ranks of (step period - busy time),
from ``busy_s/<group>`` (busy time per step, averaged over the group) and the step period.

    python benchmarks/multimodal.py --part real
    python benchmarks/multimodal.py --part emulated --workers 16,64                  # --model 7b
    python benchmarks/multimodal.py --part emulated --model 76b --workers 16,64
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
sys.path.insert(0, str(REPO))
from distflow.multimodal.plan import one_f_one_b, plan_step, sample_costs  # noqa: E402
from distflow.run import load_pipeline  # noqa: E402

PARAMS = load_pipeline(str(PIPELINE)).params
MODELS = {  # cost model, LLM pipeline depth, encoder share of the GPU workers, time scale, samples per GPU
    "7b": {"cost": {"cost_pre": 2e-3, "cost_enc": 2e-4, "cost_llm": 1e-4, "text_scale": 8.0,
                    "llm_tokens_per_patch": 64}, "pp": 1, "encoder_share": 0.075, "time_scale": 0.2,
           "per_gpu": 2, "microbatches": 8},
    "76b": {"cost": {"cost_pre": 2e-3, "cost_enc": 3.8e-3, "cost_llm": 1.32e-4, "text_scale": 8.0,
                     "llm_tokens_per_patch": 256}, "pp": 4, "encoder_share": 0.25, "time_scale": 0.2,
            "per_gpu": 1, "microbatches": 16},
}


def group_sizes(n: int, share: float, pp: int) -> tuple[int, int]:
    """(encoder, llm) GPU workers of the disaggregated layout: at least the encoder's
    share of the work (rounded up), the LLM a whole number of ``pp``-stage pipelines."""
    enc = max(1, math.ceil(share * n - 1e-9))
    llm = (n - enc) // pp * pp
    if llm < pp:
        raise SystemExit(f"{n} workers leave no {pp}-stage LLM pipeline next to {enc} encoder workers")
    return n - llm, llm


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
    # Rank 0 writes step k's line when its own step k + 1 ends (or, if later, when every
    # rank has reported step k), but the last line at shutdown, right after the one before
    # it: so the last arrival is not a step period after the one before it when rank 0 is
    # on the critical path (the monolithic layout) and is when it is not (disaggregated:
    # rank 0 preprocesses, ahead of the others). Periods are measured between lines
    # warmup - 1 and steps - 2, which are a step apart in every layout.
    if steps - warmup < 2:
        raise SystemExit(f"need at least 2 steps after the {warmup} warm-up steps, got {steps - warmup}")
    span = a[-2] - a[warmup - 1]
    measured = steps - warmup - 1
    return {"nproc": nproc, "overrides": overrides, "rows": rows, "batch": batch,
            "since_start_s": [t - t0 for t in a],
            "samples_per_s": batch * measured / span, "period_s": span / measured,
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


def simulate(p: dict, groups: dict, monolithic: bool, step: int) -> float:
    """The cost model's step time of a layout, with no runtime overhead at all: a
    discrete-event replay of what the emulated run does (the same plan; preprocessing
    inline, or on CPU workers that run a step ahead and so are done in time whenever their
    step's work is shorter than the step; encoder forwards, then each backward once its
    gradient is back; each LLM pipeline's stages in 1F1B order, a forward 1/3 and a
    backward 2/3 of a stage's share; in the monolithic layout a pipeline's first stage
    preprocesses, then encodes every microbatch, then runs the LLM, then the encoder
    backwards)."""
    pp = p.get("pp", 1)
    plan = plan_step(p, "train", step * p["batch"], p["batch"], p["microbatches"], groups, monolithic)
    cost = [sample_costs(p, s) for s in plan.specs]
    mbs = list(enumerate(plan.order))
    free: dict = {}  # (role, rank) -> when it is next free

    def occupy(key, start, dur):
        free[key] = max(free.get(key, 0.0), start) + dur
        return free[key]

    pre_done, enc_done, grads_back = {}, {}, {}
    for i, mb in mbs:  # preprocessing, per rank in microbatch order: inline on the GPU
        for r in {plan.pre[j] for j in mb}:  # workers, or a step ahead on CPU workers
            t = occupy(("gpu" if monolithic else "pre", r), 0.0, sum(cost[j][0] for j in mb if plan.pre[j] == r))
            pre_done[i, r] = t if monolithic else 0.0
    for i, mb in mbs:  # encoder forwards
        for r in {plan.enc[j] for j in mb}:
            mine = [j for j in mb if plan.enc[j] == r]
            ready = max(pre_done[i, plan.pre[j]] for j in mine)
            enc_done[i, r] = occupy(("gpu", r), ready, sum(cost[j][1] for j in mine))
    llm = list(groups["llm"])
    for h in sorted(set(plan.llm)):  # each LLM pipeline, its stages in 1F1B order
        pipe = llm[llm.index(h):llm.index(h) + pp]
        work = [(i, [j for j in mb if plan.llm[j] == h]) for i, mb in mbs]
        work = [(i, mine, sum(cost[j][2] for j in mine) / pp) for i, mine in work if mine]
        ops = [one_f_one_b(len(work), pp, s) for s in range(pp)]
        done: dict = {}  # (kind, stage, k) -> end time
        pos = [0] * pp
        while any(pos[s] < len(ops[s]) for s in range(pp)):
            moved = False
            for s in range(pp):
                while pos[s] < len(ops[s]):
                    kind, k = ops[s][pos[s]]
                    i, mine, c = work[k]
                    if kind == "F":
                        dep = (max(max(pre_done[i, plan.pre[j]], enc_done[i, plan.enc[j]]) for j in mine)
                               if s == 0 else done.get(("F", s - 1, k)))
                    else:
                        dep = done.get(("F", s, k) if s == pp - 1 else ("B", s + 1, k))
                    if dep is None:
                        break
                    done[kind, s, k] = occupy(("gpu", pipe[s]), dep, c / 3 if kind == "F" else 2 * c / 3)
                    pos[s] += 1
                    moved = True
            if not moved:
                raise RuntimeError("1F1B replay deadlocked")
        for k, (i, _, _) in enumerate(work):
            grads_back[h, i] = done["B", 0, k]
    for i, mb in mbs:  # encoder backwards, once the gradients are back
        for r in {plan.enc[j] for j in mb}:
            mine = [j for j in mb if plan.enc[j] == r]
            occupy(("gpu", r), max(grads_back[plan.llm[j], i] for j in mine), 2 * sum(cost[j][1] for j in mine))
    return max(free.values())


def part_emulated(args, tmp: Path) -> list[dict]:
    model = MODELS[args.model]
    pp = model["pp"]
    share = args.encoder_share if args.encoder_share is not None else model["encoder_share"]
    scale = args.time_scale if args.time_scale is not None else model["time_scale"]
    per_gpu = args.per_gpu if args.per_gpu is not None else model["per_gpu"]
    mbs = args.microbatches if args.microbatches is not None else model["microbatches"]
    results = []
    for n in [int(x) for x in args.workers.split(",")]:
        enc, llm = group_sizes(n, share, pp)
        pre = max(1, n // 16)
        costs = {k: v * scale if k.startswith("cost") else v for k, v in model["cost"].items()}
        common = ["emulate=true", f"steps={args.warmup + args.steps}", f"batch={per_gpu * n * mbs}",
                  f"microbatches={mbs}", "eval_every=0", "align_steps=0", "seed=0",
                  *(f"{k}={v}" for k, v in costs.items()),
                  f"pp={pp}", f"transport.peer_timeout_s={args.peer_timeout}",
                  f"transport.heartbeat_s={args.heartbeat}"]
        layouts = [("monolithic", "none", n, ["placement=monolithic"])]
        for reorder in args.reorders.split(","):
            layouts.append(("disaggregated", reorder, n + pre,
                            ["placement=disaggregated", f"groups.preprocess={pre}",
                             f"groups.encoder={enc}", f"groups.llm={llm}"]))
        for placement, reorder, nproc, extra in layouts:
            r = run(nproc, common + extra + [f"reorder={reorder}"], tmp / f"{n}_{placement}_{reorder}",
                    warmup=args.warmup, timeout=args.timeout)
            rows = r.pop("rows")[args.warmup + 1:]  # util of step k arrives with step k + 1
            groups = {"monolithic": {"llm": n}, "disaggregated": {"encoder": enc, "llm": llm}}[placement]
            # idle GPU-worker time per step: period - busy time (busy_s/<group> is the mean over
            # the group's ranks; monolithic workers are in every group and do all three)
            busy = {g: statistics.mean(x.get(f"busy_s/{g}", 0.0) for x in rows)
                    for g in ("preprocess", "encoder", "llm")}
            if placement == "monolithic":
                idle = n * (r["period_s"] - sum(busy.values()))
            else:
                idle = sum(k * (r["period_s"] - busy[g]) for g, k in groups.items())
            # the cost model's own step time of this layout (no runtime overhead), same steps
            p = {**PARAMS, **costs, "pp": pp, "batch": per_gpu * n * mbs, "microbatches": mbs,
                 "max_images": 8, "align_steps": 0, "reorder": reorder}
            ranks = ({g: tuple(range(n)) for g in ("preprocess", "encoder", "llm")} if placement == "monolithic"
                     else {"preprocess": tuple(range(pre)), "encoder": tuple(range(pre, pre + enc)),
                           "llm": tuple(range(pre + enc, pre + enc + llm))})
            modelled = statistics.mean(simulate(p, ranks, placement == "monolithic", x["step"]) for x in rows)
            r.update(model=args.model, pp=pp, time_scale=scale, n_gpu=n, placement=placement, reorder=reorder, groups=groups,
                     modelled_period_s=modelled,
                     preprocess_workers=pre if placement == "disaggregated" else 0,
                     bubble_s=idle, busy_s=busy,
                     util={g: statistics.mean(x.get(f"util/{g}", 0) for x in rows)
                           for g in ("preprocess", "encoder", "llm")})
            results.append(r)
            print(f"N={n} {placement:13s} reorder={reorder:5s} {r['samples_per_s']:7.1f} samples/s "
                  f"(scaled time), period {r['period_s']:.2f} s (cost model alone {modelled:.2f} s), idle GPU-s/step {idle:.2f}, busy s/step "
                  + " ".join(f"{g} {v:.2f}" for g, v in busy.items()), flush=True)
        base = next(x for x in results if x["n_gpu"] == n and x["placement"] == "monolithic")
        none = next((x for x in results if x["n_gpu"] == n and x["reorder"] == "none"
                     and x["placement"] == "disaggregated"), None)
        for x in results:
            if x["n_gpu"] == n:
                x["speedup_vs_monolithic"] = x["samples_per_s"] / base["samples_per_s"]
                x["modelled_speedup_vs_monolithic"] = base["modelled_period_s"] / x["modelled_period_s"]
                if x["placement"] == "disaggregated" and none is not None:
                    x["bubble_cut_vs_none"] = 1 - x["bubble_s"] / none["bubble_s"]
        for x in results:
            if x["n_gpu"] == n:
                print(f"  {x['placement']:13s} {x['reorder']:5s} speedup {x['speedup_vs_monolithic']:.2f}x "
                      f"(cost model alone {x['modelled_speedup_vs_monolithic']:.2f}x)"
                      + (f", idle cut vs reorder=none {100 * x['bubble_cut_vs_none']:.0f}%"
                         if "bubble_cut_vs_none" in x else ""), flush=True)
    return results


def recompute(path: Path, warmup: int) -> None:
    """Samples/s of an older JSON (measured up to the last line, see ``run``) recomputed
    from its stored arrival times without the last line."""
    d = json.loads(path.read_text())
    rows = [(r, r["since_start_s"]) for r in d["results"] if "since_start_s" in r]
    base = {}
    for r, a in rows:
        n = len(a) - warmup - 1
        sps = r["batch"] * n / (a[-2] - a[warmup - 1])
        if r["placement"] == "monolithic":
            base[r["n_gpu"]] = sps
        print(f"N={r['n_gpu']} {r['placement']:13s} {r['reorder']:5s} {sps:7.1f} samples/s "
              f"({sps / base[r['n_gpu']]:.2f}x monolithic), recorded {r['samples_per_s']:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("real", "emulated"))
    ap.add_argument("--recompute", type=Path, metavar="JSON",
                    help="print an older emulated JSON's samples/s measured without its last line "
                         "(with --warmup as it was run) and exit")
    ap.add_argument("--workers", default="16,64")
    ap.add_argument("--model", choices=sorted(MODELS), default="7b", help="--part emulated: the cost model")
    ap.add_argument("--per-gpu", type=int, help="samples per GPU worker per microbatch (default: the model's)")
    ap.add_argument("--microbatches", type=int, help="per step (default: the model's, 8 for 7b, 16 for 76b)")
    ap.add_argument("--reorders", default="none,intra,both", help="--part emulated: disaggregated runs, one per reorder= value")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--time-scale", type=float, help="multiplies every modelled duration (default: the model's)")
    ap.add_argument("--real-steps", type=int, default=1500)
    ap.add_argument("--max-images", type=int, default=8, help="--part real: images per sample, 1-N")
    ap.add_argument("--align-steps", type=int, default=200,
                    help="--part real: first steps on one image per sample (stage-1 alignment)")
    ap.add_argument("--lr", type=float, default=1e-3, help="--part real")
    ap.add_argument("--eval-every", type=int, default=100, help="--part real")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--encoder-share", type=float,
                    help="GPU workers given to the encoder group, as a share (rounded up; default: the "
                         "model's, 0.075 for 7b and 0.25 for 76b, about the encoder's share of the compute)")
    ap.add_argument("--peer-timeout", type=float, default=10,
                    help="transport.peer_timeout_s; 64 processes on 2 cores starve heartbeats at 10 s")
    ap.add_argument("--heartbeat", type=float, default=0.5,
                    help="transport.heartbeat_s; every rank's beats go to every other rank, so at 64 "
                         "workers on 2 cores fewer beats leave more of the cores to the emulation")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.recompute:
        return recompute(args.recompute, args.warmup)
    if args.part is None:
        ap.error("--part is required")
    tmp = Path(tempfile.mkdtemp(prefix="distflow-mm-"))
    try:
        res = part_real(args, tmp) if args.part == "real" else part_emulated(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / (f"multimodal_{args.part}.json" if args.part == "real" or args.model == "7b"
                       else f"multimodal_{args.part}_{args.model}.json")
    path.write_text(json.dumps({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                                "cpu": cpu_model(), "cores": os.cpu_count(), "git": git_state(),
                                "args": {k: str(v) for k, v in vars(args).items()},
                                "cost_model": MODELS[args.model] if args.part == "emulated" else None,
                                "results": res}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
