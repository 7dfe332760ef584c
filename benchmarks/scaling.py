"""Scaling benchmark, simulated: distflow's peer-to-peer routing vs a single-controller hub.

For each worker count N it runs ``benchmarks/scaling_pipeline.py`` twice with
``torchrun --standalone --nproc_per_node=N`` on this machine, same pipeline, same
placement (``split``: rollout and train groups of N/2 workers each), same inputs; only
``routing`` differs:

- ``p2p``: distflow's own plan; the only traffic is the rollout -> train re-shard, sent
  directly from each rollout rank to the train ranks that need its samples;
- ``hub``: every edge goes through rank 0 (gather, LPT split, send on), the shape of a
  single-controller driver (verl-style). No artificial delay: it is the same code path
  with a different routing plan.

GPU compute is emulated with ``time.sleep`` sized by the samples (tokens) each rank holds;
data movement is real. Weak scaling: ``batch`` samples per worker, so the global batch is
``batch * N``.

Measurements (per run):

- headline, iterations/s as the wall clock gives it: ``wall_samples_per_s`` = global batch
  x measured steps / the time between the metrics.jsonl lines of the first and last
  measured step, as seen by this process (polled every 20 ms); it includes everything
  between steps. Every measured step's ``count/samples`` (summed over the train ranks)
  must equal the global batch;
- ideal linear scaling two ways: against the emulated compute alone (``eff vs bound``:
  the slower group's per-rank compute, 2 x batch x 8 ms = 0.512 s per step by default at
  every N since the groups overlap; the same ideal for both modes, so a mode that is
  already slow at N0 gets no credit for scaling its slowness) and against the mode's own
  smallest run (``eff vs N0`` = samples/s(N) / (samples/s(N0) x N / N0));
- cross-check from step times: ``step_s`` = the median over the measured steps of
  ``timing_s/step`` (each rank's wall time for the iteration, max over ranks). With the
  groups overlapping, per-rank windows are offset from each other, so the max over ranks
  reads above the true period: the efficiencies computed from it (``efficiency``,
  ``bound_efficiency``) are the conservative ones, printed below the table;
- ``overhead_s``: ``step_s`` minus the sum of the per-stage medians of ``timing_s/<stage>``
  (emulated compute, max over ranks): the time spent moving data and waiting.

Reading the numbers:

- the rollout and train groups overlap: metrics reach rank 0 one step late (no per-step
  barrier), so the rollout group generates step k+1 while the train group trains on
  step k, and a step takes about max(rollout, train) (0.5 s by default) in both modes;
- on a 2-core box all N processes share two cores, so the data work of the p2p mode (per
  rank constant under weak scaling) still adds up to N x that on the same two cores, in a
  burst when the groups hand over; that, not routing, is most of p2p's loss at N=16;
- the hub's rank 0 moves every edge of the whole global batch (in, concatenate, split,
  out), N times p2p's per-rank data; that is the single-controller bottleneck measured.

    python benchmarks/scaling.py                        # N = 2,4,8,16, about 4 min on 2 cores
    python benchmarks/scaling.py --quick --out /tmp/s   # N = 2,4, few steps, < 60 s
    python benchmarks/scaling.py --workers 2,4,8 --steps 20

Writes ``OUT/scaling.json`` and ``OUT/scaling.png`` (default OUT: benchmarks/results). Each
run's directory (metrics.jsonl, run.json, torchrun.log) goes to a temporary folder that is
removed at the end, unless ``--keep-runs DIR`` (kept also when a run fails).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from _common import MetricsWatcher, cpu_model, main_of  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PIPELINE = HERE / "scaling_pipeline.py"
RESULTS = HERE / "results"
MODES = ("p2p", "hub")
STAGES = ("load", "rollout", "reward", "ref_logprob", "advantage", "update")


def run_one(n: int, mode: str, args, run_dir: Path) -> dict:
    """One torchrun of the pipeline; returns its measurements."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    steps = args.warmup + args.steps
    half = n // 2
    overrides = [f"routing={mode}", "placement=split", f"groups.rollout={half}",
                 f"groups.train={n - half}", f"steps={steps}", f"batch={args.batch}",
                 f"seq_len={args.seq_len}", f"rollout_s={args.rollout_s}",
                 f"train_s={args.train_s}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={n}", "-m", "distflow.run", str(PIPELINE), f"out={run_dir}",
           *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    metrics_path = run_dir / "metrics.jsonl"
    watcher = MetricsWatcher(metrics_path)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    watcher.start()
    with open(run_dir / "torchrun.log", "w") as log:
        try:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                 cwd=REPO, timeout=args.run_timeout)
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    watcher.stop()
    if rc != 0:
        tail = (run_dir / "torchrun.log").read_text()[-3000:]
        raise RuntimeError(f"N={n} routing={mode}: torchrun exited with {rc}\n{tail}")
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if [r["step"] for r in rows] != list(range(steps)):
        raise RuntimeError(f"N={n} routing={mode}: metrics.jsonl has steps "
                           f"{[r['step'] for r in rows]}, expected 0..{steps - 1}")
    global_batch = args.batch * n
    measured = rows[args.warmup:]
    bad = [r["step"] for r in measured if int(r.get("count/samples", -1)) != global_batch]
    if bad:
        raise RuntimeError(f"N={n} routing={mode}: steps {bad} did not train on all "
                           f"{global_batch} samples")
    step_times = [r["timing_s/step"] for r in measured]
    step_s = statistics.median(step_times)
    stage_s = {s: statistics.median(r.get(f"timing_s/{s}", 0.0) for r in measured) for s in STAGES}
    comm_s = {s: statistics.median(r.get(f"comm_s/{s}", 0.0) for r in measured) for s in STAGES}
    arrivals = watcher.arrivals
    wall_tp = None
    if len(arrivals) == steps and args.steps >= 2:
        # lines warmup-1 .. steps-1 bracket the measured steps
        span = arrivals[-1] - arrivals[args.warmup - 1] if args.warmup else arrivals[-1] - arrivals[0]
        count = args.steps if args.warmup else args.steps - 1
        wall_tp = global_batch * count / span if span > 0 else None
    return {
        "n": n, "mode": mode, "global_batch": global_batch,
        "step_s": step_s, "samples_per_s": global_batch / step_s,
        "step_s_min": min(step_times), "step_s_max": max(step_times),
        "step_times_s": step_times,
        "wall_samples_per_s": wall_tp,
        "overhead_s": step_s - sum(stage_s.values()),
        "timing_s": stage_s, "comm_s": comm_s,
        "startup_s": (arrivals[0] - t0) if arrivals else None,
        "run_wall_s": wall, "loadavg_1m_before": load_before,
        "loadavg_1m_after": os.getloadavg()[0],
        "command": shlex.join(["python", "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={n}", "-m", "distflow.run",
                               str(PIPELINE.relative_to(REPO)), f"out={run_dir}", *overrides]),
    }


def bound_step_s(n: int, args) -> float:
    """The emulated compute alone: the rollout and train groups (N/2 ranks each) overlap,
    so a perfect runtime's step is the slower group's per-rank time."""
    per_rank = args.batch * n / (n // 2)
    return max(args.rollout_s, args.train_s) * per_rank


def add_efficiency(results: list[dict], args) -> None:
    for r in results:
        r["bound_step_s"] = bound_step_s(r["n"], args)
        r["bound_efficiency"] = r["bound_step_s"] / r["step_s"]
        if r["wall_samples_per_s"]:
            r["wall_bound_efficiency"] = r["wall_samples_per_s"] / (r["global_batch"] / r["bound_step_s"])
    for mode in MODES:
        runs = sorted((r for r in results if r["mode"] == mode), key=lambda r: r["n"])
        if not runs:
            continue
        base = runs[0]
        for r in runs:
            r["efficiency"] = r["samples_per_s"] / (base["samples_per_s"] * r["n"] / base["n"])
            r["efficiency_base_n"] = base["n"]
            if r["wall_samples_per_s"] and base["wall_samples_per_s"]:
                r["wall_efficiency"] = r["wall_samples_per_s"] / (
                    base["wall_samples_per_s"] * r["n"] / base["n"])


def table(results: list[dict], markdown: bool = False) -> str:
    """Per mode: median step (max over ranks), and from the wall clock (metrics.jsonl line
    arrivals) iterations/s and its efficiency against the mode's own N0 and against the
    emulated-compute bound; the step-time based efficiencies are in the JSON."""
    by = {(r["n"], r["mode"]): r for r in results}
    ns = sorted({r["n"] for r in results})
    head = ["N", "global batch"]
    for mode in MODES:
        head += [f"{mode} step s", f"{mode} it/s", f"{mode} samples/s", f"{mode} eff vs N0",
                 f"{mode} eff vs bound"]
    pct = lambda v: f"{100 * v:.1f}%" if v is not None else "-"  # noqa: E731
    lines = []
    for n in ns:
        row = [str(n), str(by[(n, MODES[0])]["global_batch"])]
        for mode in MODES:
            r = by.get((n, mode))
            if r is None:
                row += ["-"] * 5
                continue
            wall = r["wall_samples_per_s"]
            row += [f"{r['step_s']:.3f}", f"{wall / r['global_batch']:.3f}" if wall else "-",
                    f"{wall:.1f}" if wall else "-", pct(r.get("wall_efficiency")),
                    pct(r.get("wall_bound_efficiency"))]
        lines.append(row)
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(out + ["| " + " | ".join(r) + " |" for r in lines])
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in lines])


def step_table(results: list[dict]) -> str:
    """The conservative cross-check: efficiencies from the median timing_s/step."""
    by = {(r["n"], r["mode"]): r for r in results}
    out = []
    for n in sorted({r["n"] for r in results}):
        cells = [f"N={n:>2}"]
        for mode in MODES:
            r = by.get((n, mode))
            if r:
                cells.append(f"{mode}: {100 * r['efficiency']:.1f}% vs N0, "
                             f"{100 * r['bound_efficiency']:.1f}% vs bound")
        out.append("  ".join(cells))
    return "\n".join(out)


def plot(results: list[dict], path: Path, title: str) -> None:
    """Left: wall-clock throughput vs N (log-log) against the emulated-compute bound
    (dashed); right: efficiency vs the bound (solid) and vs the mode's own N0 (dotted)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_eff) = plt.subplots(1, 2, figsize=(10, 4.2))
    ns = sorted({r["n"] for r in results})
    style = {"p2p": ("distflow (routing=p2p)", "o-", "tab:blue"),
             "hub": ("hub baseline (routing=hub)", "s-", "tab:red")}
    tput = lambda r: r.get("wall_samples_per_s") or r["samples_per_s"]  # noqa: E731
    eff_bound = lambda r: r.get("wall_bound_efficiency") or r["bound_efficiency"]  # noqa: E731
    eff_n0 = lambda r: r.get("wall_efficiency") or r["efficiency"]  # noqa: E731
    bound = {r["n"]: r["global_batch"] / r["bound_step_s"] for r in results}
    ax.plot(ns, [bound[n] for n in ns], "--", color="gray", label="ideal: emulated compute only")
    for mode in MODES:
        runs = sorted((r for r in results if r["mode"] == mode), key=lambda r: r["n"])
        label, marker, color = style[mode]
        xs = [r["n"] for r in runs]
        ax.plot(xs, [tput(r) for r in runs], marker, color=color, label=label)
        ax_eff.plot(xs, [100 * eff_bound(r) for r in runs], marker, color=color,
                    label=f"{label}, vs ideal")
        ax_eff.plot(xs, [100 * eff_n0(r) for r in runs], ":", color=color, marker=marker[0],
                    alpha=0.6, label=f"{label}, vs own N={ns[0]}")
        for r in runs:
            ax_eff.annotate(f"{100 * eff_bound(r):.1f}%", (r["n"], 100 * eff_bound(r)),
                            textcoords="offset points", xytext=(0, 7 if mode == "p2p" else -14),
                            ha="center", fontsize=8, color=color)
    ax_eff.axhline(90, color="gray", ls=":", lw=1, label="90% goal")
    for a in (ax, ax_eff):
        a.set_xscale("log", base=2)
        a.set_xticks(ns, [str(n) for n in ns])
        a.set_xlabel("workers N (weak scaling)")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    ax.set_yscale("log", base=2)
    ticks = [bound[n] for n in ns]
    ax.set_yticks(ticks, [f"{t:.0f}" for t in ticks])
    ax.minorticks_off()
    ax.set_ylabel("samples / s (wall clock, steady state)")
    ax_eff.set_ylabel("scaling efficiency (%)")
    lo = min(100 * min(eff_bound(r), eff_n0(r)) for r in results)
    ax_eff.set_ylim(min(lo - 8, 60), 105)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="2,4,8,16", help="worker counts (even), comma-separated")
    p.add_argument("--steps", type=int, default=12, help="measured steps per run (after warm-up)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps per run, not measured")
    p.add_argument("--batch", type=int, default=32, help="samples per worker per step")
    p.add_argument("--seq-len", type=int, default=4096,
                   help="max response tokens (rows are padded to it; 48 KiB/sample at 4096)")
    p.add_argument("--rollout-s", type=float, default=0.008, help="emulated rollout s per sample")
    p.add_argument("--train-s", type=float, default=0.008,
                   help="emulated train-side s per sample (reward+ref+update)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: N=2,4, 2+4 steps, batch 16 (< 60 s)")
    p.add_argument("--run-timeout", type=float, default=300.0, help="seconds per torchrun")
    p.add_argument("--out", default=str(RESULTS), help="results directory")
    p.add_argument("--keep-runs", default="", help="keep each run's directory under this folder")
    args = p.parse_args(argv)
    if args.quick:
        args.workers, args.steps, args.warmup, args.batch = "2,4", 4, 2, 16
    args.worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    if any(w < 2 or w % 2 for w in args.worker_counts):
        p.error("--workers must be even numbers >= 2 (rollout and train get N/2 each)")
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    args.out = Path(args.out)
    args.command = shlex.join(["python", "benchmarks/scaling.py", *(sys.argv[1:] if argv is None else argv)])
    return args


def run(args: argparse.Namespace) -> dict:
    """Both modes at every worker count (alternating order); ``{**meta, "results": [...]}``."""
    workers = args.worker_counts
    runs_dir = Path(args.keep_runs or tempfile.mkdtemp(prefix="distflow-scaling-"))
    started = time.perf_counter()
    results = []
    for i, n in enumerate(workers):
        order = MODES if i % 2 == 0 else MODES[::-1]  # alternate, so drift hits both modes
        for mode in order:
            try:
                r = run_one(n, mode, args, runs_dir / f"n{n}-{mode}")
            except RuntimeError as e:
                raise SystemExit(f"scaling: {e}\n(run directories kept in {runs_dir})") from None
            results.append(r)
            print(f"N={n:>2} {mode}: step {r['step_s']:.3f} s (min {r['step_s_min']:.3f}, "
                  f"max {r['step_s_max']:.3f}), {r['samples_per_s']:.1f} samples/s, overhead "
                  f"{r['overhead_s']:.3f} s, start-up {r['startup_s'] or float('nan'):.1f} s, "
                  f"load avg {r['loadavg_1m_before']:.1f}", flush=True)
    if not args.keep_runs:
        shutil.rmtree(runs_dir, ignore_errors=True)
    add_efficiency(results, args)
    total = time.perf_counter() - started
    return {
        "benchmark": "scaling", "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "command": args.command,
        "workers": workers, "warmup_steps": args.warmup, "measured_steps": args.steps,
        "params": {"batch_per_worker": args.batch, "seq_len": args.seq_len,
                   "rollout_s": args.rollout_s, "train_s": args.train_s, "group_size": 4,
                   "placement": "split, groups.rollout=N/2 groups.train=N/2"},
        "definitions": {
            "step_s": "median of timing_s/step (max over ranks) over the measured steps",
            "samples_per_s": "global_batch / step_s, global_batch = batch_per_worker * N",
            "efficiency": "samples_per_s(N) / (samples_per_s(N0) * N / N0), N0 = smallest N, per mode",
            "wall_samples_per_s": "global_batch * measured steps / time between metrics.jsonl lines",
            "wall_efficiency": "efficiency computed from wall_samples_per_s",
            "overhead_s": "step_s - sum over stages of median timing_s/<stage>",
            "wall_bound_efficiency": "wall_samples_per_s / (global_batch / bound_step_s)",
            "bound_efficiency": "bound_step_s / step_s, bound_step_s = the emulated compute of "
                                "the slower group per rank (the groups overlap): an absolute "
                                "ideal shared by both modes",
        },
        "total_wall_s": total, "results": results}


def report(doc: dict, args: argparse.Namespace) -> None:
    """Tables on stdout, ``scaling.json`` and ``scaling.png`` in ``--out``."""
    results, out = doc["results"], args.out
    out.mkdir(parents=True, exist_ok=True)
    print()
    print(table(results))
    print(f"\nit/s, samples/s: wall clock over the {args.steps} measured steps (after "
          f"{args.warmup} warm-up); eff vs N0 = samples/s(N) / (samples/s(N0) * N/N0); eff vs "
          f"bound = samples/s / (global batch / emulated compute step of "
          f"{bound_step_s(doc['workers'][0], args):.3f} s); step s = median timing_s/step (max over "
          f"ranks); total {doc['total_wall_s']:.0f} s")
    print("from step s instead (conservative: per-rank windows are offset):")
    print(step_table(results))
    (out / "scaling.json").write_text(json.dumps(doc, indent=2))
    plot(results, out / "scaling.png",
         f"weak scaling, {args.batch} samples/worker, seq_len {args.seq_len}, "
         f"{os.cpu_count()}-core CPU, compute emulated")
    print(f"wrote {out / 'scaling.json'}, {out / 'scaling.png'}")
    print("\nmarkdown:\n" + table(results, markdown=True))


main = main_of(parse, run, report)


if __name__ == "__main__":
    sys.exit(main())
