"""Checks of an RL pipeline's params that run before any worker opens a socket."""
from __future__ import annotations

from pathlib import Path

import torch

from distflow.algos import get_advantage, get_kl_estimator, get_policy_loss
from distflow.models import DecoderLM, ModelConfig
from distflow.rl.actors import preset_config, tokenizer_for
from distflow.rl.tasks import get_reward, get_task, reward_kind


def check_rl_params(params: dict) -> None:
    """Raise ValueError naming the key and the numbers for anything that cannot work."""
    get_advantage(params["advantage"])
    get_policy_loss(params["policy_loss"])
    get_kl_estimator(params["kl_estimator"])
    reward_kind(get_reward(params["reward"]))  # a signature it cannot call fails here
    rm = params.get("reward_model")
    if rm and not (Path(rm) / "value_head.safetensors").is_file():
        raise ValueError(f"reward_model={rm!r} must be a checkpoint directory with config.json "
                         "and value_head.safetensors")
    task = get_task(params["task"])
    model = params["model"]
    if Path(model).is_dir():
        cfg = ModelConfig.from_pretrained(model)  # FileNotFoundError without config.json
        tok = tokenizer_for(params)
    else:
        tok = tokenizer_for(params)
        cfg = preset_config(model, tok)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but model {model!r} has "
                         f"{cfg.vocab_size} embeddings")
    if params.get("data") or params.get("data.eval") or params.get("eval_every"):
        check_data_params(params, tok)
    elif task.max_prompt_len > params["max_prompt_len"]:
        raise ValueError(f"task {params['task']!r} has prompts of up to {task.max_prompt_len} "
                         f"tokens, over max_prompt_len={params['max_prompt_len']}")
    if int(params.get("gen_batch", 0)) < 0:
        raise ValueError(f"gen_batch={params['gen_batch']} must be >= 0 (0: every row at once)")
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
        cfg = preset_config(model, tokenizer_for(params))
    with torch.device("meta"):
        n = DecoderLM(cfg).num_parameters()
    return {"policy": n, "reference": n, "critic": n + cfg.hidden_size + 1}


def check_data_params(params: dict, tok) -> None:
    """``data=`` / ``data.eval=``: readable, the columns exist, every prompt fits."""
    from distflow.data.prompts import PromptData

    if params.get("data.eval") and not params.get("data"):
        raise ValueError("data.eval needs data=PATH as well")
    if params.get("eval_every", 0) < 0:
        raise ValueError(f"eval_every must be >= 0, got {params['eval_every']}")
    if params.get("eval_every", 0) and not params.get("data.eval"):
        raise ValueError("eval_every needs data.eval=PATH (the held-out data set)")
    if params.get("data.eval") and not params.get("eval_every"):
        raise ValueError("data.eval needs eval_every=K (evaluate every K steps)")
    for key in ("data", "data.eval"):
        if params.get(key):
            PromptData(params, tok, params[key]).check_lengths(params["max_prompt_len"])
