"""Hugging Face checkpoints (``config.json`` + safetensors) <-> ``DecoderLM``.

HF keys are ``model.<name>`` for everything but ``lm_head.weight``, where ``<name>`` is the
``DecoderLM`` parameter name (the module layout mirrors HF's). A tied ``lm_head`` is not
stored, as transformers does.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from distflow.models.config import ModelConfig
from distflow.models.decoder import DecoderLM

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# ``dtype=`` values: bf16 is trained with fp32 master weights (``distflow.engines.training``);
# fp16 is not offered (it needs loss scaling, which the training engine does not do).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Non-parameter buffers some older checkpoints carry; recomputed here, so skipped on load.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def hf_key(name: str) -> str:
    """``DecoderLM`` parameter name -> HF checkpoint key."""
    return name if name == "lm_head.weight" else f"model.{name}"


def from_hf_key(key: str) -> str | None:
    """HF checkpoint key -> ``DecoderLM`` parameter name (``None`` if it is not one of ours)."""
    if key == "lm_head.weight":
        return key
    return key[len("model."):] if key.startswith("model.") else None


def _read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors``, or of the shards listed in its index (HF key -> tensor)."""
    single, index = directory / WEIGHTS_NAME, directory / WEIGHTS_INDEX_NAME
    if single.is_file():
        return load_file(str(single), device="cpu")
    if index.is_file():
        with open(index) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            path = directory / shard
            if not path.is_file():
                raise FileNotFoundError(f"shard {shard} listed in {index} does not exist")
            tensors.update(load_file(str(path), device="cpu"))
        not_indexed = sorted(set(tensors) - set(weight_map))
        if not_indexed:
            raise ValueError(f"{index}: shards hold keys the index does not list: {not_indexed[:5]}")
        return tensors
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {directory}")


def load_pretrained(directory: str | Path, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> DecoderLM:
    """A ``DecoderLM`` with the weights of the HF checkpoint in ``directory``, in eval mode.

    Raises ``FileNotFoundError`` without ``config.json`` or weights, and ``ValueError`` naming
    the key(s) for missing, unexpected or wrongly shaped tensors.
    """
    directory = Path(directory)
    config = ModelConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = DecoderLM(config)
    expected = {hf_key(name): p.shape for name, p in model.named_parameters()}  # tied lm_head absent

    state: dict[str, torch.Tensor] = {}
    unexpected = []
    raw = _read_safetensors(directory)
    while raw:  # pop as we convert, so the checkpoint-dtype copy is freed tensor by tensor
        key, tensor = raw.popitem()
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # some checkpoints store the tied head too; the embedding wins, as in HF
        if key not in expected:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != tuple(expected[key]):
            raise ValueError(f"shape mismatch for {key}: checkpoint {tuple(tensor.shape)}, "
                             f"model expects {tuple(expected[key])} (config in {directory})")
        state[from_hf_key(key)] = tensor.to(device=device, dtype=dtype)
    missing = sorted(set(expected) - {hf_key(n) for n in state})
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(sorted(unexpected))}")
        raise ValueError(f"checkpoint in {directory} does not match its config: " + "; ".join(parts))
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model.eval()


def checkpoint_dtype(directory: str | Path) -> str | None:
    """The weights' dtype ``config.json`` records (``dtype`` in transformers 5.x,
    ``torch_dtype`` in 4.x), or ``None``."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    with open(path) as f:
        hf = json.load(f)
    value = hf.get("dtype") or hf.get("torch_dtype")
    return str(value).removeprefix("torch.") if value else None


def resolve_dtype(name: str, directory: str | Path | None = None) -> tuple[torch.dtype, str]:
    """``dtype=float32|bfloat16|auto`` -> (the dtype of weights and activations, why).

    ``auto`` (the default, as transformers 5.x ``from_pretrained``) keeps the dtype the
    checkpoint in ``directory`` records when it is float32 or bfloat16; a model without a
    checkpoint (random init), or one in another dtype (float16) or none, is float32.
    """
    if name in DTYPES:
        return DTYPES[name], f"dtype={name}"
    if name != "auto":
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {name!r}")
    if directory is None:
        return torch.float32, "dtype=auto: float32 for a randomly initialised model"
    recorded = checkpoint_dtype(directory)
    if recorded in DTYPES:
        return DTYPES[recorded], f"dtype=auto: the checkpoint's dtype ({recorded})"
    return torch.float32, (f"dtype=auto: float32, the checkpoint records {recorded or 'no dtype'} "
                           f"(set dtype=bfloat16 or dtype=float32 to choose)")


def _few(keys: list[str], n: int = 8) -> str:
    return str(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def hf_state_dict(model: DecoderLM) -> dict[str, torch.Tensor]:
    """HF-keyed, contiguous CPU tensors of ``model``; a tied ``lm_head`` is left out."""
    out = {}
    for name, p in model.named_parameters():  # named_parameters yields a shared tensor once
        out[hf_key(name)] = p.detach().to("cpu").contiguous()
    return out


def _atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temp file next to ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_pretrained(model: DecoderLM, directory: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (HF format) into ``directory``.

    transformers' ``AutoModelForCausalLM.from_pretrained(directory)`` loads the result.
    Each file is written to a temp file and renamed, so readers never see a partial file.
    Returns the directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model)
    dtype = next(iter(tensors.values())).dtype
    config = model.config.to_hf()
    config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")  # 4.x, 5.x spelling
    _atomic_write(directory / WEIGHTS_NAME,
                  lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))

    def write_config(tmp):
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")

    _atomic_write(directory / "config.json", write_config)
    return directory
