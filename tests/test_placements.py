"""Co-located, interleaved and disaggregated placement of the built-in RL pipelines."""
import subprocess
import sys
import time

import pytest

from distflow.runtime.metrics import read_metrics
from harness import REPO, assert_golden, spawn

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
SMALL = ["prompts=8", "group_size=4"]
COMPARED = ("reward/mean", "actor/kl", "actor/pg_loss", "actor/entropy", "actor/grad_norm",
            "response_length/mean", "critic/vf_loss")


def _run(pipeline, out, *args, nproc=4):
    return subprocess.run([sys.executable, "-m", "distflow.cli", "run",
                           str(REPO / "pipelines" / pipeline), "--nproc", str(nproc),
                           "--out", str(out), *SMALL, *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("pipeline", ["grpo.py", "ppo.py"])
def test_same_seed_gives_the_same_metrics_in_all_three_placements(tmp_path, pipeline):
    runs = {}
    for placement in ("colocated", "interleaved", "disaggregated"):
        r = _run(pipeline, tmp_path / placement, "--steps", "3", f"placement={placement}")
        assert r.returncode == 0, (placement, r.stderr[-3000:])
        runs[placement] = read_metrics(tmp_path / placement / "metrics.jsonl")
        assert_golden(f"{pipeline[:-3]}-{placement}", runs[placement])
    base = runs["colocated"]
    for placement in ("interleaved", "disaggregated"):
        for a, b in zip(base, runs[placement]):
            for k in COMPARED:
                if k in a:
                    assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (placement, a["step"], k)
    assert base[-1]["actor/kl"] > 0  # it trained: the placements agree on a moving policy


def test_every_sync_leaves_rollout_weights_bit_identical(tmp_path):
    r = _run("grpo.py", tmp_path, "--steps", "5", "placement=disaggregated",
             "max_staleness=1", "verify_weights=true")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [x["rollout/staleness"] for x in rows] == [0, 1, 1, 1, 1]
    # trainer source = rank 2, rollout ranks 0 and 1; versions 1..3 are taken by rollouts
    for v in (1, 2, 3):
        hashes = {r: (tmp_path / "weights" / f"v{v}.rank{r}.sha256").read_text() for r in (0, 1, 2)}
        assert len(set(hashes.values())) == 1, (v, hashes)
    assert not (tmp_path / "weights" / "v4.rank2.sha256").exists()  # no rollout would take it


def test_trainer_dying_mid_sync_is_an_error_on_every_rollout(tmp_path):
    procs = spawn(REPO / "pipelines" / "grpo.py", 4, tmp_path, "steps=20", *SMALL,
                  "placement=disaggregated", "fault.rank=2", "fault.step=2",
                  "fault.stage=update_actor", "fault.mode=kill",
                  "transport.peer_timeout_s=2", "transport.heartbeat_s=0.2")
    deadline = time.monotonic() + 120
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(p.poll() is not None for p in procs), "a worker hung"
    assert procs[2].returncode == -9
    for r in (0, 1, 3):
        err = procs[r].stderr.read()
        assert procs[r].returncode != 0 and "peer rank 2" in err, err[-2000:]


@pytest.mark.parametrize("args,message", [
    (["--nproc", "2", "placement=interleaved"], "interleaved placement needs >= 3 workers"),
    (["placement=disaggregated", "groups.rollout=2"], "= 4 but WORLD_SIZE is 3"),
    (["placement=disaggregated", "max_staleness=-1"], "max_staleness must be >= 0"),
    (["placement=disaggregated", "max_staleness=2"], "transport.window=2 must exceed max_staleness=2"),
    (["placement=split", "groups.rollout=2", "groups.actor=rollout", "groups.ref=1",
      "groups.reward=1", "--nproc", "4"], None),
    (["placement=split", "groups.rollout=1", "groups.actor=1", "groups.ref=actor",
      "groups.reward=rollout", "--nproc", "2"], None),
])
def test_bad_placements_fail_before_launch(tmp_path, args, message):
    nproc = [] if "--nproc" in args else ["--nproc", "3"]
    r = subprocess.run([sys.executable, "-m", "distflow.cli", "run", str(REPO / "pipelines" / "grpo.py"),
                        "--out", str(tmp_path), "--steps", "1", *SMALL, *nproc, *args],
                       capture_output=True, text=True, timeout=120)
    if message is None:  # valid layouts run
        assert r.returncode == 0, r.stderr[-2000:]
    else:
        assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]


def test_bandit_runs_the_same_in_all_three_placements(tmp_path):
    """The smallest pipeline takes the same one key: same seed, same metrics, and it learns."""
    runs = {}
    for placement, nproc in (("colocated", 2), ("interleaved", 3), ("disaggregated", 4)):
        r = subprocess.run([sys.executable, "-m", "distflow.cli", "run",
                            str(REPO / "pipelines" / "bandit.py"), "--nproc", str(nproc),
                            "--out", str(tmp_path / placement), "--steps", "12",
                            f"placement={placement}"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (placement, r.stderr[-3000:])
        runs[placement] = read_metrics(tmp_path / placement / "metrics.jsonl")
        assert_golden(f"bandit-{placement}", runs[placement])
    base = runs["colocated"]
    assert base[-1]["reward/mean"] > base[0]["reward/mean"] + 0.2
    for placement in ("interleaved", "disaggregated"):
        assert len(runs[placement]) == 12
        for a, b in zip(base, runs[placement]):
            for k in ("reward/mean", "actor/pg_loss"):
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (placement, a["step"], k)


def test_disaggregated_resume_restarts_rollouts_from_the_trainers_weights(tmp_path):
    """On resume the trainer broadcasts its checkpointed weights (WeightSync.resume): the
    resumed run's metrics are those of the uninterrupted one (on-policy: with
    max_staleness=1 the uninterrupted run's step 3 uses version 2, which no checkpoint keeps)."""
    args = ("placement=disaggregated", "max_staleness=0")
    r = _run("grpo.py", tmp_path / "whole", "--steps", "5", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _run("grpo.py", tmp_path / "part", "--steps", "3", *args).returncode == 0
    r = _run("grpo.py", tmp_path / "part", "--steps", "5", "resume=true", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    whole = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    resumed = read_metrics(tmp_path / "part" / "metrics.jsonl")
    assert [x["step"] for x in resumed] == list(range(5))
    for a, b in zip(whole[3:], resumed[3:]):
        for k in COMPARED + ("rollout/staleness",):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
