"""Cross-datacenter training, simulated: DP vs Streaming DiLoCo over a shaped link.

Two network namespaces (one "datacenter" each, one trainer island each) joined by a veth
pair with private addresses that exist only inside them (10.231.0.1/30, 10.231.0.2/30);
both ends shaped with ``tc`` (netem ``delay D rate R`` when the kernel has netem; else
``tbf rate R``, i.e. bandwidth only, no added delay, and the JSON says so). In each
namespace one ``torchrun --nnodes=2 --nproc_per_node=1`` node with c10d rendezvous on
10.231.0.1 runs ``python -m distflow.run pipelines/lm_diloco.py``.

Runs (same model, steps, batch; ``diloco.islands=2`` for the DiLoCo modes):

- ``ideal``: ``diloco.mode=streaming`` with ``inner_steps`` larger than the run (no sync
  ever, and no gradient all-reduce: each island is one rank): pure compute, link unshaped;
- ``dp``: ``diloco.mode=ddp``: one fp32 gradient all-reduce over the link every step;
- ``streaming``: H=30, P=2 fragments, tau=1, 4-bit (``e3m0``), alpha=0.5.

Per run: ``step_s`` = mean over the measured steps (after ``--warmup``, excluding the last
step, which evaluates) of ``timing_s/step`` (each step's wall time, max over ranks): the
mean, not the median, so that Streaming's sync steps count. Compute utilisation =
``step_s(ideal) / step_s(run)``.

Because the default model (263k params, 1 MB of fp32 gradient) is hardly bandwidth bound at
100 Mbit/s, the model is enlarged via the pipeline params (``--hidden 128 --layers 4``:
1.02M params, 4.1 MB of gradient = 0.33 s at 100 Mbit/s).

Needs root, ``ip`` and ``tc``; otherwise prints why and exits 0. Namespaces are named
``dfwanA<pid>``/``dfwanB<pid>`` and always removed (finally + atexit + SIGINT/SIGTERM);
leftovers of earlier runs (whose pid is gone) are removed at start.

    sudo python benchmarks/diloco_wan.py [--steps 60] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import main_of  # noqa: E402
from distflow.models import DecoderLM, preset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = "pipelines/lm_diloco.py"
PREFIX = "dfwan"
ADDR = {"A": "10.231.0.1", "B": "10.231.0.2"}
PID = os.getpid()
NS = {"A": f"{PREFIX}A{PID}", "B": f"{PREFIX}B{PID}"}
VETH = {"A": f"dfa{PID}"[:15], "B": f"dfb{PID}"[:15]}
_children: list[subprocess.Popen] = []
_cleaned = False


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {proc.stderr.strip()}")
    return proc


def cleanup() -> None:
    global _cleaned
    if _cleaned:
        return
    _cleaned = True
    for p in _children:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for p in _children:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for ns in NS.values():
        sh("ip", "netns", "del", ns, check=False)


def _on_signal(signum, _frame):
    cleanup()
    sys.exit(128 + signum)


def remove_leftovers() -> list[str]:
    """Namespaces of earlier runs of this script whose process is gone."""
    removed = []
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        m = re.match(rf"({PREFIX}[AB](\d+))\b", line.strip())
        if m and int(m.group(2)) != PID and not Path(f"/proc/{m.group(2)}").exists():
            sh("ip", "netns", "del", m.group(1), check=False)
            removed.append(m.group(1))
    return removed


def setup() -> None:
    for s in "AB":
        sh("ip", "netns", "add", NS[s])
    sh("ip", "link", "add", VETH["A"], "type", "veth", "peer", "name", VETH["B"])
    for s in "AB":
        sh("ip", "link", "set", VETH[s], "netns", NS[s])
        sh("ip", "-n", NS[s], "addr", "add", f"{ADDR[s]}/30", "dev", VETH[s])
        sh("ip", "-n", NS[s], "link", "set", "lo", "up")
        sh("ip", "-n", NS[s], "link", "set", VETH[s], "up")


def shape(rate_mbit: float | None, delay_ms: float, qdisc: str) -> None:
    """Shape the egress of both veth ends (so both directions); None = unshaped."""
    for s in "AB":
        sh("ip", "netns", "exec", NS[s], "tc", "qdisc", "del", "dev", VETH[s], "root", check=False)
        if rate_mbit is None:
            continue
        if qdisc == "netem":
            sh("ip", "netns", "exec", NS[s], "tc", "qdisc", "add", "dev", VETH[s], "root", "netem",
               "delay", f"{delay_ms}ms", "rate", f"{rate_mbit}mbit", "limit", "100000")
        else:  # tbf: rate only; 1 ms of burst (>= 16 KB), up to 200 ms of queue
            burst = max(16 * 1024, int(rate_mbit * 1e6 / 8 / 1000))
            sh("ip", "netns", "exec", NS[s], "tc", "qdisc", "add", "dev", VETH[s], "root", "tbf",
               "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "200ms")


def probe_qdisc() -> str | None:
    """'netem', 'tbf' or None, tried on this run's veth."""
    for kind, args in (("netem", ["netem", "delay", "1ms", "rate", "100mbit"]),
                       ("tbf", ["tbf", "rate", "100mbit", "burst", "16384", "latency", "50ms"])):
        ok = sh("ip", "netns", "exec", NS["A"], "tc", "qdisc", "add", "dev", VETH["A"], "root",
                *args, check=False).returncode == 0
        sh("ip", "netns", "exec", NS["A"], "tc", "qdisc", "del", "dev", VETH["A"], "root", check=False)
        if ok:
            return kind
    return None


def run_one(name: str, overrides: list[str], steps: int, out: Path, port: int,
            timeout_s: float) -> dict:
    procs = []
    for node, s in enumerate("AB"):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTFLOW_HOST": ADDR[s],
               "GLOO_SOCKET_IFNAME": VETH[s], "PYTHONUNBUFFERED": "1"}
        cmd = ["ip", "netns", "exec", NS[s], sys.executable, "-m", "torch.distributed.run",
               "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
               f"--rdzv_endpoint={ADDR['A']}:{port}", f"--rdzv_id=dfwan{PID}{name}",
               f"--rdzv_conf=is_host={int(node == 0)}",  # the veth address is not in /etc/hosts
               f"--local-addr={ADDR[s]}", "--max-restarts=0",
               "-m", "distflow.run", PIPELINE, f"out={out}", f"steps={steps}", *overrides]
        log = open(out.parent / f"{name}.node{node}.log", "w")
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        _children.append(p)
        procs.append(p)
        if node == 0:
            time.sleep(1.0)  # the c10d store host first
    t0 = time.perf_counter()
    deadline = t0 + timeout_s
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            pass
    wall = time.perf_counter() - t0
    rcs = [p.poll() for p in procs]
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=10)
    if rcs != [0, 0]:
        tails = "\n".join((out.parent / f"{name}.node{n}.log").read_text()[-1500:] for n in range(2))
        raise RuntimeError(f"{name}: exit codes {rcs} after {wall:.0f}s\n{tails}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    return {"rows": rows, "wall_s": wall}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--inner-steps", type=int, default=30)
    ap.add_argument("--delay-ms", type=float, default=10.0, help="one way (netem only)")
    ap.add_argument("--rates", default="1000,100", help="Mbit/s, comma separated")
    ap.add_argument("--run-timeout", type=float, default=150.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    args.out = Path(args.out)
    return args


def run(args: argparse.Namespace) -> dict | None:
    """Every mode over every shaped link (None, with the reason printed, where this box cannot shape links)."""
    if os.geteuid() != 0:
        print("diloco_wan: skipped: needs root (network namespaces and tc)")
        return None
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        print(f"diloco_wan: skipped: {', '.join(missing)} not found (install iproute2)")
        return None
    atexit.register(cleanup)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    left = remove_leftovers()
    if left:
        print(f"removed leftover namespaces: {left}")
    try:
        try:
            setup()
        except RuntimeError as e:
            print(f"diloco_wan: skipped: cannot create namespaces/veth: {e}")
            return None
        qdisc = probe_qdisc()
        if qdisc is None:
            print("diloco_wan: skipped: neither the netem nor the tbf qdisc is available in this kernel")
            return None
        if qdisc != "netem":
            print("note: netem is not available in this kernel; shaping bandwidth with tbf, "
                  "no added delay")
        rates = [float(r) for r in args.rates.split(",")]
        common = [f"hidden={args.hidden}", f"layers={args.layers}", f"eval_every={10 ** 6}",
                  "eval_batch=16"]
        h = args.inner_steps
        configs = {
            "ideal": ["diloco.mode=streaming", "diloco.islands=2", f"diloco.inner_steps={10 ** 6}",
                      "diloco.fragments=2", "diloco.overlap_steps=1", "diloco.alpha=0.5",
                      "diloco.quantize=e3m0"],
            "dp": ["diloco.mode=ddp"],
            "streaming": ["diloco.mode=streaming", "diloco.islands=2", f"diloco.inner_steps={h}",
                          "diloco.fragments=2", "diloco.overlap_steps=1", "diloco.alpha=0.5",
                          "diloco.quantize=e3m0"],
        }
        # the box is shared and noisy: an ideal run before and after every measured run
        plan = [x for r in rates for m in ("dp", "streaming") for x in (("ideal", None), (m, r))]
        plan.append(("ideal", None))
        results = []
        port = 29400 + PID % 500
        with tempfile.TemporaryDirectory(prefix="diloco_wan_") as tmp:
            for i, (mode, rate) in enumerate(plan):
                shape(rate, args.delay_ms, qdisc)
                tag = f"{mode}-{'unshaped' if rate is None else f'{rate:g}mbit'}"
                print(f"[{tag}] running {args.steps} steps ...", flush=True)
                r = run_one(tag, [*configs[mode], *common], args.steps, Path(tmp) / tag, port + i,
                            args.run_timeout)
                rows = r["rows"]
                measured = rows[args.warmup:-1]
                step_s = sum(x["timing_s/step"] for x in measured) / len(measured)
                train_s = sum(x["timing_s/train"] for x in measured) / len(measured)
                med = sorted(x["timing_s/step"] for x in measured)[len(measured) // 2]
                res = {"mode": mode, "rate_mbit": rate, "step_s": step_s, "median_step_s": med,
                       "max_step_s": max(x["timing_s/step"] for x in measured),
                       "train_s": train_s, "bytes_sent": rows[-1].get("diloco/bytes_sent"),
                       "syncs": rows[-1].get("diloco/syncs"), "final_train_loss": rows[-1]["train/loss"],
                       "run_wall_s": r["wall_s"], "steps_measured": len(measured)}
                results.append(res)
                print(f"[{tag}] step {step_s * 1e3:.0f} ms (median {med * 1e3:.0f}, max "
                      f"{res['max_step_s'] * 1e3:.0f}), run {r['wall_s']:.0f}s", flush=True)
        shape(None, 0, qdisc)
    finally:
        cleanup()

    ideals = [r["step_s"] for r in results if r["mode"] == "ideal"]
    n_params = sum(p.numel() for p in DecoderLM(preset(
        "tiny", vocab_size=256, hidden_size=args.hidden, num_hidden_layers=args.layers,
        intermediate_size=4 * args.hidden, max_position_embeddings=65)).parameters() if p.requires_grad)
    ideal_med = sorted(r["median_step_s"] for r in results if r["mode"] == "ideal")
    ideal_med = sum(ideal_med) / len(ideal_med)
    for i, r in enumerate(results):
        # against the ideal runs just before and after this one (the same background load)
        near = [results[j] for j in (i - 1, i + 1) if 0 <= j < len(results) and results[j]["mode"] == "ideal"]
        if r["mode"] == "ideal" or not near:
            near = [x for x in results if x["mode"] == "ideal"]
        r["ideal_step_s"] = sum(x["step_s"] for x in near) / len(near)
        r["ideal_median_step_s"] = sum(x["median_step_s"] for x in near) / len(near)
        r["utilisation"] = r["ideal_step_s"] / r["step_s"]
        r["utilisation_median"] = r["ideal_median_step_s"] / r["median_step_s"]  # robust to load spikes
        if r["mode"] == "dp":
            r["bytes_sent"] = 4.0 * n_params * args.steps
    at100 = {r["mode"]: min(r["utilisation"], r["utilisation_median"])
             for r in results if r["rate_mbit"] == min(rates)}
    goal = bool(at100.get("streaming", 0) >= 0.9 and at100.get("dp", 1) < 0.9)
    doc = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "steps": args.steps, "warmup": args.warmup,
           "hidden": args.hidden, "layers": args.layers, "trainable_params": n_params,
           "grad_bytes_fp32": 4 * n_params, "inner_steps": h, "qdisc": qdisc,
           "delay_ms_one_way": args.delay_ms if qdisc == "netem" else 0.0,
           "launch": "torchrun --nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d, one node per netns",
           "utilisation_definition": "mean timing_s/step of the ideal (no-sync) runs just before and "
                                     "after this run / this run's mean timing_s/step (utilisation_median: "
                                     "the same with medians)",
           "ideal_step_s_runs": ideals,
           "goal": "streaming >= 90% utilisation at 100 Mbit/s where DP is not",
           "goal_met": goal, "results": results}
    return doc


def report(doc: dict | None, args: argparse.Namespace) -> None:
    """``diloco_wan.json`` and a Markdown table on stdout."""
    if doc is None:
        return
    out, results, n_params, qdisc = args.out, doc["results"], doc["trainable_params"], doc["qdisc"]
    rates = [r["rate_mbit"] for r in results if r["rate_mbit"] is not None]
    goal = doc["goal_met"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "diloco_wan.json").write_text(json.dumps(doc, indent=2))
    print(f"\nmodel {n_params} params ({4 * n_params / 1e6:.2f} MB fp32 gradient), {args.steps} steps, "
          f"shaping {qdisc}{f' delay {args.delay_ms:g} ms one way' if qdisc == 'netem' else ' (no delay)'}")
    print("| link | mode | step ms (mean) | step ms (median) | max step ms | utilisation (mean) "
          "| utilisation (median) | bytes/island |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        link = "unshaped" if r["rate_mbit"] is None else f"{r['rate_mbit']:g} Mbit/s"
        print(f"| {link} | {r['mode']} | {r['step_s'] * 1e3:.0f} | {r['median_step_s'] * 1e3:.0f} | "
              f"{r['max_step_s'] * 1e3:.0f} | {r['utilisation'] * 100:.1f}% | "
              f"{r['utilisation_median'] * 100:.1f}% | "
              f"{(r['bytes_sent'] or 0) / 1e6:.2f} MB |")
    print(f"goal (streaming >= 90% at {min(rates):g} Mbit/s, DP below): {'met' if goal else 'not met'}")


main = main_of(parse, run, report)


if __name__ == "__main__":
    sys.exit(main())
