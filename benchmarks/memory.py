"""Peak memory per phase and step time, with and without each memory policy.

    python benchmarks/memory.py                  # CPU: resident set size per phase
    python benchmarks/memory.py --device cuda    # GPU: allocated / reserved / fragmentation

Runs ``pipelines/grpo.py`` (co-located, one worker so phases are not mixed across
processes) once per policy setting on the same workload and seed, and reports, per
phase, the largest value seen over the measured steps of ``memory/<phase>/*`` and the
median ``timing_s/step``. On CUDA the default workload is the issue's: a 0.5B-shaped
Qwen2 (random weights), 8 prompts x 8 samples x 256 new tokens.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from distflow.runtime.metrics import read_metrics  # noqa: E402

POLICIES = {
    "none": [],
    "release": ["memory.release=true"],
    "offload": ["memory.offload=true"],
    "release+offload": ["memory.release=true", "memory.offload=true"],
    "expandable_segments": ["memory.expandable_segments=true"],
}


def workload(device: str, quick: bool) -> list[str]:
    if device == "cuda":
        return ["model=qwen2-0.5b", "prompts=8", "group_size=8", "max_new_tokens=256",
                "max_prompt_len=3", "micro_batch_tokens=16384"]
    return ["prompts=16", "group_size=8"] if quick else ["prompts=32", "group_size=8"]


def run(policy: list[str], args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "distflow.cli", "run", str(REPO / "pipelines" / "grpo.py"),
           "--nproc", "1", "--out", str(out), "--steps", str(args.steps),
           *workload(args.device, args.quick), *policy]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"run failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    rows = read_metrics(out / "metrics.jsonl")[args.warmup:]
    phases: dict[str, dict[str, float]] = {}
    for row in rows:
        for k, v in row.items():
            if k.startswith("memory/"):
                _, phase, what = k.split("/")
                phases.setdefault(phase, {})[what] = max(v, phases.get(phase, {}).get(what, 0.0))
    return {"step_s": statistics.median(r["timing_s/step"] for r in rows), "phases": phases,
            "wall_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "memory.json"))
    args = ap.parse_args()
    if args.quick:
        args.steps = 5
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, policy in POLICIES.items():
            if name == "expandable_segments" and args.device == "cpu":
                continue  # a CUDA allocator setting
            results[name] = run(policy, args, Path(tmp) / name)
    base = results["none"]["step_s"]
    metric = "reserved_gb" if args.device == "cuda" else "rss_gb"
    print(f"{'policy':<22}{'step s':>9}{'vs none':>9}  peak {metric} per phase")
    for name, res in results.items():
        per_phase = ", ".join(f"{p}={v.get(metric, 0):.3f}" for p, v in sorted(res["phases"].items()))
        print(f"{name:<22}{res['step_s']:>9.4f}{res['step_s'] / base:>9.3f}  {per_phase}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": args.device, "steps": args.steps,
                                          "workload": workload(args.device, args.quick),
                                          "results": results}, indent=1))


if __name__ == "__main__":
    main()
