"""Training throughput and model FLOPs utilization (MFU) of ``TrainEngine``.

One optimizer step = forward + backward + AdamW over ``--tokens`` tokens (rows of
``--seq`` random tokens, next-token cross-entropy), split into micro-batches by
``OptimConfig.micro_batch_tokens`` (``--micro-batch-tokens``), exactly as the RL
trainers use it; on CUDA under bf16 autocast (``TrainEngine``'s), float32 weights.

MFU = model FLOPs per second / ``--peak-tflops``; model FLOPs per token = 6 x (parameters
in matmuls: every linear layer, the lm_head included, the embedding lookup excluded)
+ 12 x layers x hidden x seq / 2 (causal attention scores and values, forward and
backward). The default peak, 989 TFLOP/s, is the dense bf16 figure of an H100/H200 SXM.

    python benchmarks/train_mfu.py --device cuda --preset qwen2-0.5b     # the GPU check
    python benchmarks/train_mfu.py --quick                               # CPU smoke run

Writes ``benchmarks/results/train_mfu.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import cpu_model, git_state  # noqa: E402

HERE = Path(__file__).resolve().parent


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen2-0.5b")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tokens", type=int, default=65536, help="tokens per optimizer step")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--micro-batch-tokens", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=8, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--quick", action="store_true", help="tiny shape, a few steps (CPU smoke run)")
    ap.add_argument("--out", default=str(HERE / "results" / "train_mfu.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.tokens, args.seq, args.micro_batch_tokens, args.steps = "tiny", 512, 64, 256, 2
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but CUDA is not available")
    args.argv = argv if argv is not None else sys.argv[1:]
    return args


def model_flops_per_token(model, seq: int) -> float:
    c = model.config
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 6.0 * matmul + 12.0 * c.num_hidden_layers * c.hidden_size * seq / 2


def run(args) -> dict:
    from distflow.engines.training import OptimConfig, TrainEngine
    from distflow.models import DecoderLM, preset

    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", vocab_size=64) if args.preset == "tiny"
                      else preset(args.preset)).to(args.device)
    engine = TrainEngine(model, OptimConfig(lr=1e-5, micro_batch_tokens=args.micro_batch_tokens))
    rows = max(args.tokens // args.seq, 1)
    data = torch.randint(0, model.config.vocab_size, (rows, args.seq + 1), device=args.device)
    lengths = torch.full((rows,), args.seq)

    def loss_fn(index):
        ids = data[index.to(args.device)]
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        return loss, {"tokens": float(ids[:, 1:].numel())}

    def step():
        engine.step(rows, lengths, loss_fn, normalizer=float(rows * args.seq))
        if args.device == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        step()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    tokens = rows * args.seq
    flops = model_flops_per_token(model, args.seq) * tokens / med
    return {
        "benchmark": "train_mfu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(["benchmarks/train_mfu.py", *args.argv]),
        "git": git_state(),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                    "loadavg_1m": os.getloadavg()[0]},
        "params": {"preset": args.preset, "device": args.device, "tokens_per_step": tokens, "seq": args.seq,
                   "micro_batch_tokens": args.micro_batch_tokens, "steps": args.steps,
                   "num_parameters": model.num_parameters(), "peak_tflops": args.peak_tflops},
        "median_step_s": med, "tokens_per_s": tokens / med, "model_tflops": flops / 1e12,
        "mfu": flops / (args.peak_tflops * 1e12),
        "peak_allocated_gb": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None,
    }


def report(doc: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    p = doc["params"]
    print(f"train_mfu: {p['preset']} ({p['num_parameters'] / 1e6:.1f}M) on {p['device']}, {p['tokens_per_step']} "
          f"tokens/step (seq {p['seq']}): median step {doc['median_step_s']:.3f} s, "
          f"{doc['tokens_per_s']:.0f} tokens/s, {doc['model_tflops']:.2f} TFLOP/s, MFU {doc['mfu']:.1%} of "
          f"{p['peak_tflops']:g} -> {out}")


def main(argv=None) -> int:
    args = parse(argv)
    report(run(args), Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
