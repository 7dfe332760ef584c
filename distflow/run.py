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
import os
import platform
import sys
import time
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
from distflow.runtime.faults import SignalWatch, Terminated, dump_stacks, signal_name
from distflow.runtime.plan import RunPlan, make_plan
from distflow.runtime.progress import ProgressPrinter
from distflow.runtime.rendezvous import (DistEnv, bind_host, exchange_endpoints, forget_secret,
                                         init_collectives, new_process_groups, run_secret)
from distflow.runtime.worker import Worker
from distflow.transport.liveness import PeerFailure
from distflow.transport.peer import Peer

EXIT_CONFIG, EXIT_FAILED = 2, 1


def builtin_pipelines() -> dict[str, Path]:
    """The pipelines shipped with the package (``distflow.pipelines``, the checkout's
    top-level ``pipelines/``): name -> file."""
    dirs = []
    spec = importlib.util.find_spec("distflow.pipelines")
    if spec is not None and spec.submodule_search_locations:
        dirs += [Path(d) for d in spec.submodule_search_locations]
    dirs.append(Path(__file__).resolve().parents[1] / "pipelines")  # a checkout, not reinstalled
    found: dict[str, Path] = {}
    for d in dirs:
        for f in sorted(d.glob("*.py")) if d.is_dir() else []:
            if not f.name.startswith("_"):
                found.setdefault(f.stem, f)
    return found


def resolve_pipeline_path(path: str) -> Path:
    """``path`` when it is a file, else a built-in pipeline's name (``grpo``, ``sft``, ...)."""
    file = Path(path)
    if file.is_file():
        return file
    builtin = builtin_pipelines()
    name = path[:-3] if path.endswith(".py") else path
    if "/" not in path and name in builtin:
        return builtin[name]
    raise FileNotFoundError(f"pipeline file {path!r} does not exist and is not a built-in "
                            f"pipeline ({', '.join(sorted(builtin))})")


def load_pipeline(path: str) -> Pipeline:
    """Import a pipeline file (or a built-in pipeline by name) and return its
    module-level ``pipeline`` object."""
    file = resolve_pipeline_path(path)
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
    plan = make_plan(pipeline, cfg, world_size)
    if cfg.transport.secret_file:
        configured_secret(cfg.transport)  # readable and private, before any socket opens
    return plan


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
    tmp.unlink(missing_ok=True)
    # owner-only: it lists every endpoint of the data plane
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
        fh.write(json.dumps(info, indent=2))
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
    _archive_errors(out, env.rank)
    configure_allocator(plan.config.memory)
    return _run(argv[0], env, plan, out)


def _run(path: str, env: DistEnv, plan: RunPlan, out: Path) -> int:
    cfg = plan.config
    state = {"worker": None, "peer": None}
    stage_of = lambda: state["worker"].current_stage if state["worker"] else "rendezvous"  # noqa: E731
    watch = SignalWatch(out, env.rank, grace_s=_signal_grace_s(cfg),
                        on_stuck=lambda signum: _exit_stuck(env.rank, stage_of(), signum,
                                                            state["peer"], cfg, out))
    peer = None
    try:
        process_groups = _setup_collectives(env, plan)
        # the secret may come through the store (bare torchrun without DISTFLOW_SECRET)
        peer = state["peer"] = Peer(env.rank, env.world_size, bind_host(env.master_addr),
                                    cfg.transport, secret=run_secret(cfg.transport, env))
        peer.liveness.on_failure = lambda why: dump_stacks(out, env.rank, f"peer failure: {why}")
        endpoints = exchange_endpoints(env.rank, env.world_size, peer.endpoints)
        forget_secret(env)
        peer.connect(endpoints)
        pin_local_rank(env.local_rank)  # CPU runs: each local rank on its own cores
        if env.rank == 0:
            _write_run_json(out, path, plan, endpoints)
        progress = state["progress"] = ProgressPrinter(cfg.steps) if env.rank == 0 else None
        state["worker"] = Worker(plan, peer, process_groups, on_step=progress and progress.update)
        state["worker"].run()
        if progress:
            progress.close()
    except BaseException as e:  # noqa: BLE001 - every failure must reach the peers
        watch.handled.set()
        if state.get("progress"):
            state["progress"].close()  # the failure line starts a line of its own
        stage = stage_of()
        reason = _failure_reason(e, stage, peer, cfg)
        dump_stacks(out, env.rank, f"failed in stage {stage}: {reason}", e)
        _fail(env.rank, stage, reason, out)
        if peer is not None:
            peer.liveness.update(state="failed", reason=reason[:500])
            peer.close(flush_s=2 * cfg.transport.heartbeat_s, failed=True)
        return EXIT_FAILED
    finally:
        if state["worker"]:
            state["worker"].close()
    watch.close()
    peer.liveness.update(state="done")
    peer.close(flush_s=cfg.transport.heartbeat_s)
    _destroy_collectives()
    return 0


def _archive_errors(out: Path, rank: int) -> None:
    """After a restart, this rank's errors of the previous attempt move to errors/attempt<k>/."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    old = [p for p in (out / "errors").glob(f"rank{rank}.*") if p.suffix in (".txt", ".stack")]
    if attempt and old:
        (out / "errors" / f"attempt{attempt - 1}").mkdir(parents=True, exist_ok=True)
        for p in old:
            p.replace(out / "errors" / f"attempt{attempt - 1}" / p.name)


def _setup_collectives(env: DistEnv, plan: RunPlan) -> dict:
    """gloo groups (inside the caller's error handling: a failed rendezvous is reported)."""
    init_collectives(env)
    return new_process_groups(plan.placement, plan.islands, plan.sync_ranks)


def _signal_grace_s(cfg) -> float:
    """How long the main thread may take to act on SIGTERM before the watcher does."""
    return min(5.0, cfg.transport.peer_timeout_s / 2)


def _peer_cause(peer, wait_s: float) -> str | None:
    """The failure of a peer this rank knows of, waiting up to ``wait_s`` for one: a
    launcher SIGTERMs the survivors as soon as one worker dies, usually before they
    have noticed which one."""
    if peer is None:
        return None
    deadline = time.monotonic() + wait_s
    while peer.liveness.failure is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return peer.liveness.failure


def _failure_reason(e: BaseException, stage: str, peer, cfg) -> str:
    if isinstance(e, (Terminated, KeyboardInterrupt)):
        what = str(e) if isinstance(e, Terminated) else "interrupted (SIGINT)"
        cause = _peer_cause(peer, min(2.0, cfg.transport.peer_timeout_s))
        return f"PeerFailure: {cause} (then {what})" if cause else what
    if isinstance(e, PeerFailure):
        return f"PeerFailure: {peer.liveness.failure or e}"  # the best-known root cause
    reason = f"{type(e).__name__}: {e}"
    if stage == "rendezvous":
        cause = _peer_cause(peer, 0.0)
        reason += (f"; caused by {cause}" if cause else
                   " (could not set up the gloo groups or exchange endpoints with the other "
                   "ranks of this attempt: one of them exited or is unreachable)")
    return reason


def _exit_stuck(rank: int, stage: str, signum: int, peer, cfg, out: Path) -> None:
    """The watcher thread's way out when the main thread cannot take a stop signal."""
    cause = peer.liveness.failure if peer is not None else None
    what = f"terminated by {signal_name(signum)} while stuck in stage {stage}"
    reason = f"PeerFailure: {cause} (then {what})" if cause else what
    _fail(rank, stage, reason, out)
    if peer is not None:
        peer.liveness.update(state="failed", reason=reason[:500])
    time.sleep(2 * cfg.transport.heartbeat_s)
    os._exit(EXIT_FAILED)


def _destroy_collectives() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
