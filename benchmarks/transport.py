"""Data-plane benchmark: distflow ``Peer`` vs raw pyzmq vs torch.distributed gloo.

Two worker processes per transport (``multiprocessing`` spawn context) on this machine.
distflow and raw pyzmq use the endpoint distflow's ``Peer`` picks for a peer on the same
machine (an abstract Unix socket on Linux; ``--tcp``: TCP on 127.0.0.1 for both); gloo
uses TCP on 127.0.0.1, its only transport. The payload is one float32 tensor of the given size; every transport uses
the same scheme:

- throughput: rank 0 sends ``K`` messages back to back, rank 1 receives them all and
  replies with one tiny ack; ``K * size / time`` (MB = 10^6 bytes);
- round-trip latency: rank 0 sends one message, rank 1 replies with a tiny ack; the
  median over ``N`` such ping-pongs.

The transports:

- ``distflow``: two ``Peer`` (world size 2); endpoints passed through the parent, not
  the torch.distributed store; ``send(..., step=None)`` so flow control stays out of
  it; a fresh key per message; authenticated (ZeroMQ PLAIN), as by default;
- ``curve`` (with ``--curve``): the same with ``transport.encrypt=true`` (ZeroMQ CURVE:
  every byte encrypted); its cost is the paired ratio ``curve/distflow``;
- ``pyzmq``: a plain PAIR socket pair on the same kind of endpoint as distflow, ``send(memoryview, copy=False)`` and
  ``recv(copy=False)`` + ``torch.frombuffer`` (the best raw pyzmq does);
- ``gloo``: ``dist.send`` / ``dist.recv`` into a preallocated tensor.

All six workers stay up for the whole run and the parent drives them trial by trial,
size by size, rotating the transport order each repeat, so noise on a shared machine
hits all three alike. Each figure is the best of ``--repeats`` trials (all trials are
in the JSON); the throughput ratios are given of the best trials and, less sensitive to
noise, as the median over repeats of the ratio of the two back-to-back trials.

    python benchmarks/transport.py                    # full run, < 3 min on 2 cores
    python benchmarks/transport.py --quick --out /tmp/t.json   # smoke test, < 30 s
    python benchmarks/transport.py --sizes 64K,1M,16M
    python benchmarks/transport.py --curve            # also distflow with CURVE encryption
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import platform
import secrets
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

from distflow.runtime.rendezvous import free_port
from _common import main_of  # noqa: E402  (run as python benchmarks/transport.py)

KiB, MiB = 1 << 10, 1 << 20
SIZES = [1 * KiB, 4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB]
QUICK_SIZES = [4 * KiB, 64 * KiB, 1 * MiB]
TRANSPORTS = ("distflow", "pyzmq", "gloo")
WITH_CURVE = ("distflow", "curve", "pyzmq", "gloo")
RESULTS = Path(__file__).resolve().parent / "results"
TRIAL_TIMEOUT_S = 120.0

warnings.filterwarnings("ignore", message="The given buffer is not writable")


def stream_count(size: int, quick: bool) -> int:
    """Messages per throughput trial: about 128 MiB of data, 8..2000 messages."""
    if quick:
        return max(4, min(400, (16 * MiB) // size))
    return max(8, min(2000, (128 * MiB) // size))


def pingpong_count(size: int, quick: bool) -> int:
    """Round trips per latency trial: about 32 MiB of data, 7..300 round trips."""
    if quick:
        return max(3, min(100, (4 * MiB) // size))
    return max(7, min(300, (32 * MiB) // size))


def fmt_size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def parse_size(s: str) -> int:
    s = s.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": KiB, "M": MiB, "G": 1 << 30}.get(s[-1:], 1)
    n = int(s[:-1] if s[-1:] in "KMG" else s) * mult
    if n <= 0 or n % 4:
        raise argparse.ArgumentTypeError(f"size {s!r} must be a positive multiple of 4 bytes")
    return n


# =============================================================== transports (in workers)
# Each transport: rank 0 sends data and waits for acks, rank 1 receives and acks.
# ``__init__`` exchanges addresses through the parent (``conn``): send yours, get both.

class DistflowTransport:
    encrypt = False

    def __init__(self, rank: int, conn, port: int):
        from distflow.config import TransportConfig
        from distflow.transport.peer import Peer
        from distflow.transport.wire import Message
        self.Message, self.rank, self.other = Message, rank, 1 - rank
        self.peer = Peer(rank, 2, "127.0.0.1", TransportConfig(ipc=not _tcp_only(),
                                                               encrypt=self.encrypt))
        conn.send(self.peer.endpoints)
        self.peer.connect(conn.recv())

    def prepare(self, size: int) -> None:
        pass

    def send(self, x, key: tuple) -> None:
        self.peer.send(self.other, self.Message(self.rank, "bench", key, None, {"x": x}), step=None)

    def recv(self, key: tuple):
        return self.peer.recv("bench", key, [self.other])[self.other].tensors["x"]

    def ack(self, key: tuple) -> None:
        self.peer.send(self.other, self.Message(self.rank, "ack", key), step=None)

    def wait_ack(self, key: tuple) -> None:
        self.peer.recv("ack", key, [self.other])

    def close(self) -> None:
        self.peer.close()


class CurveTransport(DistflowTransport):
    encrypt = True


def _tcp_only() -> bool:
    return os.environ.get("DISTFLOW_BENCH_TCP") == "1"


class PyzmqTransport:
    def __init__(self, rank: int, conn, port: int):
        import torch
        import zmq
        self.torch, self.zmq = torch, zmq
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PAIR)
        self.sock.setsockopt(zmq.LINGER, 0)
        mine = None
        if rank == 1:  # the same kind of endpoint distflow's Peer picks for a local peer
            from distflow.transport.peer import local_id
            if _tcp_only() or not local_id():
                mine = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
            else:
                mine = f"ipc://@distflow-bench-{os.getpid()}"
                self.sock.bind(mine)
        conn.send(mine)
        if rank == 0:
            self.sock.connect(conn.recv()[1])
        else:
            conn.recv()

    def prepare(self, size: int) -> None:
        pass

    def send(self, x, key: tuple) -> None:
        self.sock.send(memoryview(x.numpy()), copy=False)

    def recv(self, key: tuple):
        return self.torch.frombuffer(self.sock.recv(copy=False).buffer, dtype=self.torch.float32)

    def ack(self, key: tuple) -> None:
        self.sock.send(b"k")

    def wait_ack(self, key: tuple) -> None:
        self.sock.recv()

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


class GlooTransport:
    def __init__(self, rank: int, conn, port: int):
        from datetime import timedelta

        import torch
        import torch.distributed as dist
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        self.torch, self.dist, self.other = torch, dist, 1 - rank
        conn.send(None)
        conn.recv()
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=2, timeout=timedelta(seconds=TRIAL_TIMEOUT_S))
        self.tiny = torch.zeros(1)
        self.buf = None

    def prepare(self, size: int) -> None:  # the receiver preallocates, outside the timing
        self.buf = self.torch.empty(size // 4, dtype=self.torch.float32)

    def send(self, x, key: tuple) -> None:
        self.dist.send(x, dst=self.other)

    def recv(self, key: tuple):
        self.dist.recv(self.buf, src=self.other)
        return self.buf

    def ack(self, key: tuple) -> None:
        self.dist.send(self.tiny, dst=self.other)

    def wait_ack(self, key: tuple) -> None:
        self.dist.recv(self.tiny, src=self.other)

    def close(self) -> None:
        self.dist.destroy_process_group()


IMPLS = {"distflow": DistflowTransport, "curve": CurveTransport, "pyzmq": PyzmqTransport,
         "gloo": GlooTransport}


def _payload(size: int):
    import torch
    return torch.full((size // 4,), 1.5, dtype=torch.float32)


def _check(y, size: int) -> None:
    if y.numel() * 4 != size or float(y[-1]) != 1.5:
        raise AssertionError(f"received {y.numel() * 4} B ending in {float(y[-1])}, "
                             f"expected {size} B of 1.5")


def stream_trial(tr, rank: int, trial: int, size: int, count: int):
    """Seconds for ``count`` back-to-back messages + one tiny ack (rank 0's clock)."""
    tr.prepare(size)
    if rank == 0:
        x = _payload(size)
        tr.send(x, (trial, -1))  # warm-up and sync: both sides are in this trial
        tr.wait_ack((trial, -1))
        t0 = time.perf_counter()
        for i in range(count):
            tr.send(x, (trial, i))
        tr.wait_ack((trial, count))
        return time.perf_counter() - t0
    _check(tr.recv((trial, -1)), size)
    tr.ack((trial, -1))
    for i in range(count):
        y = tr.recv((trial, i))
    _check(y, size)
    tr.ack((trial, count))
    return None


def pingpong_trial(tr, rank: int, trial: int, size: int, count: int):
    """Seconds of each of ``count`` round trips (data out, tiny ack back)."""
    tr.prepare(size)
    warm = 2
    if rank == 0:
        x = _payload(size)
        times = []
        for i in range(-warm, count):
            t0 = time.perf_counter()
            tr.send(x, (trial, i))
            tr.wait_ack((trial, i))
            if i >= 0:
                times.append(time.perf_counter() - t0)
        return times
    for i in range(-warm, count):
        y = tr.recv((trial, i))
        tr.ack((trial, i))
    _check(y, size)
    return None


def worker(name: str, rank: int, conn, port: int) -> None:
    import torch
    torch.set_num_threads(1)
    try:
        tr = IMPLS[name](rank, conn, port)
        conn.send(("ready", None))
        while True:
            cmd = conn.recv()
            if cmd[0] == "stop":
                break
            fn = stream_trial if cmd[0] == "stream" else pingpong_trial
            conn.send(("ok", fn(tr, rank, *cmd[1:])))
        tr.close()
        conn.send(("closed", None))
    except BaseException:
        conn.send(("error", f"{name} rank {rank}:\n{traceback.format_exc()}"))
        raise


# ================================================================= driver (the parent)

def _get(conn, what: str, timeout: float = TRIAL_TIMEOUT_S):
    if not conn.poll(timeout):
        raise TimeoutError(f"no answer from {what} within {timeout} s")
    try:
        tag, value = conn.recv()
    except EOFError:
        raise RuntimeError(f"worker died in {what}") from None
    if tag == "error":
        raise RuntimeError(f"worker failed in {what}: {value}")
    return value


class Pair:
    """The two worker processes of one transport."""

    def __init__(self, ctx, name: str):
        self.name, self.conns, self.procs = name, [], []
        port = free_port()
        for rank in (0, 1):
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=worker, args=(name, rank, theirs, port), daemon=True,
                            name=f"bench-{name}-{rank}")
            p.start()
            theirs.close()  # so a dead worker reads as EOF here, not as a hang
            self.conns.append(mine)
            self.procs.append(p)

    def connect(self) -> None:
        addrs = {}
        for rank, c in enumerate(self.conns):
            if not c.poll(TRIAL_TIMEOUT_S):
                raise TimeoutError(f"{self.name} rank {rank} did not start")
            addrs[rank] = c.recv()
            if isinstance(addrs[rank], tuple) and addrs[rank][:1] == ("error",):
                raise RuntimeError(f"worker failed in {self.name} set-up: {addrs[rank][1]}")
        for c in self.conns:
            c.send(addrs)
        for rank, c in enumerate(self.conns):
            _get(c, f"{self.name} rank {rank} set-up")

    def run(self, *cmd):
        """Rank 0's answer to ``cmd``; fails fast when either rank fails."""
        for c in self.conns:
            c.send(cmd)
        what = f"{self.name} {cmd[0]} {fmt_size(cmd[2])}"
        pending, answers = dict(enumerate(self.conns)), {}
        deadline = time.monotonic() + TRIAL_TIMEOUT_S
        while pending:
            ready = mp_connection.wait(list(pending.values()), max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"{what}: no answer within {TRIAL_TIMEOUT_S} s")
            for rank, c in list(pending.items()):
                if c in ready:
                    answers[rank] = _get(c, f"{what} rank {rank}", timeout=0)
                    del pending[rank]
        return answers[0]

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)

    def stop(self) -> None:
        for c in self.conns:
            try:
                c.send(("stop",))
            except OSError:
                pass
        for rank, (c, p) in enumerate(zip(self.conns, self.procs)):
            try:
                _get(c, f"{self.name} rank {rank} close", timeout=30)
            except Exception as e:
                print(f"warning: {e}", file=sys.stderr)
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


def machine() -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "host": platform.node(),
            "python": platform.python_version()}


def run(sizes: list[int], repeats: int, quick: bool, transports=TRANSPORTS) -> dict:
    ctx = mp.get_context("spawn")
    pairs = {name: Pair(ctx, name) for name in transports}  # all start in parallel
    ok = False
    try:
        for pair in pairs.values():
            pair.connect()
        thr = {t: {s: [] for s in sizes} for t in transports}
        rtt = {t: {s: [] for s in sizes} for t in transports}
        trial = 0
        for rep in range(repeats):
            order = transports[rep % len(transports):] + transports[:rep % len(transports)]
            for size in sizes:
                k, n = stream_count(size, quick), pingpong_count(size, quick)
                for name in order:
                    trial += 1
                    dt = pairs[name].run("stream", trial, size, k)
                    thr[name][size].append(k * size / dt / 1e6)
                    trial += 1
                    times = pairs[name].run("pingpong", trial, size, n)
                    rtt[name][size].append(statistics.median(times) * 1e6)
                print(f"  repeat {rep + 1}/{repeats} {fmt_size(size):>7}: " + "  ".join(
                    f"{t} {thr[t][size][-1]:8.0f} MB/s {rtt[t][size][-1]:8.0f} us"
                    for t in transports), flush=True)
        ok = True
    finally:
        for pair in pairs.values():
            if ok:
                pair.stop()
            else:  # a failed rank leaves its partner waiting: do not wait for it
                pair.kill()
    results = {}
    for t in transports:
        results[t] = {str(s): {
            "throughput_MBps": max(thr[t][s]),
            "throughput_MBps_median": statistics.median(thr[t][s]),
            "throughput_MBps_trials": thr[t][s],
            "stream_messages": stream_count(s, quick),
            "rtt_us": min(rtt[t][s]),
            "rtt_us_trials": rtt[t][s],
            "pingpongs": pingpong_count(s, quick),
        } for s in sizes}
    return results


def throughput_ratios(results: dict, size: int, other: str,
                      num: str = "distflow") -> tuple[float, float]:
    """``num`` / ``other``: of the best trials, and the median of the per-repeat ratios
    (trials of one repeat ran back to back, so this pairs trials that saw the same noise)."""
    a, b = results[num][str(size)], results[other][str(size)]
    paired = [x / y for x, y in zip(a["throughput_MBps_trials"], b["throughput_MBps_trials"])]
    return a["throughput_MBps"] / b["throughput_MBps"], statistics.median(paired)


def table(sizes: list[int], results: dict) -> str:
    head = (f"{'size':>7} | {'distflow':>8} {'pyzmq':>8} {'gloo':>8} MB/s | best: {'df/zmq':>6} "
            f"{'df/gloo':>7} | paired: {'df/zmq':>6} {'df/gloo':>7} | "
            f"{'distflow':>8} {'pyzmq':>8} {'gloo':>8} RTT us")
    lines = [head, "-" * len(head)]
    for s in sizes:
        tp = [results[t][str(s)]["throughput_MBps"] for t in TRANSPORTS]
        lat = [results[t][str(s)]["rtt_us"] for t in TRANSPORTS]
        (zb, zp), (gb, gp) = throughput_ratios(results, s, "pyzmq"), throughput_ratios(results, s, "gloo")
        lines.append(f"{fmt_size(s):>7} | {tp[0]:8.0f} {tp[1]:8.0f} {tp[2]:8.0f}      | "
                     f"      {zb:6.2f} {gb:7.2f} |         {zp:6.2f} {gp:7.2f} | "
                     f"{lat[0]:8.0f} {lat[1]:8.0f} {lat[2]:8.0f}")
    if "curve" in results:
        lines += ["", f"{'size':>7} | {'curve':>8} MB/s | curve/distflow best; paired | "
                      f"curve/gloo best; paired | {'curve':>8} {'distflow':>8} RTT us"]
        for s in sizes:
            (db, dp), (gb, gp) = (throughput_ratios(results, s, o, "curve")
                                  for o in ("distflow", "gloo"))
            lines.append(f"{fmt_size(s):>7} | {results['curve'][str(s)]['throughput_MBps']:8.0f}      | "
                         f"{db:19.2f}; {dp:6.2f} | {gb:15.2f}; {gp:6.2f} | "
                         f"{results['curve'][str(s)]['rtt_us']:8.0f} "
                         f"{results['distflow'][str(s)]['rtt_us']:8.0f}")
    return "\n".join(lines)


def plot(sizes: list[int], results: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for t, m in zip(results, "osv^"):
        a.plot(sizes, [results[t][str(s)]["throughput_MBps"] for s in sizes], marker=m, label=t)
        b.plot(sizes, [results[t][str(s)]["rtt_us"] for s in sizes], marker=m, label=t)
    for ax, ylabel in ((a, "one-way throughput (MB/s, best of trials)"),
                       (b, "round-trip latency (us, median, best of trials)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes, [fmt_size(s).replace(" ", "") for s in sizes], rotation=45)
        ax.set_xlabel("payload (one float32 tensor)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=lambda v: [parse_size(s) for s in v.split(",") if s],
                    help="comma-separated payload sizes, e.g. 4K,1M,64M (default: 1K..64M)")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: sizes {','.join(fmt_size(s) for s in QUICK_SIZES)}, "
                         "fewer messages, 1 repeat (< 30 s)")
    ap.add_argument("--tcp", action="store_true",
                    help="distflow and raw pyzmq over TCP loopback (default: a local abstract "
                         "Unix socket where available, as distflow's Peer picks for a peer on "
                         "the same machine; gloo is TCP either way)")
    ap.add_argument("--curve", action="store_true",
                    help="also distflow with transport.encrypt=true (ZeroMQ CURVE)")
    ap.add_argument("--repeats", type=int, help="trials per transport and size (default 5, quick 1)")
    ap.add_argument("--out", type=Path, default=RESULTS / "transport.json",
                    help="JSON path; the PNG goes next to it with suffix .png")
    args = ap.parse_args(argv)
    args.command = " ".join(["python", "benchmarks/transport.py", *(sys.argv[1:] if argv is None else argv)])
    return args


def measure(args: argparse.Namespace) -> dict:
    """Every transport at every size; the JSON document (results, ratios, machine, method)."""
    if args.tcp:
        os.environ["DISTFLOW_BENCH_TCP"] = "1"  # read by the spawned workers
    from distflow.transport.peer import local_id
    endpoint_kind = "tcp" if args.tcp or not local_id() else "ipc (abstract Unix socket)"
    sizes = sorted(set(args.sizes or (QUICK_SIZES if args.quick else SIZES)))
    repeats = args.repeats or (1 if args.quick else 5)
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    info = machine()
    print(f"{when}  {info['nproc']} CPU ({info['cpu']})  loopback  {args.command}", flush=True)

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    # every Peer authenticates with the run's secret; the spawned workers inherit it
    os.environ.setdefault("DISTFLOW_SECRET", secrets.token_hex(32))
    results = run(sizes, repeats, args.quick, WITH_CURVE if args.curve else TRANSPORTS)
    elapsed = time.perf_counter() - t0
    info["loadavg_1min_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]

    import torch
    import zmq
    ratios = {}
    for s in sizes:
        (zb, zp), (gb, gp) = throughput_ratios(results, s, "pyzmq"), throughput_ratios(results, s, "gloo")
        ratios[str(s)] = {"distflow/pyzmq": zb, "distflow/gloo": gb,
                          "distflow/pyzmq_paired_median": zp, "distflow/gloo_paired_median": gp}
        if args.curve:
            for other in ("distflow", "gloo"):
                b, p = throughput_ratios(results, s, other, "curve")
                ratios[str(s)].update({f"curve/{other}": b, f"curve/{other}_paired_median": p})
    return {
        "benchmark": "transport", "date": when, "command": args.command, "elapsed_s": round(elapsed, 1),
        "machine": {**info, "network": "loopback 127.0.0.1"},
        "zmq_endpoints": endpoint_kind, "gloo_endpoints": "tcp",
        "versions": {"torch": torch.__version__, "pyzmq": zmq.__version__,
                     "libzmq": zmq.zmq_version()},
        "method": {
            "payload": "one float32 tensor of `size` bytes",
            "throughput": "rank 0 sends `stream_messages` back to back, rank 1 acks once at the "
                          "end; MB/s = 10^6 B/s; best of `repeats` trials",
            "ratios": "of the best trials, and (`_paired_median`) the median over repeats of "
                      "the ratio of the two trials in that repeat",
            "rtt": "median round trip (payload out, tiny ack back) over `pingpongs`; best of "
                   "`repeats` trials",
            "repeats": repeats, "quick": args.quick,
        },
        "sizes": sizes, "results": results, "ratios": ratios,
    }


def report(doc: dict, args: argparse.Namespace) -> None:
    """The JSON, the plot next to it, and the table on stdout."""
    sizes, results, info = doc["sizes"], doc["results"], doc["machine"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    png = args.out.with_suffix(".png")
    plot(sizes, results, png, f"distflow data plane vs raw pyzmq vs gloo, 2 processes on loopback; "
                              f"{info['nproc']} CPU {info['cpu']}; {doc['date']}")
    print()
    print(table(sizes, results))
    print(f"\n{doc['elapsed_s']:.0f} s (1-min load average {info['loadavg_1min_before_after'][0]} before, "
          f"{info['loadavg_1min_before_after'][1]} after); wrote {args.out} and {png}")


main = main_of(parse, measure, report)

if __name__ == "__main__":
    sys.exit(main())
