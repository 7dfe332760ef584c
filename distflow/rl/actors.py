"""The models of one worker process, built once (``ctx.shared``) and shared by the stages
placed there.

``actor(ctx)`` is the policy (a model + its training and inference engines), shared by
the rollout and the actor update when they run in the same process (co-located, like
verl's hybrid engine). ``reference(ctx)`` is a frozen copy of the initial policy and
``critic(ctx)`` a model with a scalar value head (PPO).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from distflow.engines.generation import InferenceEngine
from distflow.engines.training import OptimConfig, TrainEngine
from distflow.models import (DecoderLM, ModelConfig, load_pretrained, load_tokenizer, preset,
                             save_pretrained)
from distflow.models.tokenizer import CharTokenizer
from distflow.rl.tasks import TEXT_ALPHABET, get_task


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def tokenizer(ctx):
    """The checkpoint's tokenizer when ``model`` is a directory, else a character-level
    one: the task's alphabet, or printable ASCII when the prompts come from ``data=``."""
    return ctx.shared("tokenizer", lambda: tokenizer_for(ctx.params))


def tokenizer_for(params: dict):
    model = params["model"]
    if Path(model).is_dir():
        return load_tokenizer(model)
    if params.get("data") or not params.get("task"):
        return CharTokenizer(TEXT_ALPHABET)
    return CharTokenizer(get_task(params["task"]).alphabet)


def preset_config(name: str, tok) -> ModelConfig:
    """A preset's shape with the tokenizer's vocabulary and special tokens (random init)."""
    return preset(name, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                  pad_token_id=tok.pad_id, bos_token_id=tok.bos_id)


_ANNOUNCED: set[tuple[str, str]] = set()  # (model, dtype) pairs rank 0 has printed


def model_dtype(ctx) -> torch.dtype:
    """The dtype of the policy's weights and activations (``dtype=``, see
    ``distflow.models.hf.resolve_dtype``); rank 0 says once which one and why."""
    from distflow.models.hf import resolve_dtype

    name = ctx.params["model"]
    dtype, why = resolve_dtype(ctx.params.get("dtype", "auto"), name if Path(name).is_dir() else None)
    if ctx.rank == 0 and (name, why) not in _ANNOUNCED:
        _ANNOUNCED.add((name, why))
        print(f"distflow: model {name!r} in {str(dtype).removeprefix('torch.')} ({why})", file=sys.stderr)
    return dtype


def _initial_model(ctx) -> DecoderLM:
    """The starting policy: a checkpoint directory or a preset with random weights."""
    name, tok = ctx.params["model"], tokenizer(ctx)
    if Path(name).is_dir():
        model = load_pretrained(name, dtype=model_dtype(ctx))
    else:
        torch.manual_seed(ctx.seed)  # identical initial weights on every rank
        model = DecoderLM(preset_config(name, tok)).to(model_dtype(ctx))
    if model.config.vocab_size < tok.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but model {name!r} only "
                         f"{model.config.vocab_size} embeddings")
    return model.to(default_device())


@dataclass
class Actor:
    model: DecoderLM
    train: TrainEngine


def optim_config(ctx, prefix: str = "") -> OptimConfig:
    p = ctx.params
    return OptimConfig(lr=p[f"{prefix}lr"], weight_decay=p.get("weight_decay", 0.0),
                       grad_clip=p.get("grad_clip", 1.0),
                       micro_batch_tokens=p.get("micro_batch_tokens", 4096),
                       skip_nonfinite=ctx.nonfinite == "skip")


def save_model_files(ctx, engine: TrainEngine, directory: Path) -> None:
    """Next to the weights ``engine.save`` wrote: the model's ``config.json`` and tokenizer
    files, so ``distflow export`` needs nothing outside the checkpoint."""
    from distflow.export import save_model_files as write

    path = engine.checkpoint_path(directory, ctx.island)
    if path is not None:
        write(path, engine.model.config, next(engine.model.parameters()).dtype, tokenizer(ctx))


def _gen_batch(ctx) -> int | None:
    """``gen_batch=B``: at most B rows decode at once; a finished row's slot goes to the next
    prompt (continuous batching). 0 (the default): every row of the step at once."""
    return int(ctx.params.get("gen_batch", 0)) or None


def policy(ctx) -> DecoderLM:
    """This process's policy model, shared by generation and training when co-located."""
    return ctx.shared("policy", lambda: _initial_model(ctx))


def policy_inference(ctx) -> InferenceEngine:
    """Generation on the shared policy (co-located: it sees every update at once)."""
    tok = tokenizer(ctx)
    return ctx.shared("policy/inference", lambda: InferenceEngine(policy(ctx), tok.eos_id, tok.pad_id,
                                                                   max_batch=_gen_batch(ctx)))


def actor(ctx) -> Actor:
    """The policy with its training engine, built from the trainer stage's context (its
    data-parallel group, and its DiLoCo sync when the trainer group has islands)."""
    def build() -> Actor:
        model = policy(ctx)
        sync = ctx.diloco(model) if ctx.diloco else None
        return Actor(model, TrainEngine(model, optim_config(ctx), ctx.process_group, sync, ctx.reducer))
    return ctx.shared("policy/train", build)


def policy_copy(ctx) -> InferenceEngine:
    """A generation-only copy of the initial policy (disaggregated rollout workers): no
    optimizer state; its weights are refreshed by weight sync."""
    tok = tokenizer(ctx)
    return ctx.shared("policy/copy", lambda: InferenceEngine(
        _initial_model(ctx).eval().requires_grad_(False), tok.eos_id, tok.pad_id,
        max_batch=_gen_batch(ctx)))


def reference(ctx) -> DecoderLM:
    """A frozen copy of the initial policy."""
    return ctx.shared("reference", lambda: _initial_model(ctx).requires_grad_(False).eval())


class Critic(torch.nn.Module):
    """A decoder with a scalar value head on its last hidden state."""

    def __init__(self, body: DecoderLM):
        super().__init__()
        self.body = body
        self.value_head = torch.nn.Linear(body.config.hidden_size, 1, dtype=next(body.parameters()).dtype)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    @property
    def config(self):
        return self.body.config

    def forward(self, input_ids, position_ids, key_mask, cache=None) -> torch.Tensor:
        """Values [B, T] for every position (``cache``: as ``DecoderLM.forward``)."""
        _, hidden = self.body(input_ids, position_ids, key_mask, cache, return_hidden=True)
        return self.value_head(hidden).squeeze(-1).float()


def critic(ctx) -> tuple[Critic, TrainEngine]:
    """The critic and its training engine (built from the first stage that asks: values and
    the critic update are in the same group)."""
    def build() -> tuple[Critic, TrainEngine]:
        model = Critic(_initial_model(ctx)).to(default_device())
        sync = ctx.diloco(model) if ctx.diloco else None
        return model, TrainEngine(model, optim_config(ctx, "critic_"), ctx.process_group, sync, ctx.reducer)
    return ctx.shared("critic", build)


def load_reward_model(directory: str | Path, device) -> Critic:
    """A neural reward model: an HF-format decoder checkpoint plus ``value_head.safetensors``
    (a [1, hidden] weight and [1] bias) that scores the last token of a sequence."""
    head = Path(directory) / "value_head.safetensors"
    if not head.is_file():
        raise FileNotFoundError(f"reward model {directory} has no value_head.safetensors")
    model = Critic(load_pretrained(directory))
    model.value_head.load_state_dict(load_file(str(head)))
    return model.to(device).eval().requires_grad_(False)


def save_reward_model(model: Critic, directory: str | Path) -> None:
    save_pretrained(model.body, directory)
    save_file({k: v.contiguous() for k, v in model.value_head.state_dict().items()},
              str(Path(directory) / "value_head.safetensors"))
