"""Where a mid-shape GRPO step's time goes on the CPU: one worker's share of a step of
``vs_trl.py --shape mid --task reverse_ragged`` (4 prompts x 8 samples, responses of
the given mean length), run stage by stage in one process and one thread, with the
share of each stage spent in matrix products (``torch.profiler``) and the achieved
GFLOP/s (model FLOPs: 2 x parameters per token forward, 6 x with backward).

    python benchmarks/profile_mid_step.py --response-len 50
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--response-len", type=int, default=50, help="mean response length (uniform 1..2x-1)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from torch.profiler import profile

    from distflow import Batch
    from distflow.algos import logprobs_from_logits
    from distflow.engines.generation import InferenceEngine, left_pad
    from distflow.engines.sampling import SamplingParams
    from distflow.models import CharTokenizer, DecoderLM, preset
    from distflow.rl.stages import response_logits
    from distflow.rl.tasks import get_task

    task = get_task("reverse_ragged")
    tok = CharTokenizer(task.alphabet)
    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                             hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                             num_attention_heads=8, num_key_value_heads=2))
    params = sum(p.numel() for p in model.parameters())
    texts = task.prompts(4, 0, 0)
    tokens, mask = left_pad([tok.encode(t) for t in texts], tok.pad_id, task.max_prompt_len)
    tokens, mask = tokens.repeat_interleave(8, 0), mask.repeat_interleave(8, 0)
    g = torch.Generator().manual_seed(0)
    n, r = len(tokens), args.max_new_tokens
    rlen = torch.randint(1, min(2 * args.response_len, r + 1), (n,), generator=g)
    rmask = torch.arange(r)[None] < rlen[:, None]
    resp = torch.where(rmask, torch.randint(3, tok.vocab_size, (n, r), generator=g), torch.zeros((n, r), dtype=torch.int64))
    batch = Batch({"prompts": tokens, "prompt_mask": mask, "responses": resp, "response_mask": rmask},
                  torch.arange(n), mask.sum(1) + rlen)
    real = int(batch.lengths.sum())
    unique_prompt = int(mask.sum()) // 8

    def train():
        model.zero_grad()
        logp = logprobs_from_logits(response_logits(model, batch), batch["responses"])
        (logp * rmask).sum().backward()

    def ref():
        with torch.no_grad():
            logprobs_from_logits(response_logits(model, batch), batch["responses"])

    eng = InferenceEngine(model, tok.eos_id, tok.pad_id)

    def gen():
        eng.generate_padded(tokens, mask, SamplingParams(temperature=1.0, max_new_tokens=r),
                            row_seeds=torch.arange(n))

    out = {}
    for name, fn, mult in (("generation", gen, 2), ("reference", ref, 2), ("update", train, 6)):
        fn()
        t0 = time.perf_counter()
        with profile() as prof:
            fn()
        dt = time.perf_counter() - t0
        ev = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in ev)
        mm = sum(e.self_cpu_time_total for e in ev if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"))
        attn = sum(e.self_cpu_time_total for e in ev if "attention" in e.key or "softmax" in e.key)
        top = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:6]
        flop_tokens = real if name != "generation" else None
        out[name] = {"wall_s": dt, "matmul_share": mm / total, "attention_share": attn / total,
                     "top": [(e.key, round(e.self_cpu_time_total / total, 3)) for e in top]}
        if flop_tokens:
            out[name]["model_gflops"] = mult * params * (real - 7 * unique_prompt) / dt / 1e9
    doc = {"params": vars(args), "num_parameters": params, "real_tokens": real, "samples": n,
           "loadavg_1m": os.getloadavg()[0], "stages": out}
    print(json.dumps(doc, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
