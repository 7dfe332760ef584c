"""Failure handling with real processes: a dead peer, a raising stage, hostile input.

Ranks are started as plain processes (``harness.spawn``), not under torchrun, whose agent
would kill the survivors itself: here the runtime alone must notice and stop them.
"""
import json
import socket
import subprocess
import sys
import time

import msgpack
import pytest
import zmq

from harness import PIPELINES, reference, sink_outputs, spawn

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
PEER_TIMEOUT = 2.0
# detection <= peer timeout + a heartbeat; the rest is slack for a loaded 2-core machine
BOUND = PEER_TIMEOUT + 10.0


def _wait_all(procs, timeout):
    deadline = time.monotonic() + timeout
    exits = {}
    while len(exits) < len(procs) and time.monotonic() < deadline:
        for i, p in enumerate(procs):
            if i not in exits and p.poll() is not None:
                exits[i] = time.monotonic()
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
    return exits


def test_killed_worker_fails_every_survivor_in_bounded_time_naming_it(tmp_path):
    procs = spawn(PIPELINES / "linear.py", 3, tmp_path, "steps=50", "delay_s=0.05",
                  "placement=split", "groups.a=1", "groups.b=2", "fault.rank=2",
                  "fault.step=3", "fault.mode=kill",
                  f"transport.peer_timeout_s={PEER_TIMEOUT}", "transport.heartbeat_s=0.2")
    exits = _wait_all(procs, 90)
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
    exits = _wait_all(procs, 90)
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


def _hostile_traffic(endpoint: str, hb_endpoint: str) -> None:
    ctx = zmq.Context()
    evil = ctx.socket(zmq.DEALER)
    evil.setsockopt(zmq.ROUTING_ID, b"evil")
    evil.connect(endpoint)
    good_header = {"v": 1, "src": 0, "kind": "data", "key": [0, "x"], "meta": None,
                   "tensors": [["a", "float32", [4], 16]]}
    evil.send_multipart([b"\x00garbage not msgpack"])
    evil.send_multipart([msgpack.packb({"v": 1}), b"1234"])  # wrong keys
    evil.send_multipart([msgpack.packb(good_header)])  # truncated: tensor frame missing
    evil.send_multipart([msgpack.packb(good_header), b"short"])  # frame size mismatch
    evil.send_multipart([msgpack.packb(good_header), b"x" * 16])  # spoofed src (not r0)
    evil.send_multipart([b"cos\nsystem\n(S'touch pwned'\ntR."])  # a pickle
    anon = ctx.socket(zmq.DEALER)
    anon.connect(endpoint)
    anon.send_multipart([msgpack.packb({**good_header, "tensors": [["a", "evil", [1], 1]]}), b"x"])
    time.sleep(0.5)
    for ep in (endpoint, hb_endpoint):  # not even ZeroMQ: raw bytes on the TCP port
        host, port = ep.removeprefix("tcp://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=2) as s:
            s.sendall(b"\xff" * 64 + b"GET / HTTP/1.1\r\n\r\n")
    evil.close(0)
    anon.close(0)
    ctx.term()


def test_malformed_frames_are_rejected_and_the_run_completes(tmp_path):
    steps = 12
    procs = spawn(PIPELINES / "linear.py", 3, tmp_path, f"steps={steps}", "delay_s=0.1",
                  "placement=split", "groups.a=1", "groups.b=2")
    run_json = tmp_path / "run.json"
    deadline = time.monotonic() + 60
    while not run_json.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    endpoints = json.loads(run_json.read_text())["endpoints"]
    for rank in ("0", "1"):
        _hostile_traffic(endpoints[rank]["data"], endpoints[rank]["heartbeat"])
    exits = _wait_all(procs, 120)
    assert set(exits) == {0, 1, 2}
    errs = [p.stderr.read() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errs
    for rank in (0, 1):
        assert errs[rank].count("rejected a message") >= 6, errs[rank]
    assert "claims src 0" in errs[0] and "not valid msgpack" in errs[0]
    assert not (tmp_path / "pwned").exists()
    ref = tmp_path / "ref"
    ref.mkdir()
    reference(PIPELINES / "linear.py", steps, ref)
    got, want = sink_outputs(tmp_path), sink_outputs(ref)
    for name, tensors in want.items():
        for k, v in tensors.items():
            assert (got[name][k] == v).all(), (name, k)
