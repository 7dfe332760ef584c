"""``distflow plan`` and per-phase memory accounting."""
import subprocess
import sys

import pytest
import torch

from distflow.memory import MemoryConfig, MemoryPolicy, configure_allocator
from distflow.placement import plan_placement
from distflow.plan import concurrent_stages, models_per_rank
from distflow.run import load_pipeline
from harness import REPO

PPO = REPO / "pipelines" / "ppo.py"


def test_plan_models_and_concurrency_per_placement():
    pipeline = load_pipeline(str(PPO))
    inter = plan_placement(pipeline, 4, "interleaved")
    assert {frozenset(p) for p in concurrent_stages(pipeline, inter)} == {
        frozenset(("reward", "ref")), frozenset(("reward", "values")), frozenset(("ref", "values"))}
    held = models_per_rank(pipeline, inter)
    assert held[1] == {"reference": "infer"} and held[2] == {"policy": "train", "critic": "train"}
    disagg = models_per_rank(pipeline, plan_placement(pipeline, 4, "disaggregated"))
    assert disagg[0] == {"policy": "infer"} and disagg[3]["policy"] == "train"
    colo = plan_placement(pipeline, 4, "colocated")
    assert concurrent_stages(pipeline, colo) == []


@pytest.mark.timeout(60)
def test_plan_command_prints_every_placement():
    r = subprocess.run([sys.executable, "-m", "distflow.cli", "plan", str(PPO), "--nproc", "4"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for strategy in ("colocated", "interleaved", "disaggregated"):
        assert f"== {strategy}" in r.stdout
    assert "reward || ref" in r.stdout and "GiB weights+optimizer" in r.stdout
    r = subprocess.run([sys.executable, "-m", "distflow.cli", "plan", str(PPO), "--nproc", "2"],
                       capture_output=True, text=True, timeout=60)
    assert "interleaved placement needs >= 3 workers" in r.stdout


def test_memory_phase_metrics_on_this_device():
    policy = MemoryPolicy(MemoryConfig(release=True))
    before = policy.measure("x")
    big = torch.ones(64, 1 << 20)  # 256 MiB touched
    after = policy.measure("x")
    key = "memory/x/allocated_gb" if torch.cuda.is_available() else "memory/x/rss_gb"
    assert after[key] - before[key] > 0.2
    del big


def test_expandable_segments_sets_the_allocator(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    configure_allocator(MemoryConfig(expandable_segments=True))
    import os
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_moves_a_model_to_pinned_cpu_and_back():
    from distflow.memory import offload_module, onload_module
    m = torch.nn.Linear(1024, 1024).cuda()
    offload_module(m)
    assert m.weight.device.type == "cpu" and m.weight.is_pinned()
    onload_module(m, torch.device("cuda"))
    assert m.weight.device.type == "cuda"
