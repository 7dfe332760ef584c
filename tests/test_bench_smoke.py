"""Smoke tests of the benchmarks: they run end to end and write sane results."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_quick(script: str, out: Path, timeout: int) -> None:
    """``python benchmarks/<script> --quick --out <out>``; fails the test on a non-zero exit."""
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(150)  # above the subprocess timeout, so that one reports first
def test_transport_quick(tmp_path):
    out = tmp_path / "transport.json"
    _run_quick("transport.py", out, timeout=120)
    doc = json.loads(out.read_text())
    assert doc["sizes"]
    for transport in ("distflow", "pyzmq", "gloo"):
        for size in doc["sizes"]:
            r = doc["results"][transport][str(size)]
            assert r["throughput_MBps"] > 0, (transport, size, r)
            assert r["rtt_us"] > 0, (transport, size, r)
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.timeout(270)  # above the subprocess timeout, so that one reports first
def test_scaling_quick(tmp_path):
    _run_quick("scaling.py", tmp_path, timeout=240)
    doc = json.loads((tmp_path / "scaling.json").read_text())
    assert doc["workers"] == [2, 4]
    got = {(r["n"], r["mode"]): r for r in doc["results"]}
    for n in doc["workers"]:
        for mode in ("p2p", "hub"):
            r = got[(n, mode)]
            assert r["samples_per_s"] > 0 and r["step_s"] > 0, (n, mode, r)
            assert r["global_batch"] == doc["params"]["batch_per_worker"] * n
            assert r["efficiency"] > 0
    assert (tmp_path / "scaling.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.timeout(270)  # above the subprocess timeout, so that one reports first
def test_diloco_loss_quick(tmp_path):
    _run_quick("diloco_loss.py", tmp_path, timeout=240)
    doc = json.loads((tmp_path / "diloco_loss.json").read_text())
    res = doc["results"]
    for mode in ("dp", "diloco", "streaming"):
        assert res[mode]["final_eval_loss"] > 0, (mode, res[mode])
        assert res[mode]["curve"], mode
    assert doc["trainable_params"] > 0
    assert res["dp"]["bytes_per_island"] == 4 * doc["trainable_params"] * doc["steps"]
    assert 0 < res["streaming"]["bytes_per_island"] < res["diloco"]["bytes_per_island"] \
        < res["dp"]["bytes_per_island"], {m: r["bytes_per_island"] for m, r in res.items()}
    assert (tmp_path / "diloco_loss.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.timeout(270)  # above the subprocess timeout, so that one reports first
def test_placement_quick(tmp_path):
    _run_quick("placement.py", tmp_path, timeout=240)
    doc = json.loads((tmp_path / "placement.json").read_text())
    res = doc["results"]["grpo"]
    assert set(res) == {"colocated", "interleaved", "disagg_s0", "disagg_s1"}
    for variant, r in res.items():
        assert r["samples_per_s"] > 0 and r["step_s"] > 0, (variant, r)
        assert r["reward_curve"], variant
    assert (tmp_path / "placement.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_allreduce_quick(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/allreduce.py", "--sizes", "4K,64K", "--compute-ms", "0",
                           "--calls", "20", "--block", "10", "--out-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "allreduce.json").read_text())["rows"]
    assert [r["bytes"] for r in rows] == [4096, 65536]
    for r in rows:
        for system in ("distflow", "gloo"):
            assert 0 < r[system]["p50_ms"] <= r[system]["p90_ms"], r
