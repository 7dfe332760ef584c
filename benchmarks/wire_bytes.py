"""Bytes on the wire per step: GRPO and PPO in the three placements, 4 workers.

    python benchmarks/wire_bytes.py                          # this tree
    python benchmarks/wire_bytes.py --tree /tmp/old-distflow # another checkout, for before/after

Each variant is one ``distflow run PIPELINE --nproc 4 --steps S [--set key=value ...]``
(default workload of the pipeline: ``prompts=32 group_size=8 max_new_tokens=3``). The worker sums the tensor bytes every rank sends
to another rank on the data plane (``count/bytes_sent``, and per label: the edge or datum
the message carries); the figure is the mean over the run's steps of the sum over ranks.
Sends to itself, the per-step cost exchange of re-sharding (a few ints) and the weight
sync broadcast (torch.distributed) are not counted. The numbers are deterministic: the
same workload sends the same bytes on any machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_state, main_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PLACEMENTS = ("colocated", "interleaved", "disaggregated")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", type=Path, default=ROOT, help="checkout whose distflow runs")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--pipelines", nargs="+", default=["grpo", "ppo"])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra config for every run, e.g. max_new_tokens=32")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return ap.parse_args(argv)


def run_one(tree: Path, pipeline: str, placement: str, steps: int, extra: list[str]) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as out:
        r = subprocess.run([sys.executable, "-m", "distflow.cli", "run", str(tree / "pipelines" / f"{pipeline}.py"),
                            "--nproc", "4", "--steps", str(steps), "--out", out, f"placement={placement}", *extra],
                           capture_output=True, text=True, env=env, cwd=tree, timeout=600)
        if r.returncode:
            raise RuntimeError(f"{pipeline} {placement}: {r.stderr[-2000:]}")
        rows = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    keys = sorted({k for row in rows for k in row if k.startswith("count/bytes_sent")})
    return {k: sum(row.get(k, 0.0) for row in rows) / len(rows) for k in keys}


def run(args: argparse.Namespace) -> dict:
    results = {p: {pl: run_one(args.tree, p, pl, args.steps, args.set) for pl in PLACEMENTS}
               for p in args.pipelines}
    return {"tree": str(args.tree), "git": git_state(), "steps": args.steps, "set": args.set,
            "results": results}


def report(res: dict, args: argparse.Namespace) -> None:
    """A table of bytes per step on stdout (and the JSON in ``--out``)."""
    lines = [f"tree {res['tree']}, {res['steps']} steps, {' '.join(res['set'])}, bytes per step (sum over ranks)"]
    for pipeline, by_placement in res["results"].items():
        for placement, counts in by_placement.items():
            total = counts.get("count/bytes_sent", 0.0)
            lines.append(f"{pipeline:5s} {placement:14s} total {total / 1024:10.1f} KiB")
            for k, v in counts.items():
                if k != "count/bytes_sent":
                    lines.append(f"{'':21s}{k[len('count/bytes_sent/'):]:34s} {v / 1024:10.1f} KiB")
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))


main = main_of(parse, run, report)


if __name__ == "__main__":
    sys.exit(main())
