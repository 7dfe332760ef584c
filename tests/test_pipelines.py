"""The built-in pipelines, launched the way users launch them."""
import json
import subprocess
import sys

import pytest

from distflow.runtime.metrics import read_metrics
from harness import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)


@pytest.mark.parametrize("extra", [[], ["--nproc", "3", "placement=split", "groups.rollout=policy",
                                        "groups.policy=2", "groups.reward=1"]],
                         ids=["colocated", "split"])
def test_bandit_learns_with_distflow_run(tmp_path, extra):
    r = subprocess.run([sys.executable, "-m", "distflow.cli", "run",
                        str(REPO / "pipelines" / "bandit.py"), "--out", str(tmp_path), *extra],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert len(rows) == 40
    first, last = _mean(rows[:10], "reward/mean"), _mean(rows[-10:], "reward/mean")
    assert last - first >= 0.3, (first, last)
    assert "reward/mean: first 10 steps" in r.stdout
    assert (tmp_path / "metrics.png").stat().st_size > 1000
    assert json.loads((tmp_path / "run.json").read_text())["config"]["steps"] == 40
