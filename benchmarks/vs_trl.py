"""distflow GRPO vs TRL's ``GRPOTrainer``: throughput and reward curve on this CPU.

Both systems train the same Qwen2-shaped model (``--shape``: ``tiny``, the preset of
``distflow.models.config``, 75k parameters; ``mid``, hidden 512, intermediate 1408, 8
layers, 8 heads / 2 KV heads, 22.6M parameters; ``qwen2-0.5b``, that preset's shape;
random init, vocab from the task's ``CharTokenizer``) from the very same initial weights
(one checkpoint directory, written with ``distflow.models.save_pretrained``, loaded by
distflow with ``model=DIR`` and by TRL with ``AutoModelForCausalLM``), on the same task
(``--task``: ``reverse``, 2 digits; ``reverse_ragged``, 1-64 digits, so answers of 1-64
tokens): the task's prompts, step by step the very same ones (``task.prompts(n, seed,
step)``; TRL gets them in that order with ``shuffle_dataset=False``), scored by the same
function (``ReverseTask.reward``). Same settings on both sides:

- ``--prompts`` prompts x ``--group-size`` completions per step (TRL:
  ``per_device_train_batch_size = prompts * group_size``, ``num_generations =
  group_size``, one optimizer step per generation batch, ``num_iterations = 1``);
- ``--max-new-tokens`` completion tokens (TRL ``max_completion_length``), EOS ends a
  completion early on both sides; the prompts are the digits and "=" ("37=", no BOS),
  left-padded on both;
- sampling at temperature 1.0, top_p 1, top_k 0;
- GRPO advantages normalized by the group's (unbiased) std; token-mean loss over the
  whole batch (TRL ``loss_type="dapo"``; distflow divides by the global token count);
  PPO clip 0.2 (a no-op here: one update per batch, ratio 1); KL to the reference with
  the k3 estimator (distflow ``low_var_kl``), ``beta = kl_coef``;
- AdamW lr ``--lr`` constant (TRL ``lr_scheduler_type="constant"``, no warm-up), betas
  (0.9, 0.95) (distflow's; TRL ``adam_beta2=0.95``), no weight decay, grad-norm clip 1.0;
- float32, CPU (``--device cuda``: TRL with ``use_cpu=False``, ``bf16=True``; distflow
  with bf16 autocast in training, float32 weights):
  TRL with ``use_cpu=True``, ``bf16=False``, ``use_vllm=False``, no eval, no
  checkpoint, ``report_to="none"``, default logging (every 10 steps), and
  ``gradient_checkpointing=False`` (TRL's config turns it on by default; distflow does not
  checkpoint activations, and it would only slow TRL down).

Differences left: the advantage epsilon (TRL 1e-4, distflow 1e-6), distflow clamps the
k3 KL to [0, 10]; the random streams differ, so the two reward curves are two samples of
the same process, not the same trajectory. TRL 1.16 has no ``max_prompt_length`` option;
the prompts are 3 tokens on both sides anyway.

Runs: distflow with ``distflow run pipelines/grpo.py --nproc N`` (its normal main-job
path: torchrun, N workers, co-located stages, OMP_NUM_THREADS = cores / N as its CLI
sets), TRL in one process (a child of this script), once per ``--trl-threads`` setting:
by default with torch's default threads (all cores) and with OMP_NUM_THREADS=1. On a
shared 2-core box a 2-thread OpenMP process stalls at every parallel region whenever
another process holds a core (TRL's step time then jumps from ~0.05 s to 1-4 s), so the
speedup is taken against the FASTEST TRL setting, and a TRL run that goes past
``--trl-budget`` seconds is stopped and reported as truncated (its throughput counts, its
reward curve is left out). ``--rounds`` rounds (seeds seed, seed+1, ...; each round its own
initial model, shared by all systems), the systems' order alternating between rounds.

Measurements:

- samples/s = completions generated and trained per second of wall time, excluding
  start-up: the samples of the steps after the first timed step end over the time from
  its end to the end of the last step. distflow: the arrival times of the lines of
  ``metrics.jsonl`` (polled every 20 ms; rank 0 writes a step's line when the next step
  ends, so the first line marks the end of step 2 and ``steps - 2`` steps are timed);
  TRL: ``TrainerCallback.on_step_end`` times (``steps - 1`` steps timed).
  Cross-check: the same samples over the sum of per-step times of steps 2.. (distflow's
  ``timing_s/step``; TRL's ``on_step_begin`` -> ``on_step_end``);
- reward per step: distflow's ``reward/mean``; TRL: the mean of the reward function's
  values for the step's batch (recorded by the reward function itself, no extra logging);
- over the rounds: the median of each system's samples/s; the reward figures (mean reward
  over all steps and over the last ``--tail`` steps) and the plotted curve are means over
  the rounds. distflow's reward figures are compared with one complete TRL run per round
  (seed): the thread setting does not change TRL's math (same seed, same curve).

    python benchmarks/vs_trl.py                         # 3 rounds x 100 steps each, 3.5-6 min on 2 shared cores
    python benchmarks/vs_trl.py --steps 20 --rounds 1   # shorter
    python benchmarks/vs_trl.py --shape mid --task reverse_ragged --max-new-tokens 64 \
        --prompts 8 --steps 5 --rounds 1 --lr 1e-4 --trl-threads 1,2 --trl-budget 400 --timeout 900

Writes ``benchmarks/results/vs_trl.json`` and ``vs_trl.png`` (``--out-dir``). Needs
``pip install -e .[bench]`` (trl, datasets).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from _common import MetricsWatcher, cpu_model, git_state  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
PIPELINE = "pipelines/grpo.py"
TASKS = ("reverse", "reverse_ragged")
METRICS_LAG = 1  # rank 0 writes a step's metrics line when the next step ends (max_staleness 0)
# --shape: (distflow preset, overrides); vocab and special ids come from the task's tokenizer
SHAPES = {
    "tiny": ("tiny", {}),
    # 22.6M parameters: hidden 512, intermediate 1408, 8 layers, 8 heads / 2 KV heads
    "mid": ("tiny", dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=2)),
    "qwen2-0.5b": ("qwen2-0.5b", dict(max_position_embeddings=4096)),
}


# ---------------------------------------------------------------------------- shared setup
def char_tokenizer(task: str = "reverse"):
    from distflow.models import CharTokenizer
    from distflow.rl.tasks import get_task
    return CharTokenizer(get_task(task).alphabet)


def hf_tokenizer(task: str = "reverse"):
    """A ``transformers`` fast tokenizer with the CharTokenizer's ids: pad 0, eos 1, bos 2, then
    one id per character; encodes without special tokens, decodes by concatenation."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ct = char_tokenizer(task)
    vocab = {s: i for i, s in enumerate(ct.SPECIALS)}
    vocab.update({ch: i + len(ct.SPECIALS) for i, ch in enumerate(ct.alphabet)})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                  bos_token="<bos>")
    tok.padding_side = "left"
    for text in ("0123456789=", "37="):  # same ids both ways
        assert tok(text)["input_ids"] == ct.encode(text), (text, tok(text)["input_ids"], ct.encode(text))
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (ct.pad_id, ct.eos_id, ct.bos_id)
    assert len(tok) == ct.vocab_size
    return tok


def write_initial_model(directory: Path, seed: int, shape: str = "tiny", task: str = "reverse") -> dict:
    """The ``shape`` model (``SHAPES``) with random weights (seeded) + ``char_tokenizer.json``
    in ``directory``."""
    import torch

    from distflow.models import DecoderLM, preset, save_pretrained

    tok = char_tokenizer(task)
    torch.manual_seed(seed)
    name, overrides = SHAPES[shape]
    model = DecoderLM(preset(name, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                             pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, **overrides))
    save_pretrained(model, directory)
    tok.save(directory)
    return {"shape": shape, "preset": name, "num_parameters": model.num_parameters(),
            **{k: v for k, v in model.config.to_hf().items()
               if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                        "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")}}


def all_prompts(args) -> list[list[str]]:
    from distflow.rl.tasks import get_task
    task = get_task(args.task)
    return [task.prompts(args.prompts, args.seed, step) for step in range(args.steps)]


# ---------------------------------------------------------------------------- distflow
def run_distflow(args, model_dir: Path, run_dir: Path) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    from distflow.rl.tasks import get_task
    overrides = [f"model={model_dir}", f"task={args.task}", f"reward={args.task}", f"prompts={args.prompts}",
                 f"group_size={args.group_size}", f"max_prompt_len={get_task(args.task).max_prompt_len}",
                 f"max_new_tokens={args.max_new_tokens}", "temperature=1.0", "top_p=1.0", "top_k=0",
                 f"lr={args.lr}", f"kl_coef={args.kl_coef}", "kl_loss=true", "kl_estimator=low_var_kl",
                 "clip_eps=0.2", "ppo_epochs=1", "weight_decay=0.0", "grad_clip=1.0", "advantage=grpo",
                 f"seed={args.seed}"]
    cli = ["run", PIPELINE, "--nproc", str(args.nproc), "--out", str(run_dir), "--steps", str(args.steps),
           *overrides]
    cmd = [sys.executable, "-m", "distflow.cli", *cli]
    watcher = MetricsWatcher(run_dir / "metrics.jsonl")
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    watcher.start()
    with open(run_dir.parent / "distflow.log", "w") as log:
        try:
            rc = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                 timeout=args.timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    watcher.stop()
    if rc != 0:
        tail = (run_dir.parent / "distflow.log").read_text()[-3000:]
        raise RuntimeError(f"distflow run exited with {rc}\n{tail}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if [r["step"] for r in rows] != list(range(args.steps)):
        raise RuntimeError(f"metrics.jsonl has steps {[r['step'] for r in rows]}, expected 0..{args.steps - 1}")
    arrivals = watcher.arrivals
    if len(arrivals) != args.steps:
        raise RuntimeError(f"saw {len(arrivals)} metrics lines appear, expected {args.steps}")
    batch = args.prompts * args.group_size
    # rank 0 writes step k's line when step k + LAG ends (the last lines at the end of the
    # run): the span from the first line to the last covers steps LAG + 1 .. steps - 1
    span = arrivals[-1] - arrivals[0]
    step_sum = sum(r["timing_s/step"] for r in rows[1:])
    return {
        "command": "distflow " + shlex.join(cli),
        "rewards": [r["reward/mean"] for r in rows],
        "step_end_s": [a - arrivals[0] for a in arrivals],
        "step_times_s": [r["timing_s/step"] for r in rows],
        "samples_per_s": batch * (args.steps - 1 - METRICS_LAG) / span,
        "samples_per_s_step_sum": batch * (args.steps - 1) / step_sum,
        "median_step_s": statistics.median(r["timing_s/step"] for r in rows[1:]),
        "startup_s": arrivals[0] - t0 - rows[METRICS_LAG]["timing_s/step"],
        "run_wall_s": wall,
        "tokens_per_step": statistics.mean(r["count/tokens"] for r in rows),
        "response_length_mean": statistics.mean(r["response_length/mean"] for r in rows),
        "loadavg_1m_before": load, "loadavg_1m_after": os.getloadavg()[0],
    }


# ---------------------------------------------------------------------------- TRL
def trl_worker(spec_path: str) -> int:
    """The TRL run, in its own process; writes its measurements to spec["result"]."""
    spec = json.loads(Path(spec_path).read_text())
    args = argparse.Namespace(**spec["args"])
    t_proc = time.perf_counter()
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from distflow.rl.tasks import get_reward

    torch.manual_seed(args.seed)
    tok = hf_tokenizer(args.task)
    score = get_reward(args.task)
    batch = args.prompts * args.group_size
    prompts = [p for step in all_prompts(args) for p in step]
    dataset = Dataset.from_dict({"prompt": prompts})
    reward_calls: list[dict] = []

    def reverse_reward(prompts, completions, **kwargs):
        values = [float(score(p, c)) for p, c in zip(prompts, completions)]
        reward_calls.append({"mean": sum(values) / len(values), "n": len(values),
                             "prompts": sorted(set(prompts)),
                             "completion_len": sum(len(c) for c in completions) / len(completions)})
        return values

    class Timer(TrainerCallback):
        def __init__(self):
            self.begin, self.end = [], []

        def on_step_begin(self, a, state, control, **kw):
            self.begin.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            self.end.append(time.perf_counter())
            if self.end[-1] - self.begin[0] > spec["wall_budget_s"] and len(self.end) >= 2:
                control.should_training_stop = True  # a pathologically slow run: stop, report as truncated

    config = GRPOConfig(
        output_dir=spec["output_dir"], max_steps=args.steps, seed=args.seed,
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, num_generations=args.group_size,
        num_iterations=1, max_completion_length=args.max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.95,
        weight_decay=0.0, max_grad_norm=1.0,
        beta=args.kl_coef, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        use_vllm=False, use_cpu=args.device == "cpu", bf16=args.device == "cuda", fp16=False,
        gradient_checkpointing=False,
        model_init_kwargs={"dtype": torch.float32},
        shuffle_dataset=False, eval_strategy="no", save_strategy="no", report_to="none",
        log_completions=False, dataloader_num_workers=0,
    )
    timer = Timer()
    trainer = GRPOTrainer(model=spec["model_dir"], reward_funcs=reverse_reward, args=config,
                          train_dataset=dataset, processing_class=tok, callbacks=[timer])
    t_train = time.perf_counter()
    trainer.train()
    t_done = time.perf_counter()
    done = len(timer.end)
    if len(reward_calls) != done or not (done == args.steps or 2 <= done < args.steps):
        raise RuntimeError(f"TRL ran {done} steps and {len(reward_calls)} reward calls, expected {args.steps}")
    expected = all_prompts(args)
    for k, call in enumerate(reward_calls):  # the same prompts, step by step, as distflow
        if call["n"] != batch or call["prompts"] != sorted(set(expected[k])):
            raise RuntimeError(f"TRL step {k} scored {call['n']} completions of prompts {call['prompts'][:4]}..., "
                               f"expected {batch} of {sorted(set(expected[k]))[:4]}...")
    end = timer.end
    span = end[-1] - end[0]
    step_sum = sum(e - b for b, e in zip(timer.begin[1:], end[1:]))
    result = {
        "steps_done": done,
        "truncated": done < args.steps,
        "rewards": [c["mean"] for c in reward_calls],
        "step_end_s": [e - end[0] for e in end],
        "step_times_s": [e - b for b, e in zip(timer.begin, end)],
        "samples_per_s": batch * (done - 1) / span,
        "samples_per_s_step_sum": batch * (done - 1) / step_sum,
        "median_step_s": statistics.median(e - b for b, e in zip(timer.begin[1:], end[1:])),
        "step1_end_since_import_s": end[0] - t_proc,
        "import_to_done_s": t_done - t_proc,
        "train_call_s": t_done - t_train,
        "completion_chars_mean": statistics.mean(c["completion_len"] for c in reward_calls),
        "torch_threads": torch.get_num_threads(),
        "log_history": trainer.state.log_history,
    }
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def run_trl(args, model_dir: Path, work: Path, timeout: float, threads: int = 0,
            wall_budget_s: float = 1e9) -> dict:
    """TRL in a child process; ``threads`` sets OMP_NUM_THREADS (0: unset, torch's default).
    Training stops (``truncated``) once it has run ``wall_budget_s``."""
    import trl
    tag = f"trl{threads}t" if threads else "trl"
    spec = {"args": vars(args), "model_dir": str(model_dir), "output_dir": str(work / f"{tag}_out"),
            "result": str(work / f"{tag}_result.json"), "wall_budget_s": wall_budget_s}
    spec_path = work / f"{tag}_spec.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--trl-worker", str(spec_path)]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(work / f"{tag}.log", "w") as log:
        try:
            rc = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"TRL run exited with {rc}\n{(work / f'{tag}.log').read_text()[-3000:]}")
    res = json.loads(Path(spec["result"]).read_text())
    # start-up: process start, imports, trainer set-up and step 1, as distflow's launch to step 1
    res.update(run_wall_s=wall, startup_s=wall - res["import_to_done_s"] + res["step1_end_since_import_s"],
               loadavg_1m_before=load, loadavg_1m_after=os.getloadavg()[0], version=trl.__version__,
               omp_num_threads=threads or None,
               command="(in-process) GRPOTrainer(model=DIR, args=GRPOConfig(...)).train(), see vs_trl.py")
    return res


# ---------------------------------------------------------------------------- report
def run_summary(r: dict, tail: int) -> dict:
    rw = r["rewards"]
    k = min(tail, len(rw))
    return {"samples_per_s": r["samples_per_s"], "samples_per_s_step_sum": r["samples_per_s_step_sum"],
            "median_step_s": r["median_step_s"], "reward_first": statistics.mean(rw[:k]),
            "reward_last": statistics.mean(rw[-k:]), "reward_mean": statistics.mean(rw),
            "startup_s": r["startup_s"], "run_wall_s": r["run_wall_s"]}


def summarize(runs: list[dict], tail: int) -> dict:
    """Over the rounds: median of the throughput figures (every run), mean of the reward
    figures and the per-step reward curve (complete runs only: a truncated run stopped at
    its wall budget has a shorter curve)."""
    per = [run_summary(r, tail) for r in runs]
    out = {k: statistics.median(p[k] for p in per)
           for k in ("samples_per_s", "samples_per_s_step_sum", "median_step_s", "startup_s", "run_wall_s")}
    out["samples_per_s_rounds"] = [p["samples_per_s"] for p in per]
    full = [(r, p) for r, p in zip(runs, per) if not r.get("truncated")]
    out["complete_runs"] = len(full)
    if full:
        out.update({k: statistics.mean(p[k] for _, p in full) for k in ("reward_first", "reward_last", "reward_mean")})
        out["reward_last_rounds"] = [p["reward_last"] for _, p in full]
        out["reward_curve"] = [statistics.mean(col) for col in zip(*(r["rewards"] for r, _ in full))]
        out["step_end_s"] = [statistics.median(col) for col in zip(*(r["step_end_s"] for r, _ in full))]
    else:
        out.update(reward_first=None, reward_last=None, reward_mean=None, reward_last_rounds=[],
                   reward_curve=[], step_end_s=[])
    return out


def label(name: str, doc: dict) -> str:
    p = doc["params"]
    if name == "distflow":
        return f"distflow, {p['nproc']} workers x 1 thread"
    threads = doc["runs"][name][0].get("omp_num_threads")
    return f"TRL {doc['versions']['trl']}, 1 process, " + (f"{threads} thread" if threads else
                                                           f"torch default threads ({doc['runs'][name][0]['torch_threads']})")


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.6))
    palette = ["tab:blue", "tab:orange", "tab:red", "tab:green"]
    p = doc["params"]
    w = 5
    for color, name in zip(palette, doc["runs"]):
        s = doc["summary"][name]
        text = f"{label(name, doc)}: {s['samples_per_s']:.0f} samples/s; curve: {s['complete_runs']} runs"
        for r in doc["runs"][name]:
            a.plot(range(1, len(r["rewards"]) + 1), r["rewards"], color=color, alpha=0.15, lw=0.8)
            rw = r["rewards"]
            b.plot(r["step_end_s"], [statistics.mean(rw[max(0, i - w + 1):i + 1]) for i in range(len(rw))],
                   color=color, alpha=0.15, lw=0.8)
        curve = s["reward_curve"]
        smooth = [statistics.mean(curve[max(0, i - w + 1):i + 1]) for i in range(len(curve))]
        a.plot(range(1, len(curve) + 1), smooth, color=color, lw=2, label=text)
        b.plot(s["step_end_s"], smooth, color=color, lw=2, label=text)
    n = p["rounds"]
    a.set(xlabel="step", ylabel=f"reward (thin: each of {n} rounds; thick: mean, {w}-step avg)",
          title=f"GRPO '{p.get('task', 'reverse')}': {p['prompts']} prompts x {p['group_size']}, lr {p['lr']}, "
                f"{p.get('shape', 'tiny')} Qwen2, CPU")
    b.set(xlabel="wall seconds since the end of step 1 (median over rounds)",
          ylabel=f"reward (mean over rounds, {w}-step avg)", title="reward vs wall time (start-up excluded)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES),
                    help="model shape (default tiny; mid: 22.6M parameters; qwen2-0.5b: its shape, char vocab)")
    ap.add_argument("--task", default="reverse", choices=TASKS,
                    help="reverse (2 digits) or reverse_ragged (1-64 digits: ragged answers)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: TRL on the GPU with bf16 mixed precision (distflow uses the GPU "
                         "whenever CUDA is available, bf16 autocast in training)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3,
                    help="runs of each system, interleaved, seeds seed, seed+1, ... (default 3)")
    ap.add_argument("--prompts", type=int, default=32, help="prompts per step")
    ap.add_argument("--group-size", type=int, default=8, help="completions per prompt (TRL num_generations)")
    ap.add_argument("--max-new-tokens", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--kl-coef", type=float, default=0.001)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nproc", type=int, default=2, help="distflow workers")
    ap.add_argument("--trl-threads", default="0,1",
                    help="TRL thread settings to run, comma-separated; 0 = torch's default (all cores). "
                         "The speedup is taken against the fastest (default 0,1)")
    ap.add_argument("--trl-budget", type=float, default=45.0,
                    help="wall seconds after which a TRL run stops early (reported as truncated; its "
                         "throughput counts, its reward curve does not), default 45")
    ap.add_argument("--tail", type=int, default=10, help="steps averaged for first/last reward")
    ap.add_argument("--timeout", type=int, default=400, help="seconds per run")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--keep-runs", default="", help="keep run directories and logs here")
    ap.add_argument("--trl-worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.trl_worker:
        return args
    if args.steps < 3:
        ap.error("--steps must be >= 3 (step 1 is start-up; distflow writes a step's metrics a step late)")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if args.prompts % args.nproc:
        ap.error(f"--prompts ({args.prompts}) must be divisible by --nproc ({args.nproc})")
    if not 1 <= args.max_new_tokens <= 128:
        ap.error(f"--max-new-tokens must be in 1..128, got {args.max_new_tokens}")
    try:
        args.trl_thread_list = [int(t) for t in args.trl_threads.split(",") if t.strip()]
    except ValueError:
        ap.error(f"--trl-threads must be comma-separated ints, got {args.trl_threads!r}")
    if not args.trl_thread_list or min(args.trl_thread_list) < 0:
        ap.error("--trl-threads needs at least one value >= 0")
    args.argv = argv if argv is not None else sys.argv[1:]
    return args


def run(args: argparse.Namespace) -> dict:
    """Every round of every system; returns the result document."""
    import torch
    import transformers
    import trl

    trl_threads = args.trl_thread_list
    t_start = time.perf_counter()
    keys = ("steps", "prompts", "group_size", "max_new_tokens", "lr", "kl_coef", "seed", "task", "device")
    work = Path(args.keep_runs) if args.keep_runs else Path(tempfile.mkdtemp(prefix="distflow-vs-trl-"))
    work.mkdir(parents=True, exist_ok=True)
    systems = ["distflow"] + [f"trl_{t}t" if t else "trl" for t in trl_threads]
    threads_of = {f"trl_{t}t" if t else "trl": t for t in trl_threads}
    runs: dict[str, list[dict]] = {name: [] for name in systems}
    hf_tokenizer(args.task)  # fail early if the id mapping breaks
    os.environ.pop("OMP_NUM_THREADS", None)  # distflow's CLI then sets cores / nproc per worker
    try:
        for rnd in range(args.rounds):
            seed = args.seed + rnd
            rdir = work / f"round{rnd}"
            rdir.mkdir(parents=True, exist_ok=True)
            model_dir = rdir / "init_model"
            model_info = write_initial_model(model_dir, seed, args.shape, args.task)
            rargs = argparse.Namespace(**{k: getattr(args, k) for k in keys})
            rargs.seed = seed
            order = systems if rnd % 2 == 0 else systems[::-1]
            for name in order:
                print(f"round {rnd + 1}/{args.rounds} (seed {seed}): {name}, {args.steps} steps ...", flush=True)
                if name == "distflow":
                    r = run_distflow(args_with_seed(args, seed), model_dir, rdir / "distflow_run")
                else:
                    r = run_trl(rargs, model_dir, rdir, args.timeout, threads_of[name], args.trl_budget)
                r["seed"], r["round"] = seed, rnd
                runs[name].append(r)
                print(f"  {r['samples_per_s']:.1f} samples/s, median step {r['median_step_s']:.3f} s, reward "
                      f"{statistics.mean(r['rewards'][:args.tail]):.3f} -> {statistics.mean(r['rewards'][-args.tail:]):.3f}"
                      f" (load {os.getloadavg()[0]:.1f})", flush=True)
    finally:
        if not args.keep_runs:
            shutil.rmtree(work, ignore_errors=True)

    summary = {name: summarize(rs, args.tail) for name, rs in runs.items()}
    trl_names = systems[1:]
    best = max(trl_names, key=lambda n: summary[n]["samples_per_s"])
    speedup = summary["distflow"]["samples_per_s"] / summary[best]["samples_per_s"]
    speedup_each = {n: summary["distflow"]["samples_per_s"] / summary[n]["samples_per_s"] for n in trl_names}
    # TRL's math does not depend on its thread setting (same seed, same curve): one complete
    # TRL run per round (seed), so no seed counts twice.
    trl_per_seed = []
    for rnd in range(args.rounds):
        done = [r for n in trl_names for r in runs[n] if r["round"] == rnd and not r.get("truncated")]
        trl_per_seed += done[:1]
    trl_rewards = summarize(trl_per_seed, args.tail) if trl_per_seed else summarize(runs[best], args.tail)
    # paired seeds: distflow's last-steps reward minus TRL's, seed by seed
    paired = []
    for rnd in range(args.rounds):
        d = [r for r in runs["distflow"] if r["round"] == rnd]
        t = [r for r in trl_per_seed if r["round"] == rnd]
        if d and t:
            paired.append(run_summary(d[0], args.tail)["reward_last"] - run_summary(t[0], args.tail)["reward_last"])
    for rs in runs.values():
        for r in rs:
            r.pop("log_history", None)
    return {
        "benchmark": "vs_trl",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(["benchmarks/vs_trl.py", *args.argv]),
        "git": git_state(),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "params": {**{k: getattr(args, k) for k in keys}, "rounds": args.rounds, "nproc": args.nproc,
                   "shape": args.shape, "trl_threads": trl_threads, "model": model_info,
                   "samples_per_step": args.prompts * args.group_size, "temperature": 1.0,
                   "clip_eps": 0.2, "loss": "token-mean over the batch (TRL loss_type='dapo')",
                   "optimizer": "AdamW betas (0.9, 0.95), constant lr, no weight decay, grad clip 1.0",
                   "distflow_command": runs["distflow"][0]["command"], "tail": args.tail,
                   "trl_budget": args.trl_budget},
        "summary": summary,
        "fastest_trl": best,
        "speedup_samples_per_s": speedup,
        "speedup_vs_each_trl": speedup_each,
        "speedup_rounds_vs_fastest_trl": [d["samples_per_s"] / t["samples_per_s"]
                                          for d, t in zip(runs["distflow"], runs[best])],
        "speedup_step_sum": summary["distflow"]["samples_per_s_step_sum"] / summary[best]["samples_per_s_step_sum"],
        "trl_reward_one_run_per_seed": {k: trl_rewards[k] for k in ("reward_first", "reward_last", "reward_mean",
                                                                      "reward_last_rounds", "complete_runs")},
        "distflow_reward_last_rounds": summary["distflow"]["reward_last_rounds"],
        "reward_last_paired_diff": paired,
        "goal": {"speedup_at_least_3x": speedup >= 3.0,
                 "reward_last_at_least_trl": (summary["distflow"]["reward_last"] >= trl_rewards["reward_last"]
                                              if trl_rewards["reward_last"] is not None else None),
                 "reward_mean_at_least_trl": (summary["distflow"]["reward_mean"] >= trl_rewards["reward_mean"]
                                              if trl_rewards["reward_mean"] is not None else None)},
        "runs": runs,
        "wall_s": time.perf_counter() - t_start,
    }


def report(doc: dict, out_dir: Path) -> None:
    """Write the JSON and the plot; print the table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vs_trl.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot(doc, out_dir / "vs_trl.png")
    p, summary, runs = doc["params"], doc["summary"], doc["runs"]
    model_info, best, speedup = p["model"], doc["fastest_trl"], doc["speedup_samples_per_s"]
    trl_rewards = doc["trl_reward_one_run_per_seed"]
    k = min(p["tail"], p["steps"])
    print(f"\nGRPO on '{p['task']}', {p['shape']} Qwen2 ({model_info['num_parameters'] / 1e6:.2f}M params), "
          f"{p['steps']} steps x {p['prompts']} prompts x {p['group_size']} completions "
          f"({p['samples_per_step']} samples/step), {p['max_new_tokens']} new tokens, lr {p['lr']}; "
          f"{p['rounds']} interleaved rounds (throughput: median over rounds; reward: mean over rounds)")
    print(f"| system | samples/s | samples/s (step-time sum) | median step s | reward first {k} -> last {k} "
          f"| reward mean (all steps) | start-up s | run wall s |")
    print("|---|---|---|---|---|---|---|---|")

    def f3(x):
        return "n/a" if x is None else f"{x:.3f}"

    for name, s in summary.items():
        cut = len(runs[name]) - s["complete_runs"]
        note = f" ({cut} of {len(runs[name])} runs stopped at the {p['trl_budget']:g} s budget)" if cut else ""
        print(f"| {label(name, doc)}{note} | {s['samples_per_s']:.1f} | {s['samples_per_s_step_sum']:.1f} | "
              f"{s['median_step_s']:.3f} | {f3(s['reward_first'])} -> {f3(s['reward_last'])} | "
              f"{f3(s['reward_mean'])} | {s['startup_s']:.1f} | {s['run_wall_s']:.1f} |")
    print(f"speedup distflow / fastest TRL ({best}): {speedup:.2f}x samples/s (per round: "
          f"{', '.join(f'{x:.2f}x' for x in doc['speedup_rounds_vs_fastest_trl'])}); vs each: "
          + ", ".join(f"{n} {x:.2f}x" for n, x in doc["speedup_vs_each_trl"].items())
          + f"; goal >= 3x: {'met' if speedup >= 3 else 'NOT met'}")
    print(f"reward, last {k} steps: distflow {f3(summary['distflow']['reward_last'])} vs TRL (one complete run per "
          f"seed, {trl_rewards['complete_runs']} seeds) {f3(trl_rewards['reward_last'])}; all steps: "
          f"{f3(summary['distflow']['reward_mean'])} vs {f3(trl_rewards['reward_mean'])}; paired per seed "
          f"(distflow - TRL, last {k}): {', '.join(f'{x:+.3f}' for x in doc['reward_last_paired_diff'])}")
    print(f"-> {out_dir / 'vs_trl.json'}, {out_dir / 'vs_trl.png'} ({doc['wall_s']:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.trl_worker:
        return trl_worker(args.trl_worker)
    report(run(args), Path(args.out_dir))
    return 0


def args_with_seed(args, seed: int):
    a = argparse.Namespace(**vars(args))
    a.seed = seed
    return a


if __name__ == "__main__":
    sys.exit(main())
