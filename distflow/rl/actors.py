"""The models of one worker process, built once and shared by the stages placed there.

``actor(ctx)`` is the policy (a model + its training and inference engines), shared by
the rollout and the actor update when they run in the same process (co-located, like
verl's hybrid engine). ``reference(ctx)`` is a frozen copy of the initial policy and
``critic(ctx)`` a model with a scalar value head (PPO).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from distflow.engines.generation import InferenceEngine
from distflow.engines.training import OptimConfig, TrainEngine
from distflow.models import DecoderLM, ModelConfig, load_pretrained, load_tokenizer, preset
from distflow.models.tokenizer import CharTokenizer
from distflow.rl.tasks import TEXT_ALPHABET, get_task

_PROCESS: dict[str, object] = {}


def device_for(ctx) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def tokenizer(ctx):
    """The checkpoint's tokenizer when ``model`` is a directory, else a character-level
    one: the task's alphabet, or printable ASCII when the prompts come from ``data=``."""
    if "tokenizer" not in _PROCESS:
        _PROCESS["tokenizer"] = tokenizer_for(ctx.params)
    return _PROCESS["tokenizer"]


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


def _initial_model(ctx) -> DecoderLM:
    """The starting policy: a checkpoint directory or a preset with random weights."""
    name, tok = ctx.params["model"], tokenizer(ctx)
    if Path(name).is_dir():
        model = load_pretrained(name)
    else:
        torch.manual_seed(ctx.seed)  # identical initial weights on every rank
        model = DecoderLM(preset_config(name, tok))
    if model.config.vocab_size < tok.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but model {name!r} only "
                         f"{model.config.vocab_size} embeddings")
    return model.to(device_for(ctx))


@dataclass
class Actor:
    model: DecoderLM
    train: TrainEngine


def optim_config(ctx, prefix: str = "") -> OptimConfig:
    p = ctx.params
    return OptimConfig(lr=p[f"{prefix}lr"], weight_decay=p.get("weight_decay", 0.0),
                       grad_clip=p.get("grad_clip", 1.0),
                       micro_batch_tokens=p.get("micro_batch_tokens", 4096))


def policy(ctx) -> DecoderLM:
    """This process's policy model, shared by generation and training when co-located."""
    if "policy" not in _PROCESS:
        _PROCESS["policy"] = _initial_model(ctx)
    return _PROCESS["policy"]


def policy_inference(ctx) -> InferenceEngine:
    """Generation on the shared policy (co-located: it sees every update at once)."""
    if "policy_inference" not in _PROCESS:
        tok = tokenizer(ctx)
        _PROCESS["policy_inference"] = InferenceEngine(policy(ctx), tok.eos_id, tok.pad_id)
    return _PROCESS["policy_inference"]


def actor(ctx) -> Actor:
    """The policy with its training engine, built from the trainer stage's context (its
    data-parallel group, and its DiLoCo sync when the trainer group has islands)."""
    if "actor" not in _PROCESS:
        model = policy(ctx)
        sync = ctx.diloco(model) if ctx.diloco else None
        _PROCESS["actor"] = Actor(model, TrainEngine(model, optim_config(ctx), ctx.process_group, sync,
                                                        ctx.reducer))
    return _PROCESS["actor"]


def policy_copy(ctx) -> InferenceEngine:
    """A generation-only copy of the initial policy (disaggregated rollout workers): no
    optimizer state; its weights are refreshed by weight sync."""
    if "policy_copy" not in _PROCESS:
        model = _initial_model(ctx).eval().requires_grad_(False)
        tok = tokenizer(ctx)
        _PROCESS["policy_copy"] = InferenceEngine(model, tok.eos_id, tok.pad_id)
    return _PROCESS["policy_copy"]


def reference(ctx) -> DecoderLM:
    """A frozen copy of the initial policy."""
    if "reference" not in _PROCESS:
        ref = _initial_model(ctx)
        ref.requires_grad_(False).eval()
        _PROCESS["reference"] = ref
    return _PROCESS["reference"]


class Critic(torch.nn.Module):
    """A decoder with a scalar value head on its last hidden state."""

    def __init__(self, body: DecoderLM):
        super().__init__()
        self.body = body
        self.value_head = torch.nn.Linear(body.config.hidden_size, 1)
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
    if "critic" not in _PROCESS:
        model = Critic(_initial_model(ctx)).to(device_for(ctx))
        sync = ctx.diloco(model) if ctx.diloco else None
        _PROCESS["critic"] = (model, TrainEngine(model, optim_config(ctx, "critic_"),
                                                 ctx.process_group, sync, ctx.reducer))
    return _PROCESS["critic"]


def load_reward_model(directory: str | Path, device) -> Critic:
    """A neural reward model: an HF-format decoder checkpoint plus ``value_head.safetensors``
    (a [1, hidden] weight and [1] bias) that scores the last token of a sequence."""
    from safetensors.torch import load_file

    head = Path(directory) / "value_head.safetensors"
    if not head.is_file():
        raise FileNotFoundError(f"reward model {directory} has no value_head.safetensors")
    model = Critic(load_pretrained(directory))
    model.value_head.load_state_dict(load_file(str(head)))
    return model.to(device).eval().requires_grad_(False)


def save_reward_model(model: Critic, directory: str | Path) -> None:
    from safetensors.torch import save_file

    from distflow.models import save_pretrained
    save_pretrained(model.body, directory)
    save_file({k: v.contiguous() for k, v in model.value_head.state_dict().items()},
              str(Path(directory) / "value_head.safetensors"))
