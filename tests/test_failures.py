"""Failure handling with real processes: a dead peer, a raising stage (hostile input:
test_security.py).

Ranks are started as plain processes (``harness.spawn``), not under torchrun, whose agent
would kill the survivors itself: here the runtime alone must notice and stop them.
"""
import subprocess
import sys
import time

import pytest

from harness import PIPELINES, spawn, wait_all

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
PEER_TIMEOUT = 2.0
# detection <= peer timeout + a heartbeat; the rest is slack for a loaded 2-core machine
BOUND = PEER_TIMEOUT + 10.0


def test_killed_worker_fails_every_survivor_in_bounded_time_naming_it(tmp_path):
    procs = spawn(PIPELINES / "linear.py", 3, tmp_path, "steps=50", "delay_s=0.05",
                  "placement=split", "groups.a=1", "groups.b=2", "fault.rank=2",
                  "fault.step=3", "fault.mode=kill",
                  f"transport.peer_timeout_s={PEER_TIMEOUT}", "transport.heartbeat_s=0.2")
    exits = wait_all(procs, 90)
    assert set(exits) == {0, 1, 2}, "a survivor hung"
    assert procs[2].returncode == -9
    for r in (0, 1):
        err = procs[r].stderr.read()
        assert procs[r].returncode != 0
        assert exits[r] - exits[2] < BOUND, f"rank {r} took {exits[r] - exits[2]:.1f} s"
        assert f"distflow: rank {r} stage" in err and "peer rank 2" in err, err[-2000:]
        assert ("presumed dead" in err or "died: its connection closed" in err)
        assert "peer rank 2" in (tmp_path / "errors" / f"rank{r}.txt").read_text()


def test_raising_stage_stops_all_ranks_with_its_reason(tmp_path):
    procs = spawn(PIPELINES / "linear.py", 3, tmp_path, "steps=50", "delay_s=0.02",
                  "placement=split", "groups.a=1", "groups.b=2", "fault.rank=1",
                  "fault.step=2", "fault.stage=tokens", "fault.mode=raise",
                  f"transport.peer_timeout_s={PEER_TIMEOUT}", "transport.heartbeat_s=0.2")
    exits = wait_all(procs, 90)
    assert set(exits) == {0, 1, 2}
    errs = [p.stderr.read() for p in procs]
    assert all(p.returncode == 1 for p in procs), [p.returncode for p in procs]
    assert "rank 1 stage tokens failed" in errs[1] and "injected fault" in errs[1]
    for r in (0, 2):  # survivors report the root cause, not just "a peer died"
        assert "peer rank 1 (stage tokens, step 2) failed" in errs[r], errs[r][-2000:]
        assert "injected fault" in errs[r]


def test_distflow_run_prints_one_line_root_cause(tmp_path):
    r = subprocess.run([sys.executable, "-m", "distflow.cli", "run", str(PIPELINES / "linear.py"),
                        "--nproc", "3", "--out", str(tmp_path), "--steps", "5",
                        "placement=split", "groups.a=1", "groups.b=2", "fault.rank=1",
                        "fault.step=1", "fault.stage=tokens", "fault.mode=raise"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("distflow run failed: distflow: rank 1 stage tokens failed"), last


def test_bad_config_fails_before_any_worker_starts(tmp_path):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "distflow.cli", "run", str(PIPELINES / "linear.py"),
                        "--nproc", "4", "--out", str(tmp_path), "placement=split",
                        "groups.a=1", "groups.b=2"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "group sizes a=1 + b=2 = 3 but WORLD_SIZE is 4" in r.stderr
    assert "torch.distributed" not in r.stderr and not (tmp_path / "run.json").exists()
    assert time.monotonic() - t0 < 30
