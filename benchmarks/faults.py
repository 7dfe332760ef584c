"""Fault scenarios, measured: what happened, time to exit, data lost.

    python benchmarks/faults.py [--out DIR]

Each scenario runs real workers on this machine (CPU, loopback) and prints one markdown
row: the line the run ended with, the seconds from the fault to the last process's exit,
and the data lost: metrics rows of completed steps missing or changed, and checkpoints
that fail their manifest (for restarts: rows differing from an uninterrupted run).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from harness import PIPELINES, _env, free_port, spawn  # noqa: E402

from distflow import checkpoint  # noqa: E402
from distflow.runtime.metrics import read_metrics  # noqa: E402

LINEAR = [str(PIPELINES / "linear.py"), "placement=split", "delay_s=0.05",
          "transport.peer_timeout_s=2", "transport.heartbeat_s=0.2", "save_every=0"]
TIMING = ("timing_s/", "comm_s/", "perf/", "memory/")


def _wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.02)


def _lost_rows(out: Path, upto: int) -> str:
    rows = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    steps = [r["step"] for r in rows]
    missing = sorted(set(range(upto + 1)) - set(steps))
    dup = len(steps) - len(set(steps))
    bad = [p.name for p in (out / "checkpoints").glob("step_*") if p.is_dir()
           and not _ok(p)] if (out / "checkpoints").exists() else []
    return (f"{len(missing)} rows of steps 0-{upto} missing, {dup} duplicated, "
            f"{len(bad)} bad checkpoints") if (missing or dup or bad) else \
        f"none (rows 0-{upto} present once{', checkpoints verify' if (out / 'checkpoints').exists() else ''})"


def _ok(path: Path) -> bool:
    try:
        checkpoint.check(path, int(path.name.split("_")[1]))
        return True
    except checkpoint.CheckpointError:
        return False


def _last_line(text: str) -> str:
    """The last `distflow: rank ...` / `distflow run failed: ...` line (a progress bar may
    share its line)."""
    found = re.findall(r"distflow(?: run failed)?: rank \d+ stage .*", text)
    return found[-1] if found else text.strip().splitlines()[-1]


def distflow_run_sigkill(out: Path) -> tuple[str, float, str]:
    """`distflow run --nproc 3`, rank 2 SIGKILLed from outside at step 5."""
    proc = subprocess.Popen([sys.executable, "-m", "distflow.cli", "run", LINEAR[0], "--nproc", "3",
                             "--out", str(out), "--steps", "400", *LINEAR[1:], "groups.a=1",
                             "groups.b=2"], env={**_env(), "DISTFLOW_BENCH_TAG": "cli"},
                            stderr=subprocess.PIPE, text=True)
    _wait_for(out / "sink_step5_rank0.safetensors")
    pid = _workers_of_tag("cli")[2]
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    err = proc.communicate()[1]
    done = time.monotonic() - t0
    rows = read_metrics(out / "metrics.jsonl")
    return _last_line(err), done, _lost_rows(out, max(r["step"] for r in rows))


def _spawned(out: Path, sig: int) -> tuple[str, float, str]:
    procs = spawn(*LINEAR[:1], 3, out, *LINEAR[1:], "groups.a=1", "groups.b=2", "steps=400")
    _wait_for(out / "sink_step5_rank0.safetensors")
    procs[2].send_signal(sig)
    t0 = time.monotonic()
    for p in procs[:2]:
        p.wait(timeout=120)
    done = time.monotonic() - t0
    if sig == signal.SIGSTOP:
        procs[2].kill()
    procs[2].wait()
    errs = [p.stderr.read() for p in procs]
    rows = read_metrics(out / "metrics.jsonl")
    return _last_line(errs[0]), done, _lost_rows(out, max(r["step"] for r in rows))


def two_nodes(out: Path, victim: int) -> tuple[str, float, str]:
    port = free_port()
    common = ["--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d",
              f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=bench", "-m", "distflow.run",
              *LINEAR[:1], f"out={out}", "steps=400", *LINEAR[1:], "groups.a=2", "groups.b=2"]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run",
                               f"--rdzv-conf=is_host={h}", *common], stderr=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, text=True,
                              env={**_env(), "DISTFLOW_BENCH_TAG": tag})
             for h, tag in (("true", "A"), ("false", "B"))]
    _wait_for(out / "sink_step5_rank0.safetensors")
    pids = {}
    for tag in ("A", "B"):
        pids.update(_workers_of_tag(tag))
    os.kill(pids[victim], signal.SIGKILL)
    t0 = time.monotonic()
    logs = [n.communicate(timeout=120)[1] for n in nodes]
    done = time.monotonic() - t0
    named = [len(re.findall(rf"distflow: rank \d+ stage \S+ failed: PeerFailure: peer rank {victim} "
                            r"\(last reported", log)) for log in logs]
    rows = read_metrics(out / "metrics.jsonl")
    return (f"node A log: {named[0]} survivor line(s) naming rank {victim}, node B log: {named[1]}; "
            f"e.g. `{_last_line(logs[1 - victim // 2])[:150]}...`", done,
            _lost_rows(out, max(r["step"] for r in rows)))


def _workers_of_tag(tag: str) -> dict[int, int]:
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        kv = dict(e.split(b"=", 1) for e in env if b"=" in e)
        if (b"distflow.run" in cmd and b"torch.distributed.run" not in cmd
                and kv.get(b"DISTFLOW_BENCH_TAG") == tag.encode() and b"RANK" in kv):
            found[int(kv[b"RANK"])] = int(pid)
    return found


def restart(out: Path) -> tuple[str, float, str]:
    """bandit, 12 steps, checkpoint every 3; rank 1 SIGKILLed at step 6 (fault.mode=kill),
    `--max-restarts 1`; rows compared with an uninterrupted run's."""
    def run(d, *extra):
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "distflow.cli", "run", str(REPO / "pipelines" / "bandit.py"),
                            "--out", str(d), "steps=12", "save_every=3", *extra],
                           capture_output=True, text=True, env=_env())
        return r, time.monotonic() - t0
    whole, t_whole = run(out / "whole")
    got, t_got = run(out / "restarted", "--max-restarts", "1", "fault.rank=1", "fault.step=6",
                     "fault.mode=kill")
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]  # noqa: E731
    a, b = read_metrics(out / "whole" / "metrics.jsonl"), read_metrics(out / "restarted" / "metrics.jsonl")
    same = strip(a) == strip(b)
    return (f"exit {got.returncode}; resumed from step_5, {len(b)} rows, steps "
            f"{[r['step'] for r in b] == list(range(12)) and 'each once' or 'WRONG'}", t_got - t_whole,
            "none (every non-timing value equal to the uninterrupted run, bit for bit)" if same
            else "ROWS DIFFER")


def corrupt_resume(out: Path) -> tuple[str, float, str]:
    """bandit 6 steps (checkpoints step_2, step_5); one byte of step_5 flipped; resume=true."""
    base = [sys.executable, "-m", "distflow.cli", "run", str(REPO / "pipelines" / "bandit.py"),
            "--out", str(out), "save_every=3"]
    subprocess.run([*base, "steps=6"], capture_output=True, text=True, env=_env(), check=True)
    before = read_metrics(out / "metrics.jsonl")
    f = out / "checkpoints" / "step_5" / "update" / "policy.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    t0 = time.monotonic()
    r = subprocess.run([*base, "steps=6", "resume=true"], capture_output=True, text=True, env=_env())
    warn = [ln for ln in r.stderr.splitlines() if "skipping checkpoint" in ln]
    after = read_metrics(out / "metrics.jsonl")
    strip = lambda rows: [{k: v for k, v in x.items() if not k.startswith(TIMING)} for x in rows]  # noqa: E731
    return (f"exit {r.returncode}; `{warn[0].split('checkpoints/')[-1] if warn else 'NO WARNING'}`; "
            "steps 3-5 rerun", time.monotonic() - t0,
            "none (rows equal the first run's)" if strip(before) == strip(after) else "ROWS DIFFER")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/distflow-faults")
    args = ap.parse_args()
    root = Path(args.out)
    subprocess.run(["rm", "-rf", str(root)])
    scenarios = {
        "`distflow run --nproc 3`, rank 2 SIGKILLed from outside": lambda d: distflow_run_sigkill(d),
        "3 plain processes, rank 2 SIGTERMed": lambda d: _spawned(d, signal.SIGTERM),
        "3 plain processes, rank 2 SIGSTOPped (hung), peer_timeout_s=2": lambda d: _spawned(d, signal.SIGSTOP),
        "2 torchrun nodes x 2, rank 1 SIGKILLed (on the store host)": lambda d: two_nodes(d, 1),
        "2 torchrun nodes x 2, rank 3 SIGKILLed (other node)": lambda d: two_nodes(d, 3),
        "`--max-restarts 1`, rank 1 killed at step 6 of 12 (time: extra over a clean run)": restart,
        "newest checkpoint corrupted (1 byte), `resume=true`": corrupt_resume,
    }
    print("| scenario | what happened | time to exit | data lost (must be none) |")
    print("|---|---|---|---|")
    for i, (name, fn) in enumerate(scenarios.items()):
        d = root / f"s{i}"
        d.mkdir(parents=True)
        what, secs, lost = fn(d)
        print(f"| {name} | {what.replace('|', '/')} | {secs:.1f} s | {lost} |", flush=True)


if __name__ == "__main__":
    main()
