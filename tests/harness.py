"""Shared harness for multi-process tests: real processes, real sockets, real gloo.

- ``torchrun``: launch a pipeline the way users do (``torchrun --standalone``).
- ``spawn``: launch ranks as plain processes with the environment torchrun would set, but
  no elastic agent, so a dead rank is NOT cleaned up by a launcher: the survivors must
  notice by themselves (the multi-node case, where peers sit on other hosts).
- ``reference``: the same DAG computed in this one process, stage by stage, no sharding.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from distflow.run import load_pipeline
from distflow.runtime.context import StageContext
from distflow.runtime.rendezvous import free_port

REPO = Path(__file__).resolve().parents[1]
PIPELINES = REPO / "tests" / "pipelines"
GOLDEN = REPO / "tests" / "golden"
_NOT_COMPUTED = ("timing_s/", "comm_s/", "memory/", "perf/", "count/bytes_sent")


def assert_golden(name: str, rows: list[dict]) -> None:
    """Every computed metric (not timings, memory or bytes sent) equal, bit for bit, to
    ``tests/golden/NAME.json``: a refactor of how data moves must not change one float.
    Recorded on the 2-core CPU box with torch 2.13.0+cpu; a change meant to alter the
    numerics rewrites them with DISTFLOW_REGEN_GOLDEN=1 (and says so in its commit)."""
    computed = [{k: v for k, v in r.items() if not k.startswith(_NOT_COMPUTED)} for r in rows]
    path = GOLDEN / f"{name}.json"
    if os.environ.get("DISTFLOW_REGEN_GOLDEN") == "1":
        path.write_text(json.dumps(computed, indent=1) + "\n")
    golden = json.loads(path.read_text())
    diffs = [(g.get("step"), k, g.get(k), c.get(k)) for g, c in zip(golden, computed)
             for k in sorted(set(g) | set(c)) if g.get(k) != c.get(k)]
    assert len(computed) == len(golden) and not diffs, (name, "(step, key, golden, now)", diffs[:5])


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(pipeline: str | Path, nproc: int, out: Path, *overrides: str,
             timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "distflow.run", str(pipeline), f"out={out}",
           *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


def spawn(pipeline: str | Path, nproc: int, out: Path, *overrides: str) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "distflow.run", str(pipeline), f"out={out}", *overrides],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float) -> dict[int, float]:
    """When (``time.monotonic()``) each process exited, by index, waiting up to ``timeout``
    seconds for all of them; any still running after that is killed (and absent)."""
    deadline = time.monotonic() + timeout
    exits = {}
    while len(exits) < len(procs) and time.monotonic() < deadline:
        for i, p in enumerate(procs):
            if i not in exits and p.poll() is not None:
                exits[i] = time.monotonic()
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
    return exits


def reference(pipeline_path: str | Path, steps: int, out: Path, **params) -> None:
    """Run the DAG in this process: every stage once per step on the whole batch."""
    pipeline = load_pipeline(str(pipeline_path))
    params = {**pipeline.params, **params}
    models: dict = {}
    for step in range(steps):
        data = {}
        for name in pipeline.order:
            stage = pipeline.stage(name)
            ctx = StageContext(stage=name, rank=0, world_size=1, group=stage.group, ranks=(0,),
                               dp_rank=0, dp_size=1, params=params, seed=0, out_dir=out, step=step,
                               models=models)
            inputs = [data[n] for n in stage.inputs]
            if len(inputs) > 1:
                inputs = [v.sorted() for v in inputs]
            data.update(stage.fn(ctx, *inputs) or {})


def sink_outputs(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{file name: tensors}`` of every sink file a run wrote."""
    return {p.name: load_file(str(p)) for p in sorted(out.glob("sink_step*_rank*.safetensors"))}
