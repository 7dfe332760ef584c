"""Faults: the root cause of every death, checkpoints that are verified, restarts that resume.

Fast tests check the pieces (manifests, non-finite steps, config); the slow ones run real
processes: signals on plain processes (no launcher to clean up after them), a SIGKILLed
rank under ``distflow run`` and under two torchrun nodes, and a restart whose metrics must
equal an uninterrupted run's.
"""
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from distflow import checkpoint
from distflow.cli import root_cause, signal_death
from distflow.config import ConfigError, RunConfig
from distflow.engines.training import OptimConfig, TrainEngine
from distflow.runtime.metrics import read_metrics
from distflow.runtime.worker import StageError, _check_finite, resume_requested
from harness import PIPELINES, REPO, _env, free_port, spawn, wait_all

PEER_TIMEOUT = 2.0
BOUND = PEER_TIMEOUT + 10.0  # detection <= timeout + a beat; the rest is slack for 2 loaded cores
TIMING = ("timing_s/", "comm_s/", "perf/", "memory/")


# -- checkpoints ----------------------------------------------------------------------------
def _commit(root, step, payload: bytes):
    tmp = checkpoint.staging(root, step)
    (tmp / "stage").mkdir()
    (tmp / "stage" / "w.bin").write_bytes(payload)
    checkpoint.commit(root, step)


def test_manifest_records_step_and_sha256_of_every_file(tmp_path):
    _commit(tmp_path, 4, b"weights of step 4")
    manifest = json.loads((tmp_path / "step_4" / "manifest.json").read_text())
    assert manifest["step"] == 4
    assert manifest["files"] == {"stage/w.bin": {
        "bytes": 17, "sha256": hashlib.sha256(b"weights of step 4").hexdigest()}}
    assert checkpoint.check(tmp_path / "step_4", 4)["step"] == 4


def test_resume_skips_corrupt_and_partial_checkpoints_naming_them(tmp_path, caplog):
    for step in (1, 2, 3):
        _commit(tmp_path, step, bytes([step]) * 64)
    w3 = tmp_path / "step_3" / "stage" / "w.bin"
    w3.write_bytes(b"\x00" + w3.read_bytes()[1:])  # one byte overwritten, same size
    (tmp_path / "step_4").mkdir()  # a crash left an empty directory (no manifest)
    (tmp_path / "step_9.tmp").mkdir()  # an unfinished write
    with caplog.at_level(logging.WARNING, logger="distflow.checkpoint"):
        assert checkpoint.latest(tmp_path) == (2, tmp_path / "step_2")
    log = caplog.text
    assert "step_4: no manifest.json (incomplete); falling back to step_3" in log
    assert "step_3: stage/w.bin does not match its sha256" in log and "falling back to step_2" in log
    (tmp_path / "step_2" / "stage" / "w.bin").write_bytes(b"\x02" * 10)  # truncated
    (tmp_path / "step_1" / "extra.bin").write_bytes(b"?")  # a file nobody committed
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distflow.checkpoint"):
        assert checkpoint.latest(tmp_path) is None
    assert "stage/w.bin has 10 bytes, manifest says 64" in caplog.text
    assert "files not in manifest.json: ['extra.bin']" in caplog.text
    assert "no older checkpoint" in caplog.text


def test_manifest_of_another_step_is_rejected(tmp_path):
    _commit(tmp_path, 5, b"x")
    (tmp_path / "step_5").rename(tmp_path / "step_6")
    with pytest.raises(checkpoint.CheckpointError, match="manifest.json says step 5, directory says 6"):
        checkpoint.check(tmp_path / "step_6", 6)


# -- non-finite steps, config ------------------------------------------------------------------
def _engine(skip: bool):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    return model, TrainEngine(model, OptimConfig(lr=0.1, skip_nonfinite=skip))


def _step(engine, model, poison: bool):
    x = torch.randn(4, 3)
    def loss_fn(idx):
        loss = model(x[idx]).sum() * (float("nan") if poison else 1.0)
        return loss, {"loss": float(loss.detach())}
    return engine.step(4, torch.ones(4, dtype=torch.long), loss_fn, normalizer=4.0)


def test_nonfinite_loss_stops_before_the_weights_change_or_is_skipped():
    model, engine = _engine(skip=False)
    before = model.weight.detach().clone()
    with pytest.raises(FloatingPointError, match="non-finite loss=nan, grad_norm=nan; the optimizer step was not applied"):
        _step(engine, model, poison=True)
    assert torch.equal(model.weight, before)
    model, engine = _engine(skip=True)
    stats = _step(engine, model, poison=True)
    assert stats["nonfinite_skipped"] == 1.0 and torch.equal(model.weight, before)
    stats = _step(engine, model, poison=False)  # the next finite step trains as usual
    assert stats["nonfinite_skipped"] == 0.0 and not torch.equal(model.weight, before)


def test_nonfinite_metric_names_stage_and_step():
    with pytest.raises(StageError, match=r"stage 'update' at step 7: non-finite actor/pg_loss=inf"):
        _check_finite("update", 7, {"actor/pg_loss": float("inf"), "reward/mean": 0.5}, "stop")
    metrics = {"actor/grad_norm": float("nan")}
    _check_finite("update", 7, metrics, "skip")
    assert metrics["nonfinite_skipped/update"] == 1.0
    _check_finite("update", 7, {"reward/std": float("nan")}, "stop")  # not a loss or gradient


def test_resume_modes(monkeypatch):
    assert RunConfig().resume == "auto" and RunConfig(resume=True).resume == "true"
    with pytest.raises(ConfigError, match="resume must be auto, true or false"):
        RunConfig(resume="sometimes")
    with pytest.raises(ConfigError, match="nonfinite must be 'stop' or 'skip'"):
        RunConfig(nonfinite="ignore")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert [resume_requested(m) for m in ("auto", "true", "false")] == [False, True, False]
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert [resume_requested(m) for m in ("auto", "true", "false")] == [True, True, False]


def test_root_cause_of_a_signal_death_comes_from_torchruns_report(tmp_path):
    (tmp_path / "errors").mkdir()
    (tmp_path / "errors" / "rank0.txt").write_text(
        "distflow: rank 0 stage score failed: PeerFailure: peer rank 2 (last reported stage "
        "sink, step 2) died: its connection closed without a goodbye\n")
    report = ("Root Cause (first observed failure):\n[0]:\n  time      : x\n  host      : h\n"
              "  rank      : 2 (local_rank: 2)\n  exitcode  : -9 (pid: 1)  (SIGKILL)\n")
    assert signal_death(report) == (2, 9)
    line = "distflow: rank 2 stage sink failed: killed by SIGKILL (exit signal 9)"
    assert root_cause(tmp_path, report) == line
    assert (tmp_path / "errors" / "rank2.txt").read_text() == line + "\n"


# -- real processes ---------------------------------------------------------------------------
def _wait_for(path, timeout=60):
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return path.exists()


SPLIT3 = ["placement=split", "groups.a=1", "groups.b=2", f"transport.peer_timeout_s={PEER_TIMEOUT}",
          "transport.heartbeat_s=0.2", "delay_s=0.05", "steps=400"]


def _start_split3(out):
    """3 spawned ranks of the linear pipeline (1 + 2 split), once their step 3 is done."""
    procs = spawn(PIPELINES / "linear.py", 3, out, *SPLIT3)
    assert _wait_for(out / "sink_step3_rank0.safetensors"), "the run did not start"
    return procs


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigusr1_dumps_stacks_and_a_stopped_rank_is_named_within_the_peer_timeout(tmp_path):
    procs = _start_split3(tmp_path)
    procs[1].send_signal(signal.SIGUSR1)
    assert _wait_for(tmp_path / "errors" / "rank1.stack", 10)
    time.sleep(0.5)
    assert procs[1].poll() is None  # a stack dump does not stop the rank
    stack = (tmp_path / "errors" / "rank1.stack").read_text()
    assert "SIGUSR1" in stack and "distflow/runtime/worker.py" in stack and "in run_step" in stack
    procs[2].send_signal(signal.SIGSTOP)  # hung: alive, connected, silent
    stopped = time.monotonic()
    exits = wait_all(procs[:2], 60)
    procs[2].kill()
    procs[2].wait()
    for r in (0, 1):
        err = procs[r].stderr.read()
        assert r in exits and procs[r].returncode == 1, err[-2000:]
        assert PEER_TIMEOUT <= exits[r] - stopped < BOUND, exits[r] - stopped
        assert f"distflow: rank {r} stage" in err and "peer rank 2 (last reported stage" in err
        assert "hung or unreachable, presumed dead" in err
        # the heartbeat thread's dump names the first failure it saw: rank 2 itself, or
        # the other survivor's report of it ("peer rank 0 (...) failed: peer rank 2 ...")
        dumps = (tmp_path / "errors" / f"rank{r}.stack").read_text().split("=== ")
        assert any(d.split("\n", 1)[0].count("peer failure: ") and "peer rank 2 (" in d.split("\n", 1)[0]
                   for d in dumps), dumps[-1][:500]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigterm_goes_through_the_failure_path_and_peers_name_it(tmp_path):
    procs = _start_split3(tmp_path)
    procs[2].send_signal(signal.SIGTERM)
    sent = time.monotonic()
    exits = wait_all(procs, 60)
    errs = [p.stderr.read() for p in procs]
    assert [p.returncode for p in procs] == [1, 1, 1], errs
    assert "distflow: rank 2 stage" in errs[2] and "failed: terminated by SIGTERM" in errs[2]
    assert "terminated by SIGTERM" in (tmp_path / "errors" / "rank2.txt").read_text()
    for r in (0, 1):
        assert exits[r] - sent < BOUND
        assert "peer rank 2 (stage" in errs[r] and "failed: terminated by SIGTERM" in errs[r], errs[r]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_distflow_run_names_a_sigkilled_rank_with_its_signal(tmp_path):
    r = subprocess.run([sys.executable, "-m", "distflow.cli", "run", str(PIPELINES / "linear.py"),
                        "--nproc", "3", "--out", str(tmp_path), "--steps", "30", "delay_s=0.05",
                        "placement=split", "groups.a=1", "groups.b=2", "fault.rank=2",
                        "fault.step=3", "fault.mode=kill"],
                       capture_output=True, text=True, timeout=200, env=_env())
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("distflow run failed: distflow: rank 2 stage "), last
    assert last.endswith("failed: killed by SIGKILL (exit signal 9)"), last
    for rank in (0, 1):  # the survivors name it too, not the launcher's SIGTERM
        text = (tmp_path / "errors" / f"rank{rank}.txt").read_text()
        assert "PeerFailure: peer rank 2 (last reported stage" in text and "died" in text, text


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("victim", [1, 3], ids=["on-the-store-host", "on-the-other-node"])
def test_two_nodes_every_surviving_node_names_the_killed_rank(tmp_path, victim):
    port = free_port()
    common = ["--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d",
              f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=faults", "-m", "distflow.run",
              str(PIPELINES / "linear.py"), f"out={tmp_path}", "steps=60", "delay_s=0.05",
              "placement=split", "groups.a=2", "groups.b=2", f"fault.rank={victim}",
              "fault.step=3", "fault.mode=kill", f"transport.peer_timeout_s={PEER_TIMEOUT}",
              "transport.heartbeat_s=0.2"]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run",
                               f"--rdzv-conf=is_host={host}", *common], env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for host in ("true", "false")]
    logs = [n.communicate(timeout=200)[1] for n in nodes]
    assert all(n.returncode != 0 for n in nodes)
    survivors = {0: [0, 1], 1: [2, 3]}
    for node, log in enumerate(logs):
        for rank in survivors[node]:
            if rank == victim:
                continue
            lines = [ln for ln in log.splitlines() if f"distflow: rank {rank} stage" in ln]
            assert lines and f"peer rank {victim} (last reported stage" in lines[0], log[-3000:]
    assert "RendezvousConnectionError" not in logs[1 - victim // 2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_restart_resumes_and_metrics_equal_an_uninterrupted_run(tmp_path):
    def run(out, *extra):
        r = subprocess.run([sys.executable, "-m", "distflow.cli", "run",
                            str(REPO / "pipelines" / "bandit.py"), "--out", str(out), "steps=6",
                            "save_every=3", *extra], capture_output=True, text=True, timeout=240,
                           env=_env())
        assert r.returncode == 0, r.stderr[-3000:]
        return read_metrics(out / "metrics.jsonl")
    whole = run(tmp_path / "whole")
    # killed at step 3: after checkpoint step_2, before rank 0 (one step late) logged step 2
    restarted = run(tmp_path / "restarted", "--max-restarts", "1", "fault.rank=1",
                    "fault.step=3", "fault.mode=kill")
    assert [r["step"] for r in restarted] == list(range(6))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]  # noqa: E731
    assert strip(restarted) == strip(whole)  # bit for bit
    assert (tmp_path / "restarted" / "errors" / "attempt0").is_dir()
    assert sorted(os.listdir(tmp_path / "restarted" / "checkpoints")) == ["step_2", "step_5"]


def test_a_failed_rendezvous_says_why():
    from types import SimpleNamespace
    from distflow.run import _failure_reason
    from distflow.runtime.faults import Terminated
    cfg = RunConfig()
    quiet = SimpleNamespace(liveness=SimpleNamespace(failure=None))
    err = RuntimeError("[gloo] connectFullMesh failed: Connection refused")
    reason = _failure_reason(err, "rendezvous", quiet, cfg)
    assert reason.startswith("RuntimeError: [gloo] connectFullMesh failed: Connection refused")
    assert "could not set up the gloo groups or exchange endpoints" in reason
    known = SimpleNamespace(liveness=SimpleNamespace(failure="peer rank 1 (stage -, step -1) died"))
    assert _failure_reason(err, "rendezvous", known, cfg).endswith("; caused by peer rank 1 (stage -, step -1) died")
    assert _failure_reason(Terminated(signal.SIGTERM), "gen", known, cfg) == \
        "PeerFailure: peer rank 1 (stage -, step -1) died (then terminated by SIGTERM)"
