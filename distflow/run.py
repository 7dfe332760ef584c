"""``python -m distflow.run PIPELINE.py [key=value ...]``: one rank of a distflow run.

Launch with ``torchrun --nproc_per_node=N -m distflow.run PIPELINE.py ...`` (or
``distflow run PIPELINE.py --nproc N``, which wraps ``torchrun --standalone``). Order:
load and validate everything (no sockets yet) -> rendezvous -> run -> close. A failure
prints one line naming the rank and stage and exits non-zero.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import platform
import sys
from importlib.metadata import version
from pathlib import Path

import msgpack
import networkx
import torch
import torch.distributed as dist
import zmq

from distflow.config import parse_overrides, resolve
from distflow.dag import Pipeline
from distflow.memory import configure_allocator
from distflow.runtime.affinity import pin_local_rank
from distflow.runtime.plan import RunPlan, make_plan
from distflow.runtime.progress import ProgressPrinter
from distflow.runtime.rendezvous import (DistEnv, bind_host, exchange_endpoints,
                                         init_collectives, new_process_groups)
from distflow.runtime.worker import Worker
from distflow.transport.peer import Peer

EXIT_CONFIG, EXIT_FAILED = 2, 1


def load_pipeline(path: str) -> Pipeline:
    """Import a pipeline file and return its module-level ``pipeline`` object."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"pipeline file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"distflow_pipeline_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pipeline = getattr(module, "pipeline", None)
    if not isinstance(pipeline, Pipeline):
        raise TypeError(f"{path} must define a module-level `pipeline = Pipeline(...)`")
    return pipeline


def prepare(path: str, args: list[str], world_size: int) -> RunPlan:
    """Everything that can be checked without talking to anyone; raises ValueError."""
    pipeline = load_pipeline(path)
    cfg = resolve(pipeline, parse_overrides(args))
    cfg.out = cfg.out or f"runs/{pipeline.name}"
    return make_plan(pipeline, cfg, world_size)


def _versions() -> dict[str, str]:
    return {"distflow": version("distflow"), "python": platform.python_version(),
            "torch": torch.__version__, "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
            "msgpack": ".".join(map(str, msgpack.version)), "networkx": networkx.__version__}


def _write_run_json(out: Path, path: str, plan: RunPlan, endpoints: dict) -> None:
    pipeline, cfg, placement = plan.pipeline, plan.config, plan.placement
    info = {"pipeline": pipeline.name, "pipeline_file": str(Path(path).resolve()),
            "world_size": placement.world_size, "config": cfg.to_dict(),
            "placement": {"strategy": placement.strategy, "groups": placement.describe(),
                          "stages": {s.name: {"group": s.group, "data_parallel": s.data_parallel}
                                     for s in pipeline.stages}},
            "endpoints": {str(r): e for r, e in endpoints.items()}, "versions": _versions()}
    tmp = out / "run.json.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(out / "run.json")


def _fail(rank: int, stage: str, reason: str, out: Path | None) -> str:
    line = f"distflow: rank {rank} stage {stage or '-'} failed: {' '.join(reason.split())}"
    print(line, file=sys.stderr, flush=True)
    if out is not None:
        (out / "errors").mkdir(parents=True, exist_ok=True)
        (out / "errors" / f"rank{rank}.txt").write_text(line + "\n")
    return line


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else EXIT_CONFIG
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    env = DistEnv.from_environ()
    try:
        plan = prepare(argv[0], argv[1:], env.world_size)
    except (ValueError, TypeError, FileNotFoundError) as e:
        _fail(env.rank, "", f"{type(e).__name__}: {e}", None)
        return EXIT_CONFIG
    out = Path(plan.config.out)
    out.mkdir(parents=True, exist_ok=True)
    configure_allocator(plan.config.memory)
    return _run(argv[0], env, plan, out)


def _run(path: str, env: DistEnv, plan: RunPlan, out: Path) -> int:
    cfg = plan.config
    init_collectives(env)
    process_groups = new_process_groups(plan.placement, plan.islands, plan.sync_ranks)
    peer = Peer(env.rank, env.world_size, bind_host(env.master_addr), cfg.transport)
    worker = None
    try:
        endpoints = exchange_endpoints(env.rank, env.world_size, peer.endpoints)
        peer.connect(endpoints)
        pin_local_rank(env.local_rank)  # CPU runs: each local rank on its own cores
        if env.rank == 0:
            _write_run_json(out, path, plan, endpoints)
        progress = ProgressPrinter(cfg.steps) if env.rank == 0 else None
        worker = Worker(plan, peer, process_groups, on_step=progress and progress.update)
        worker.run()
        if progress:
            progress.close()
    except BaseException as e:  # noqa: BLE001 - every failure must reach the peers
        stage = worker.current_stage if worker else "rendezvous"
        reason = f"{type(e).__name__}: {e}" if not isinstance(e, KeyboardInterrupt) else "interrupted"
        _fail(env.rank, stage, reason, out)
        peer.liveness.update(state="failed", reason=reason[:500])
        peer.close(flush_s=2 * cfg.transport.heartbeat_s, failed=True)
        return EXIT_FAILED
    finally:
        if worker:
            worker.close()
    peer.liveness.update(state="done")
    peer.close(flush_s=cfg.transport.heartbeat_s)
    _destroy_collectives()
    return 0


def _destroy_collectives() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
