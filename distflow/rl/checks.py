"""Checks of an RL pipeline's params that run before any worker opens a socket."""
from __future__ import annotations

from pathlib import Path

import torch

from distflow.algos import get_advantage, get_kl_estimator, get_policy_loss
from distflow.models import DecoderLM, ModelConfig, load_tokenizer
from distflow.models.tokenizer import CharTokenizer
from distflow.rl.actors import preset_config
from distflow.rl.tasks import get_reward, get_task


def check_rl_params(params: dict) -> None:
    """Raise ValueError naming the key and the numbers for anything that cannot work."""
    get_advantage(params["advantage"])
    get_policy_loss(params["policy_loss"])
    get_kl_estimator(params["kl_estimator"])
    get_reward(params["reward"])
    rm = params.get("reward_model")
    if rm and not (Path(rm) / "value_head.safetensors").is_file():
        raise ValueError(f"reward_model={rm!r} must be a checkpoint directory with config.json "
                         "and value_head.safetensors")
    task = get_task(params["task"])
    model = params["model"]
    if Path(model).is_dir():
        cfg = ModelConfig.from_pretrained(model)  # FileNotFoundError without config.json
        tok = load_tokenizer(model)
    else:
        tok = CharTokenizer(task.alphabet)
        cfg = preset_config(model, tok)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but model {model!r} has "
                         f"{cfg.vocab_size} embeddings")
    if task.max_prompt_len > params["max_prompt_len"]:
        raise ValueError(f"task {params['task']!r} has prompts of up to {task.max_prompt_len} "
                         f"tokens, over max_prompt_len={params['max_prompt_len']}")
    context = params["max_prompt_len"] + params["max_new_tokens"]
    if context > cfg.max_position_embeddings:
        raise ValueError(f"max_prompt_len={params['max_prompt_len']} + max_new_tokens="
                         f"{params['max_new_tokens']} = {context} exceeds the model context "
                         f"of {cfg.max_position_embeddings}")
    for key in ("prompts", "group_size", "ppo_epochs"):
        if params[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {params[key]}")
    from distflow.models.hf import resolve_dtype
    resolve_dtype(params.get("dtype", "auto"))  # float32 | bfloat16 | auto


def rl_model_params(params: dict) -> dict[str, int]:
    """Parameter counts of the policy, reference and critic (for ``distflow plan``)."""
    model = params["model"]
    if Path(model).is_dir():
        cfg = ModelConfig.from_pretrained(model)
    else:
        cfg = preset_config(model, CharTokenizer(get_task(params["task"]).alphabet))
    with torch.device("meta"):
        n = DecoderLM(cfg).num_parameters()
    return {"policy": n, "reference": n, "critic": n + cfg.hidden_size + 1}
