"""Atomic checkpoints and exact resume."""
import subprocess
import sys

import pytest
import torch

from distflow import checkpoint
from distflow.runtime.metrics import read_metrics
from harness import REPO

pytestmark = pytest.mark.timeout(300)
SMALL = ["prompts=8", "group_size=4"]


def _run(out, *args):
    r = subprocess.run([sys.executable, "-m", "distflow.cli", "run",
                        str(REPO / "pipelines" / "grpo.py"), "--out", str(out), *SMALL, *args],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return read_metrics(out / "metrics.jsonl")


def test_optimizer_state_round_trips_without_pickle(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    checkpoint.save_optimizer(opt, tmp_path)
    fresh = torch.optim.AdamW(model.parameters(), lr=0.5)
    checkpoint.load_optimizer(fresh, tmp_path)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for idx in a["state"]:
        for k, v in a["state"][idx].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][idx][k])), k
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))


def test_crash_during_a_write_leaves_the_previous_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    (checkpoint.staging(root, 1) / "w.txt").write_text("step 1")
    checkpoint.commit(root, 1)
    partial = checkpoint.staging(root, 2)
    (partial / "w.txt").write_text("half-writ")  # ... and the process dies before commit
    step, path = checkpoint.latest(root)
    assert step == 1 and (path / "w.txt").read_text() == "step 1"
    (checkpoint.staging(root, 2) / "w.txt").write_text("step 2")  # a retry starts clean
    checkpoint.commit(root, 2)
    assert checkpoint.latest(root)[0] == 2 and not (root / "step_2.tmp").exists()


def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(tmp_path):
    whole = _run(tmp_path / "whole", "--steps", "6")
    part = tmp_path / "part"
    _run(part, "--steps", "3")
    assert checkpoint.latest(part / "checkpoints")[0] == 2
    resumed = _run(part, "--steps", "6", "resume=true")
    assert [r["step"] for r in resumed] == list(range(6))
    for a, b in zip(whole[3:], resumed[3:]):
        for k in a:
            if k.startswith(("timing_s/", "comm_s/", "perf/", "memory/")):
                continue
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
    assert whole[3]["actor/kl"] > 0  # the steps after the resume point really trained
    saved = sorted(p.name for p in (part / "checkpoints").iterdir())
    assert saved == ["step_2", "step_5"]
    files = {p.name for p in (part / "checkpoints" / "step_5" / "update_actor").iterdir()}
    assert files == {"model.safetensors", "optimizer.safetensors", "optimizer.json",
                     "config.json", "char_tokenizer.json"}  # the last two: for `distflow export`
