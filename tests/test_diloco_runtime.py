"""DiLoCo inside real runs: islands of a trainer group, exact resume, early errors."""
import subprocess
import sys

import pytest

from distflow import checkpoint
from distflow.runtime.metrics import read_metrics
from harness import REPO, assert_golden

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
LM = REPO / "pipelines" / "lm_diloco.py"
STREAMING = ["diloco.mode=streaming", "diloco.islands=2", "diloco.inner_steps=4",
             "diloco.fragments=2", "diloco.overlap_steps=1", "diloco.alpha=0.5",
             "diloco.quantize=e3m0", "batch=8", "seq_len=32", "eval_every=3", "eval_batch=8"]


def _run(pipeline, out, *args):
    return subprocess.run([sys.executable, "-m", "distflow.cli", "run", str(pipeline),
                           "--out", str(out), *args], capture_output=True, text=True, timeout=240)


def test_streaming_resume_continues_the_fragment_schedule_exactly(tmp_path):
    r = _run(LM, tmp_path / "whole", "--steps", "9", *STREAMING)
    assert r.returncode == 0, r.stderr[-3000:]
    whole = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    part = tmp_path / "part"
    # step 4 ends with fragment 1 in flight (offsets 0 and 2, tau = 1)
    assert _run(LM, part, "--steps", "5", *STREAMING).returncode == 0
    files = {p.name for p in (part / "checkpoints" / "step_4" / "train" / "island1").iterdir()}
    assert {"model.safetensors", "optimizer.safetensors", "outer.safetensors"} <= files
    r = _run(LM, part, "--steps", "9", "resume=true", *STREAMING)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = read_metrics(part / "metrics.jsonl")
    for a, b in zip(whole[5:], resumed[5:]):
        for k in ("train/loss", "eval/loss", "diloco/bytes_sent", "diloco/syncs"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5), (a["step"], k)
    assert whole[-1]["diloco/syncs"] >= 3 and whole[-1]["diloco/bytes_sent"] > 0


def test_grpo_trainer_group_with_diloco_islands(tmp_path):
    r = _run(REPO / "pipelines" / "grpo.py", tmp_path, "--steps", "4", "prompts=8",
             "group_size=4", "diloco.mode=diloco", "diloco.islands=2", "diloco.inner_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[-1]["diloco/syncs"] == 2 and rows[-1]["diloco/bytes_sent"] > 0
    assert checkpoint.latest(tmp_path / "checkpoints")[0] == 3


@pytest.mark.parametrize("args,message", [
    (["--nproc", "3", "diloco.mode=diloco", "diloco.islands=2"],
     "diloco.islands=2 does not divide group 'trainer' of 3 ranks"),
    (["diloco.mode=streaming", "diloco.islands=2", "diloco.inner_steps=4",
      "diloco.fragments=2", "diloco.overlap_steps=2"], "overlap_steps (tau=2) must be <"),
    (["diloco.mode=diloco", "diloco.inner_steps=0"], "inner_steps"),
    (["diloco.mode=streaming", "diloco.alpha=1.5"], "alpha"),
])
def test_bad_diloco_settings_fail_before_launch(tmp_path, args, message):
    r = _run(LM, tmp_path, *args)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr and not (tmp_path / "run.json").exists()


def test_lm_diloco_runs_the_same_in_all_three_placements(tmp_path):
    """One key: co-located / interleaved train on every worker; disaggregated streams the
    batches from a data worker to two trainer islands. Same seed, same losses."""
    runs = {}
    for placement in ("colocated", "interleaved", "disaggregated"):
        args = ["--nproc", "3" if placement == "disaggregated" else "2", "--steps", "6",
                f"placement={placement}", *STREAMING]
        r = _run(LM, tmp_path / placement, *args)
        assert r.returncode == 0, (placement, r.stderr[-3000:])
        runs[placement] = read_metrics(tmp_path / placement / "metrics.jsonl")
        assert_golden(f"lm_diloco-{placement}", runs[placement])
    base = runs["colocated"]
    assert base[-1]["diloco/syncs"] >= 1
    for placement in ("interleaved", "disaggregated"):
        for a, b in zip(base, runs[placement]):
            for k in ("train/loss", "eval/loss", "diloco/bytes_sent"):
                if k in a:
                    assert b[k] == pytest.approx(a[k], rel=1e-4), (placement, a["step"], k)
