"""Data-parallel sum of a CPU tensor: distflow's ``PeerAllReduce`` vs gloo's all-reduce.

Two (``--ranks``) real processes on this machine, each with a real distflow ``Peer`` (its
ZeroMQ sockets; a Unix socket between local peers) and a gloo process group, sum one
float32 tensor per call. Between calls each rank computes for ``--compute-ms`` (matrix
products, one thread), as a trainer does between two gradient all-reduces; with 0 the
calls run back to back. Both systems run in the same processes, alternating in blocks of
``--block`` calls, so the box's noise hits both alike. Reported per size and compute
setting: the median, 90th percentile and mean time of one call as seen by rank 0 (the
time a trainer waits in it), and gloo / distflow of the mean.

    python benchmarks/allreduce.py                                  # about 1 min
    python benchmarks/allreduce.py --sizes 300K,4M --compute-ms 0,15 --calls 200

Writes ``benchmarks/results/allreduce.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import secrets
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import cpu_model, git_state  # noqa: E402


def parse_size(s: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20}
    return int(float(s[:-1]) * units[s[-1].upper()]) if s[-1].upper() in units else int(s)


def _rank(rank: int, world: int, init_file: str, results, args) -> None:
    from distflow.config import TransportConfig
    from distflow.runtime.collective import PeerAllReduce
    from distflow.transport.peer import Peer

    torch.set_num_threads(1)
    if args["pin"]:
        os.sched_setaffinity(0, {rank % os.cpu_count()})
    peer = Peer(rank, world, "127.0.0.1", TransportConfig())
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    # endpoints through gloo itself (a tiny all-gather of JSON), then the mesh
    eps = [None] * world
    dist.all_gather_object(eps, peer.endpoints)
    peer.connect(dict(enumerate(eps)))
    red = PeerAllReduce(peer, tuple(range(world)), 1 << 40)
    a = torch.randn(128, 128)
    out = {}
    try:
        for size in args["sizes"]:
            x = torch.randn(size // 4)
            for compute_ms in args["compute_ms"]:
                times = {"distflow": [], "gloo": []}
                for block in range(2 * args["calls"] // args["block"]):
                    system = ("distflow", "gloo")[block % 2]
                    dist.barrier()
                    for _ in range(args["block"]):
                        t = time.perf_counter()
                        while time.perf_counter() - t < compute_ms / 1000:
                            a @ a
                        t = time.perf_counter()
                        if system == "gloo":
                            y = x.clone()
                            dist.all_reduce(y)
                        else:
                            y = red.sum(x)
                        times[system].append(time.perf_counter() - t)
                if rank == 0:
                    out[f"{size}/{compute_ms}"] = times
    finally:
        dist.barrier()
        peer.liveness.update(state="done")
        peer.close()
        dist.destroy_process_group()
    if rank == 0:
        results.put(out)


def summary(xs: list[float]) -> dict:
    xs = sorted(x * 1000 for x in xs)
    n = len(xs)
    return {"p50_ms": xs[n // 2], "p90_ms": xs[9 * n // 10], "mean_ms": statistics.mean(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--sizes", default="300K,1M,4M,16M")
    ap.add_argument("--compute-ms", default="0,15")
    ap.add_argument("--calls", type=int, default=300, help="calls per system, size and setting")
    ap.add_argument("--block", type=int, default=20)
    ap.add_argument("--no-pin", action="store_true", help="do not pin rank r to core r")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    args = ap.parse_args()
    spec = {"sizes": [parse_size(s) for s in args.sizes.split(",")],
            "compute_ms": [float(c) for c in args.compute_ms.split(",")],
            "calls": args.calls, "block": args.block, "pin": not args.no_pin}
    os.environ.setdefault("DISTFLOW_SECRET", secrets.token_hex(32))  # the Peers' shared secret
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init_file = Path(args.out_dir) / f".allreduce-init-{os.getpid()}"
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    t0 = time.time()
    procs = [ctx.Process(target=_rank, args=(r, args.ranks, str(init_file), results, spec))
             for r in range(args.ranks)]
    for p in procs:
        p.start()
    raw = results.get(timeout=1800)
    for p in procs:
        p.join(60)
    init_file.unlink(missing_ok=True)
    rows = []
    print(f"{args.ranks} ranks, {args.calls} calls per cell, pinned={spec['pin']}; times of one call on rank 0")
    print("| size | compute between calls | distflow p50 / p90 / mean ms | gloo p50 / p90 / mean ms | gloo/distflow (mean) |")
    print("|---|---|---|---|---|")
    for key, times in raw.items():
        size, compute_ms = key.split("/")
        d, g = summary(times["distflow"]), summary(times["gloo"])
        ratio = g["mean_ms"] / d["mean_ms"]
        rows.append({"bytes": int(size), "compute_ms": float(compute_ms), "distflow": d, "gloo": g,
                     "gloo_over_distflow_mean": ratio})
        print(f"| {int(size) / 1024:.0f} KiB | {compute_ms} ms | {d['p50_ms']:.2f} / {d['p90_ms']:.2f} / "
              f"{d['mean_ms']:.2f} | {g['p50_ms']:.2f} / {g['p90_ms']:.2f} / {g['mean_ms']:.2f} | {ratio:.2f} |")
    out = Path(args.out_dir) / "allreduce.json"
    out.write_text(json.dumps({
        "benchmark": "allreduce", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "command": "python benchmarks/allreduce.py " + " ".join(sys.argv[1:]), "git": git_state(),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_1m_before": load, "loadavg_1m_after": os.getloadavg()[0]},
        "params": {**spec, "ranks": args.ranks}, "rows": rows, "wall_s": time.time() - t0}, indent=2))
    print(f"-> {out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
