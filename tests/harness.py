"""Shared harness for multi-process tests: real processes, real sockets, real gloo.

- ``torchrun``: launch a pipeline the way users do (``torchrun --standalone``).
- ``spawn``: launch ranks as plain processes with the environment torchrun would set, but
  no elastic agent, so a dead rank is NOT cleaned up by a launcher: the survivors must
  notice by themselves (the multi-node case, where peers sit on other hosts).
- ``reference``: the same DAG computed in this one process, stage by stage, no sharding.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from distflow.run import load_pipeline
from distflow.runtime.context import StageContext

REPO = Path(__file__).resolve().parents[1]
PIPELINES = REPO / "tests" / "pipelines"


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(pipeline: str | Path, nproc: int, out: Path, *overrides: str,
             timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "distflow.run", str(pipeline), f"out={out}",
           *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def reference(pipeline_path: str | Path, steps: int, out: Path, **params) -> None:
    """Run the DAG in this process: every stage once per step on the whole batch."""
    pipeline = load_pipeline(str(pipeline_path))
    params = {**pipeline.params, **params}
    for step in range(steps):
        data = {}
        for name in pipeline.order:
            stage = pipeline.stage(name)
            ctx = StageContext(name, 0, 1, stage.group, (0,), 0, 1, params, 0, out, step=step)
            inputs = [data[n] for n in stage.inputs]
            if len(inputs) > 1:
                inputs = [v.sorted() for v in inputs]
            data.update(stage.fn(ctx, *inputs) or {})


def sink_outputs(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{file name: tensors}`` of every sink file a run wrote."""
    return {p.name: load_file(str(p)) for p in sorted(out.glob("sink_step*_rank*.safetensors"))}
