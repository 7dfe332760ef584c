"""Generation benchmark: distflow's ``InferenceEngine`` vs transformers' ``generate``.

One random-weight Qwen2-shaped model, built with transformers
(``Qwen2ForCausalLM(Qwen2Config(...))``), saved with ``save_pretrained`` to a temp dir and
loaded into distflow with ``distflow.models.load_pretrained``: the two implementations run
the very same weights. Same batch of ragged prompts (transformers gets them left-padded
with an ``attention_mask``; distflow left-pads them itself), same ``max_new_tokens``,
greedy decoding.

End of generation (``--eos``):

- ``none``: no EOS stop on either side (transformers: ``eos_token_id=None`` and
  ``min_new_tokens = max_new_tokens``; distflow: an EOS id no token can equal), so both
  produce exactly ``batch * max_new_tokens`` tokens per call;
- ``ragged`` (what RL generation looks like): an end token chosen so that rows end at
  very different steps. A pilot greedy run without any stop picks, among the tokens
  generated, the one with the largest product of rows it occurs in and distinct steps of
  its first occurrences; both sides
  then stop each row at it (transformers ``eos_token_id``, finished rows padded). Rows
  that never produce it run to ``max_new_tokens``; ids below 3 (pad and the usual special
  slots) are never picked. ``--init-std`` (default 0.1 with ``ragged``) draws the weights
  wider than transformers' init (0.02), whose greedy text repeats one token forever and
  would never end rows at different steps.

Measurements:

- tokens/s = generated tokens (each row's tokens up to and including its end token) /
  wall time of one generate call (prefill included); the implementations alternate (A B
  C, C B A, ...) over ``--repeats`` rounds after one warm-up call each, and the median of
  each is reported, with the ratio distflow / transformers (the faster of transformers'
  dynamic cache and, with ``--static``, its static cache ``cache_implementation="static"``);
- greedy parity: the share of generated tokens that are equal at the same position
  (``token_match``) and of rows that are identical, end included (``row_match``). For
  each row that differs, the first differing position is checked by a full recompute (no
  KV cache, unpadded sequence, transformers' model cast to float64) of the argmax after
  the common prefix: it says which side picked the true greedy token, and the float64 gap
  between the top two logits there (a tiny gap means a near-tie that float32 rounding may
  flip).

    python benchmarks/generation.py                                  # small CPU config, < 2 min
    python benchmarks/generation.py --preset mid --eos ragged --batch 128 --max-new-tokens 128 --static --threads 1
    python benchmarks/generation.py --preset qwen2-0.5b --device cuda --dtype bfloat16 --batch 256 --static

Writes ``benchmarks/results/generation.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import cpu_model, git_state  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# "small": a CPU-sized Qwen2 (GQA 4 query heads over 2 kv heads, q/k/v biases).
SMALL = dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
             rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)


# "mid": 22.6M parameters (tied 32-token embedding, like the char vocab of the RL tasks), the shape where RL
# generation time goes to the matmuls rather than per-op overhead.
MID = dict(SMALL, vocab_size=32, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
           num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)


def qwen2_kwargs(name: str) -> dict:
    """``Qwen2Config`` keyword arguments for ``small``, ``mid`` or a distflow preset name."""
    if name == "small":
        return dict(SMALL)
    if name == "mid":
        return dict(MID)
    from distflow.models.config import PRESETS
    if name not in PRESETS:
        raise SystemExit(f"unknown preset {name!r}; known: small, {', '.join(sorted(PRESETS))}")
    p = dict(PRESETS[name])
    if p.get("model_type", "qwen2") != "qwen2":
        raise SystemExit(f"preset {name!r} is not a Qwen2 shape")
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta",
            "tie_word_embeddings")
    return {k: p[k] for k in keys if k in p}


def build_models(kwargs: dict, device: str, dtype: torch.dtype, seed: int, directory: Path,
                 init_std: float = 0.0):
    """(transformers model, distflow model) with identical random weights (matrices drawn
    with std ``init_std`` when it is not 0)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from distflow.models import load_pretrained

    torch.manual_seed(seed)
    # No bos/eos/pad ids: nothing may stop generation early.
    config = Qwen2Config(**kwargs, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = Qwen2ForCausalLM(config)
    if init_std:
        with torch.no_grad():
            for p in hf.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, init_std)
    hf.save_pretrained(directory)
    hf = hf.to(device=device, dtype=dtype).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = None
    ours = load_pretrained(directory, dtype=dtype, device=device).eval()
    return hf, ours


def make_prompts(batch: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # ids >= 3: keep clear of the usual special slots (0 pad here)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(batch)]


def hf_inputs(prompts: list[list[int]], pad_id: int, device: str):
    from distflow.engines.generation import left_pad
    tokens, mask = left_pad(prompts, pad_id)
    return tokens.to(device), mask.long().to(device)


def run_hf(model, input_ids, attention_mask, max_new: int, pad_id: int, eos: int | None,
           static: bool = False) -> torch.Tensor:
    """[B, max_new] generated tokens, ``pad_id`` after a row's end token."""
    extra = {"cache_implementation": "static"} if static else {}
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                             max_new_tokens=max_new, min_new_tokens=max_new if eos is None else 0,
                             eos_token_id=eos, pad_token_id=pad_id, use_cache=True, num_beams=1,
                             temperature=None, top_p=None, top_k=None, **extra)
    out = out[:, input_ids.shape[1]:]
    return torch.nn.functional.pad(out, (0, max_new - out.shape[1]), value=pad_id)


def run_ours(engine, prompts, max_new: int) -> torch.Tensor:
    """[B, max_new] generated tokens, ``pad_id`` after a row's end token."""
    from distflow.engines.sampling import SamplingParams
    gen = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=max_new))
    return torch.nn.functional.pad(gen.responses, (0, max_new - gen.responses.shape[1]), value=engine.pad_id)


def generated_lengths(tokens: torch.Tensor, eos: int | None) -> torch.Tensor:
    """[B] tokens each row generated: up to and including its first ``eos``."""
    if eos is None:
        return torch.full((tokens.shape[0],), tokens.shape[1])
    hit = tokens == eos
    first = torch.where(hit.any(1), hit.int().argmax(1) + 1, torch.full((tokens.shape[0],), tokens.shape[1]))
    return first


def ragged_eos(engine, prompts, max_new: int) -> int:
    """The token that, in a stop-free greedy run, ends the most rows at the most distinct
    steps (the largest product of rows it occurs in and distinct first-occurrence steps):
    rows then end at very different steps, most before ``max_new``."""
    free = run_ours(engine, prompts, max_new)
    best, score = -1, -1
    for tok in torch.unique(free).tolist():
        if tok < 3:  # never the pad id (0) or the other usual special slots
            continue
        hit = free == tok
        rows = hit.any(1)
        firsts = set(hit.int().argmax(1)[rows].tolist())
        if len(firsts) * int(rows.sum()) > score:
            best, score = tok, len(firsts) * int(rows.sum())
    return best


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


@torch.no_grad()
def investigate(hf_model, prompts, ours_tok: torch.Tensor, hf_tok: torch.Tensor, device: str,
                limit: int) -> dict:
    """For each row that differs (up to ``limit``), the full-recompute float64 argmax at the
    first differing position: which side picked it, and the top-2 logit gap there."""
    ours_tok, hf_tok = ours_tok.cpu(), hf_tok.cpu()
    diff_rows = [i for i in range(len(prompts)) if not torch.equal(ours_tok[i], hf_tok[i])]
    if not diff_rows:
        return {"rows_checked": 0, "distflow_right": 0, "transformers_right": 0, "neither": 0,
                "details": []}
    # The float64 copy lives on the CPU: slow but exact enough, and no extra GPU memory.
    ref = type(hf_model)(hf_model.config).to(torch.float64)
    ref.load_state_dict({k: v.detach().to("cpu", torch.float64)
                         for k, v in hf_model.state_dict().items()})
    ref.eval()
    details = []
    for i in diff_rows[:limit]:
        t = int((ours_tok[i] != hf_tok[i]).nonzero()[0])
        seq = torch.tensor(prompts[i] + ours_tok[i, :t].tolist())[None]
        logits = ref(input_ids=seq).logits[0, -1]
        top2 = torch.topk(logits, 2)
        truth = int(top2.indices[0])
        details.append({"row": i, "position": t, "distflow": int(ours_tok[i, t]),
                        "transformers": int(hf_tok[i, t]), "fp64_argmax": truth,
                        "fp64_top2_gap": float(top2.values[0] - top2.values[1]),
                        "fp64_logit_distflow": float(logits[int(ours_tok[i, t])]),
                        "fp64_logit_transformers": float(logits[int(hf_tok[i, t])])})
    return {"rows_checked": len(details),
            "distflow_right": sum(d["distflow"] == d["fp64_argmax"] for d in details),
            "transformers_right": sum(d["transformers"] == d["fp64_argmax"] for d in details),
            "neither": sum(d["fp64_argmax"] not in (d["distflow"], d["transformers"]) for d in details),
            "details": details}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help="small (default), mid (22.6M) or a distflow Qwen2 "
                    "preset, e.g. qwen2-0.5b")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-min", type=int, default=16)
    ap.add_argument("--prompt-max", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--eos", default="none", choices=["none", "ragged"],
                    help="none: every row generates max_new_tokens; ragged: rows end at an end token "
                         "chosen so that they end at very different steps")
    ap.add_argument("--init-std", type=float, default=None,
                    help="std of the random weight matrices (default: 0.1 with --eos ragged, else "
                         "transformers' init)")
    ap.add_argument("--static", action="store_true",
                    help="also time transformers with its static cache (cache_implementation='static')")
    ap.add_argument("--repeats", type=int, default=11, help="timed calls per implementation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default=str(RESULTS / "generation.json"))
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but CUDA is not available")
    if args.init_std is None:
        args.init_std = 0.1 if args.eos == "ragged" else 0.0
    args.argv = argv if argv is not None else sys.argv[1:]
    return args


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    kwargs = qwen2_kwargs(args.preset)
    pad_id = 0
    t_start = time.perf_counter()

    import transformers

    from distflow.engines.generation import InferenceEngine

    with tempfile.TemporaryDirectory(prefix="distflow-genbench-") as tmp:
        hf, ours = build_models(kwargs, args.device, dtype, args.seed, Path(tmp), args.init_std)
    prompts = make_prompts(args.batch, args.prompt_min, args.prompt_max, kwargs["vocab_size"], args.seed)
    input_ids, attention_mask = hf_inputs(prompts, pad_id, args.device)
    context = args.prompt_max + args.max_new_tokens
    eos = None
    if args.eos == "ragged":
        eos = ragged_eos(InferenceEngine(ours, eos_id=-1, pad_id=pad_id, max_context=context), prompts,
                         args.max_new_tokens)
    # eos_id=-1: no token id equals it, so distflow never stops early either.
    engine = InferenceEngine(ours, eos_id=-1 if eos is None else eos, pad_id=pad_id, max_context=context)
    impls = {
        "distflow": lambda: run_ours(engine, prompts, args.max_new_tokens),
        "transformers": lambda: run_hf(hf, input_ids, attention_mask, args.max_new_tokens, pad_id, eos),
    }
    if args.static:
        impls["transformers_static"] = lambda: run_hf(hf, input_ids, attention_mask, args.max_new_tokens,
                                                      pad_id, eos, static=True)
    outputs = {}
    for name, fn in impls.items():  # warm-up (and the tokens compared below)
        _, outputs[name] = timed(fn, args.device)
    for name, out in outputs.items():
        if tuple(out.shape) != (args.batch, args.max_new_tokens):
            raise RuntimeError(f"{name} generated {tuple(out.shape)} tokens, expected "
                               f"{(args.batch, args.max_new_tokens)}")
    lengths_of = {name: generated_lengths(out.cpu(), eos) for name, out in outputs.items()}
    times: dict[str, list[float]] = {name: [] for name in impls}
    order = list(impls)
    for r in range(args.repeats):
        for name in (order if r % 2 == 0 else order[::-1]):
            dt, out = timed(impls[name], args.device)
            times[name].append(dt)
            if not torch.equal(out.cpu(), outputs[name].cpu()):
                raise RuntimeError(f"{name}: greedy output changed between calls")

    ours_tok, hf_tok = outputs["distflow"].cpu(), outputs["transformers"].cpu()
    same = ours_tok == hf_tok  # both pad after the end token
    token_match = float(same.float().mean())
    row_match = float(same.all(1).float().mean())
    first_diff = [int((~s).nonzero()[0]) if not bool(s.all()) else args.max_new_tokens for s in same]
    check = investigate(hf, prompts, ours_tok, hf_tok, args.device, limit=args.batch)
    static_same = (bool(torch.equal(outputs["transformers_static"].cpu(), hf_tok))
                   if "transformers_static" in outputs else None)

    res = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        n_tokens = int(lengths_of[name].sum())
        res[name] = {"median_s": med, "tokens": n_tokens, "tokens_per_s": n_tokens / med,
                     "min_s": min(ts), "max_s": max(ts), "times_s": ts}
    baseline = max((n for n in res if n != "distflow"), key=lambda n: res[n]["tokens_per_s"])
    ratio = res["distflow"]["tokens_per_s"] / res[baseline]["tokens_per_s"]
    gen_len = lengths_of["distflow"].tolist()
    lengths = [len(p) for p in prompts]
    params = {"preset": args.preset, "model": kwargs, "device": args.device, "dtype": args.dtype,
              "batch": args.batch, "prompt_len_min": min(lengths), "prompt_len_max": max(lengths),
              "prompt_len_mean": statistics.mean(lengths), "max_new_tokens": args.max_new_tokens,
              "eos": args.eos, "eos_id": eos, "init_std": args.init_std,
              "generated_len_min": min(gen_len), "generated_len_max": max(gen_len),
              "generated_len_mean": statistics.mean(gen_len), "distinct_generated_lengths": len(set(gen_len)),
              "repeats": args.repeats, "seed": args.seed, "torch_threads": torch.get_num_threads(),
              "num_parameters": sum(p.numel() for p in ours.parameters())}
    return {
        "benchmark": "generation",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([os.path.relpath(__file__, HERE.parent), *args.argv]),
        "git": git_state(),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
                    "loadavg_1m": os.getloadavg()[0]},
        "params": params,
        "results": res,
        "baseline": baseline,
        "ratio_distflow_over_transformers": ratio,
        "greedy": {"token_match": token_match, "row_match": row_match,
                   "mean_matching_prefix": statistics.mean(first_diff), "check": check,
                   "static_cache_same_tokens_as_dynamic": static_same},
        "wall_s": time.perf_counter() - t_start,
    }


def report(doc: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    p, res, g = doc["params"], doc["results"], doc["greedy"]
    print(f"generation: {p['preset']} ({p['num_parameters'] / 1e6:.1f}M params, {p['dtype']}) on "
          f"{p['device']}, batch {p['batch']}, prompts {p['prompt_len_min']}..{p['prompt_len_max']} tokens, "
          f"up to {p['max_new_tokens']} new tokens (eos {p['eos']}: generated {p['generated_len_min']}.."
          f"{p['generated_len_max']}, mean {p['generated_len_mean']:.1f}), greedy, {p['repeats']} "
          f"interleaved repeats, load {doc['machine']['loadavg_1m']:.1f}")
    print("| implementation | median s/call | tokens/call | tokens/s | min s | max s |")
    print("|---|---|---|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {r['median_s']:.3f} | {r['tokens']} | {r['tokens_per_s']:.0f} | {r['min_s']:.3f} | "
              f"{r['max_s']:.3f} |")
    print(f"distflow / {doc['baseline']} tokens/s: {doc['ratio_distflow_over_transformers']:.2f}x")
    print(f"greedy parity: {g['token_match']:.1%} of tokens, {g['row_match']:.1%} of rows identical "
          f"(mean matching prefix {g['mean_matching_prefix']:.1f}/{p['max_new_tokens']})")
    check = g["check"]
    if check["rows_checked"]:
        print(f"  first differences, fp64 full-recompute argmax: distflow right {check['distflow_right']}, "
              f"transformers right {check['transformers_right']}, neither {check['neither']} "
              f"(of {check['rows_checked']}); top-2 gaps "
              + ", ".join(f"{d['fp64_top2_gap']:.2e}" for d in check["details"]))
    print(f"-> {out} ({doc['wall_s']:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    report(run(args), Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
