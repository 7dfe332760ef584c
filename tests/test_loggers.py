"""logger=tensorboard|wandb: rank 0's metrics reach the logger's own files."""
from __future__ import annotations

import json

import pytest

from distflow.config import ConfigError, resolve
from distflow.run import load_pipeline
from distflow.runtime.metrics import MetricsLog

from harness import PIPELINES


def test_tensorboard_event_files_hold_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")  # in the dev extra: this test runs in CI
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    log = MetricsLog(tmp_path / "metrics.jsonl", "tensorboard")
    for step in range(3):
        log.write(step, {"reward/mean": 0.5 * step, "timing_s/step": 1.0})
    log.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("reward/mean")] == [(0, 0.0), (1, 0.5), (2, 1.0)]
    assert len(open(tmp_path / "metrics.jsonl").readlines()) == 3


def test_no_logger_writes_only_metrics_jsonl(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write(0, {"a": 1.0})
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 0, "a": 1.0}


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    log = MetricsLog(tmp_path / "metrics.jsonl", "wandb", "linear", {"seed": 0})
    log.write(0, {"reward/mean": 0.25})
    log.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_unknown_logger_is_a_config_error():
    pipeline = load_pipeline(str(PIPELINES / "linear.py"))
    with pytest.raises(ConfigError, match="unknown logger 'mlflow'"):
        resolve(pipeline, {"logger": "tensorboard,mlflow"})
