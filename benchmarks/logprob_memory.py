"""Peak memory of the actor update's log-prob head: the full [N, R, V] logits
(``logprobs_from_logits`` + ``entropy_from_logits``, as ``response_logprobs`` does below
``LOGITS_BUDGET``) vs the lm head applied in budgeted chunks, recomputed in backward
(``logprobs_from_hidden``). From the final hidden states [N, R, H] and the head weight
[V, H], both requiring gradients: log-probs with gradient, entropy as a metric, then
backward of an advantage-weighted sum.

Each way runs in a fresh process (``MALLOC_MMAP_THRESHOLD_`` pinned so every large
tensor is its own mapping and freed memory leaves the resident set at once) and reports
the growth of peak resident memory over what the inputs already take (``VmHWM - VmRSS``
over the second of two identical passes, the peak reset in between through
``/proc/self/clear_refs``; the gradients of hidden and weight are counted), the largest
tensor any op returned (a ``TorchDispatchMode`` over a third pass) and the wall time of
the measured pass.

    python benchmarks/logprob_memory.py --n 8 --r 256 --vocab 32000 --hidden 256 --budgets 0,16,64
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's distflow

MB = float(1 << 20)


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _one(n: int, r: int, vocab: int, hidden: int, budget_mb: int) -> dict:
    """One way in this process: budget 0 = the full logits."""
    import torch
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    from distflow.algos import entropy_from_logits, logprobs_from_hidden, logprobs_from_logits

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, r, hidden, generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).requires_grad_()
    tokens = torch.randint(0, vocab, (n, r), generator=g)
    adv = torch.randn(n, r, generator=g)

    def step():
        if budget_mb == 0:
            logits = F.linear(h, w)
            logp = logprobs_from_logits(logits, tokens)
            with torch.no_grad():
                ent = entropy_from_logits(logits)
            del logits
        else:
            logp, ent = logprobs_from_hidden(h, w, tokens, entropy=True, budget=budget_mb << 20)
            ent = ent.detach()
        (logp * adv).sum().backward()
        return float(ent.sum())

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.largest = max(Largest.largest, t.untyped_storage().nbytes())
            return out

    step()                                    # warm-up: lazy initialisation, thread pools
    h.grad = w.grad = None
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")                         # reset the peak (VmHWM) to the current RSS
    before = _status_bytes("VmRSS:")
    t0 = time.perf_counter()
    step()
    wall = time.perf_counter() - t0
    peak = _status_bytes("VmHWM:") - before
    h.grad = w.grad = None
    with Largest():
        step()
    return {"budget_mb": budget_mb, "peak_rss_growth_mb": round(peak / MB, 1),
            "largest_tensor_mb": round(Largest.largest / MB, 1), "wall_s": round(wall, 2),
            "full_logits_mb": round(n * r * vocab * 4 / MB, 1),
            "chunk_tokens": max(1, (budget_mb << 20) // (4 * vocab)) if budget_mb else n * r}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--r", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--budgets", default="0,16,64", help="MiB per chunk; 0 = the full logits")
    ap.add_argument("--out", default="")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child: one budget
    args = ap.parse_args(argv)
    shape = (args.n, args.r, args.vocab, args.hidden)
    if args.one is not None:
        print(json.dumps(_one(*shape, args.one)))
        return 0
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        out = subprocess.run([sys.executable, __file__, "--n", str(args.n), "--r", str(args.r),
                              "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--one", str(budget)],
                             env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"n": args.n, "r": args.r, "vocab": args.vocab, "hidden": args.hidden, "results": rows},
                      fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
