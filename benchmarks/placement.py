"""Placement benchmark: colocated vs interleaved vs disaggregated (max_staleness 0 and 1)
on the same GRPO and PPO workload, 4 workers on this machine.

    python benchmarks/placement.py                  # GRPO + PPO, 4 variants each
    python benchmarks/placement.py --quick          # GRPO only, few steps (< ~90 s on 2 cores)
    python benchmarks/placement.py --steps 60 --repeats 2 --out benchmarks/results

Each variant is one ``distflow run PIPELINE --nproc 4`` with the same workload overrides
(default: the tiny model on the built-in ``reverse`` task, ``prompts=64 group_size=8
max_new_tokens=16``, so that generation is a real share of the step). The variants run
interleaved (pipeline by pipeline, variant by variant, repeat by repeat) so that background
load on a shared box hits all of them alike.

Definitions (the same for every variant):
- samples per step = ``prompts * group_size``.
- step time (headline) = wall-clock period between consecutive ``metrics.jsonl`` lines,
  timed by this script polling the file (every 10 ms): ``(t[last] - t[first]) / (last - first)``
  over the steady-state lines, i.e. steps ``warmup .. steps - 3`` (the warm-up steps and the
  last 2 lines are excluded: rank 0 writes a step's metrics 1 + max_staleness steps late, so
  the final lines arrive in a burst). Rank 0 writes a line after finishing a step, so in
  steady state this is the pipeline's period whether or not stages overlap across steps.
- samples/s = samples per step / step time.
- also reported: median ``timing_s/step`` (the max over ranks of each rank's own step time)
  over the same steps, median per-stage ``timing_s/<stage>`` and ``comm_s/<stage>``, and the
  CPU use of the whole run (user + sys of the process tree / wall time, in cores).
- reward: mean ``reward/mean`` of the first 10 and of the last 10 steps.

Writes ``OUT/placement.json`` and ``OUT/placement.png`` (samples/s bars + reward curves).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import main_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> placement overrides
    "colocated": ["placement=colocated"],
    "interleaved": ["placement=interleaved"],
    "disagg_s0": ["placement=disaggregated", "max_staleness=0"],
    "disagg_s1": ["placement=disaggregated", "max_staleness=1"],
}
NPROC = 4


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_one(pipeline: str, variant: str, workload: list[str], steps: int, out: Path,
            timeout: float) -> dict:
    run_dir = out / "runs" / f"{pipeline}-{variant}"
    if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cmd = [sys.executable, "-m", "distflow.cli", "run", f"pipelines/{pipeline}.py",
           "--nproc", str(NPROC), "--out", str(run_dir), "--steps", str(steps),
           *VARIANTS[variant], *workload]
    arrivals: list[float] = []
    done = threading.Event()

    def poll():
        path, pos, buf = run_dir / "metrics.jsonl", 0, ""
        while True:
            finished = done.is_set()
            if path.exists():
                with open(path) as fh:
                    fh.seek(pos)
                    chunk = fh.read()
                    pos = fh.tell()
                now = time.perf_counter()
                buf += chunk
                while "\n" in buf:
                    _, buf = buf.split("\n", 1)
                    arrivals.append(now)
            if finished:
                return
            time.sleep(0.01)

    poller = threading.Thread(target=poll, daemon=True)
    cpu0, t0 = _cpu_s(), time.perf_counter()
    poller.start()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    done.set()
    poller.join()
    cpu = _cpu_s() - cpu0
    if proc.returncode != 0:
        raise RuntimeError(f"{pipeline}/{variant} failed (rc {proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"rows": rows, "arrivals": arrivals, "wall_s": wall, "cpu_s": cpu}


def summarize(raw: dict, samples_per_step: int, warmup: int) -> dict:
    rows, arr = raw["rows"], raw["arrivals"]
    n = len(rows)
    last = n - 3  # exclude the last 2 lines (the lagged burst at the end)
    first = min(warmup, max(0, last - 1))
    period = (arr[last] - arr[first]) / (last - first)
    steady = rows[first:last + 1]
    med = lambda key: statistics.median(r.get(key, 0.0) for r in steady)
    stages = sorted({k.split("/", 1)[1] for r in steady for k in r if k.startswith("timing_s/")} - {"step"})
    rewards = [r["reward/mean"] for r in rows]
    k = max(1, min(10, n // 2))
    return {
        "step_s": period, "samples_per_s": samples_per_step / period,
        "median_timing_step_s": med("timing_s/step"),
        "samples_per_s_by_timing": samples_per_step / med("timing_s/step"),
        "stage_timing_s": {s: med(f"timing_s/{s}") for s in stages},
        "stage_comm_s": {s: med(f"comm_s/{s}") for s in stages},
        "staleness": med("rollout/staleness"),
        "reward_first10": sum(rewards[:k]) / k, "reward_last10": sum(rewards[-k:]) / k,
        "reward_curve": rewards, "steps": n, "steady_steps": [first, last],
        "wall_s": raw["wall_s"], "cpu_cores_used": raw["cpu_s"] / raw["wall_s"],
    }


def aggregate(reps: list[dict]) -> dict:
    """Median over repeats of the headline numbers; the first repeat's curve and stages."""
    out = dict(reps[0])
    for key in ("step_s", "samples_per_s", "median_timing_step_s", "samples_per_s_by_timing",
                "reward_first10", "reward_last10", "cpu_cores_used", "wall_s"):
        out[key] = statistics.median(r[key] for r in reps)
    out["repeats"] = [{k: r[k] for k in ("step_s", "samples_per_s", "median_timing_step_s",
                                         "reward_first10", "reward_last10", "cpu_cores_used")}
                      for r in reps]
    return out


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pipes = list(doc["results"])
    fig, axes = plt.subplots(2, len(pipes), figsize=(6 * len(pipes), 8), squeeze=False)
    for j, pipe in enumerate(pipes):
        res = doc["results"][pipe]
        names = list(res)
        ax = axes[0][j]
        bars = ax.bar(names, [res[v]["samples_per_s"] for v in names],
                      color=["tab:gray", "tab:blue", "tab:orange", "tab:green"][:len(names)])
        for b, v in zip(bars, names):
            ax.annotate(f"{res[v]['samples_per_s']:.0f}\n({res[v]['samples_per_s'] / res[names[0]]['samples_per_s']:.2f}x)",
                        (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{pipe.upper()}: samples/s, {NPROC} workers (steady state)")
        ax.set_ylabel("samples / s")
        ax.margins(y=0.2)
        ax = axes[1][j]
        for v in names:
            curve = res[v]["reward_curve"]
            w = 5
            smooth = [sum(curve[max(0, i - w + 1):i + 1]) / len(curve[max(0, i - w + 1):i + 1])
                      for i in range(len(curve))]
            ax.plot(smooth, label=v)
        ax.set_title(f"{pipe.upper()}: reward/mean (5-step moving average)")
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="GRPO only, few steps, smaller batch")
    ap.add_argument("--steps", type=int, default=0, help="steps per run (default 60; quick 12)")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats (median reported)")
    ap.add_argument("--pipelines", default="", help="comma list (default grpo,ppo; quick grpo)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--timeout", type=float, default=300, help="per-run timeout (s)")
    args = ap.parse_args(argv)
    args.out = Path(args.out)
    args.steps = args.steps or (12 if args.quick else 60)
    args.pipelines = (args.pipelines or ("grpo" if args.quick else "grpo,ppo")).split(",")
    return args


def run(args: argparse.Namespace) -> dict:
    """Every variant of every pipeline, ``args.repeats`` times interleaved; the results doc."""
    out, steps, pipes = args.out, args.steps, args.pipelines
    out.mkdir(parents=True, exist_ok=True)
    prompts, group, new_tokens = (16, 8, 8) if args.quick else (64, 8, 16)
    workload = [f"prompts={prompts}", f"group_size={group}", f"max_new_tokens={new_tokens}"]
    warmup = 3 if args.quick else 10
    samples = prompts * group
    raw: dict[str, dict[str, list[dict]]] = {p: {v: [] for v in VARIANTS} for p in pipes}
    t0 = time.perf_counter()
    for rep in range(args.repeats):
        for pipe in pipes:
            for v in VARIANTS:
                r = summarize(run_one(pipe, v, workload, steps, out, args.timeout), samples, warmup)
                raw[pipe][v].append(r)
                print(f"[rep {rep}] {pipe:4s} {v:12s} step {r['step_s']:.3f} s  "
                      f"{r['samples_per_s']:7.1f} samples/s  (timing_s/step {r['median_timing_step_s']:.3f})  "
                      f"reward {r['reward_first10']:.3f} -> {r['reward_last10']:.3f}  "
                      f"cpu {r['cpu_cores_used']:.2f} cores  run {r['wall_s']:.0f} s", flush=True)
    results = {p: {v: aggregate(raw[p][v]) for v in VARIANTS} for p in pipes}
    for p in pipes:
        base = results[p]["colocated"]["samples_per_s"]
        for v in VARIANTS:
            results[p][v]["speedup_vs_colocated"] = results[p][v]["samples_per_s"] / base
    goal = {p: {"speedup": results[p]["disagg_s1"]["speedup_vs_colocated"],
                "reward_last10_s1": results[p]["disagg_s1"]["reward_last10"],
                "reward_last10_colocated": results[p]["colocated"]["reward_last10"]} for p in pipes}
    for p in pipes:
        goal[p]["met"] = goal[p]["speedup"] >= 1.3 and \
            goal[p]["reward_last10_s1"] >= goal[p]["reward_last10_colocated"] - 0.02
    return {"nproc": NPROC, "steps": steps, "warmup": warmup, "repeats": args.repeats,
            "workload": {"model": "tiny", "task": "reverse", "prompts": prompts, "group_size": group,
                         "max_new_tokens": new_tokens, "samples_per_step": samples},
            "quick": args.quick, "cpu_count": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", f"{max(1, (os.cpu_count() or 1) // NPROC)} (distflow default)"),
            "definition": "samples/s = prompts*group_size / wall-clock period between metrics.jsonl "
                          "lines over steps [warmup, steps-3]",
            "goal": goal, "total_s": time.perf_counter() - t0, "results": results}


def report(doc: dict, args: argparse.Namespace) -> None:
    """``placement.json``, ``placement.png`` and a Markdown table on stdout."""
    out, results, goal = args.out, doc["results"], doc["goal"]
    (out / "placement.json").write_text(json.dumps(doc, indent=1))
    plot(doc, out / "placement.png")
    print()
    print("| pipeline | placement | step s (wall) | samples/s | vs colocated | median timing_s/step | "
          "gen s | reward first 10 -> last 10 | CPU cores used |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p in results:
        for v in VARIANTS:
            r = results[p][v]
            print(f"| {p.upper()} | {v} | {r['step_s']:.3f} | {r['samples_per_s']:.1f} | "
                  f"{r['speedup_vs_colocated']:.2f}x | {r['median_timing_step_s']:.3f} | "
                  f"{r['stage_timing_s'].get('gen', 0):.3f} | {r['reward_first10']:.3f} -> "
                  f"{r['reward_last10']:.3f} | {r['cpu_cores_used']:.2f} |")
    for p in results:
        g = goal[p]
        print(f"goal ({p}): disagg_s1 {g['speedup']:.2f}x colocated samples/s "
              f"(need >= 1.3x), reward last 10 {g['reward_last10_s1']:.3f} vs "
              f"{g['reward_last10_colocated']:.3f}: {'MET' if g['met'] else 'NOT MET'}")
    print(f"-> {out / 'placement.json'}, {out / 'placement.png'} ({doc['total_s']:.0f} s)")


main = main_of(parse, run, report)


if __name__ == "__main__":
    sys.exit(main())
