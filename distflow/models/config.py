"""Shape and hyper-parameters of a Llama / Qwen2-style decoder, readable from HF ``config.json``.

``ModelConfig`` holds only what the forward pass needs. ``from_hf`` / ``to_hf`` translate to
and from the Hugging Face ``config.json`` dialect (both the transformers 4.x spelling,
``rope_theta`` at top level, and the 5.x one, ``rope_parameters``), refusing the features
this implementation does not have (``dynamic`` / ``longrope`` rotary scaling, sliding windows,
MLP biases, other activations) instead of silently computing something else.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distflow.models.rope import check_rope_scaling, normalize_rope_scaling

MODEL_TYPES = ("qwen2", "llama")
_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
# Class defaults of transformers' Qwen2Config / LlamaConfig, used when config.json omits a key.
_HF_MAX_POSITIONS = {"qwen2": 32768, "llama": 2048}
_HF_RMS_EPS = {"qwen2": 1e-6, "llama": 1e-6}


@dataclass(kw_only=True)
class ModelConfig:
    """A decoder-only LM: ``num_hidden_layers`` pre-norm blocks of GQA attention + SwiGLU MLP."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    """Defaults to ``num_attention_heads`` (plain multi-head attention)."""
    head_dim: int | None = None
    """Defaults to ``hidden_size // num_attention_heads``."""
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    """Rotary scaling as in HF's ``rope_scaling`` (``{"rope_type": "llama3" | "yarn" | "linear",
    ...}``); ``None`` for plain RoPE. See ``distflow.models.rope``."""
    tie_word_embeddings: bool = False
    attention_bias: bool | None = None
    """Biases on q/k/v projections. Defaults by model_type: qwen2 True, llama False.
    For llama it also puts a bias on o_proj (as HF's LlamaAttention does); qwen2 never has one."""
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    model_type: str = "qwen2"

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_key_value_heads < 1 or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must divide "
                                 f"hidden_size ({self.hidden_size}) unless head_dim is given")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"head_dim must be even and >= 2 for rotary embeddings, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        check_rope_scaling(self.rope_scaling)
        if self.attention_bias is None:
            self.attention_bias = self.model_type == "qwen2"
        if self.model_type == "qwen2" and not self.attention_bias:
            raise ValueError("model_type 'qwen2' always has q/k/v biases (HF's Qwen2 hard-codes them); "
                             "use model_type='llama' for attention without biases")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} ({value}) must be in [0, vocab_size={self.vocab_size})")

    # ---------------------------------------------------------------- derived
    @property
    def q_size(self) -> int:
        """Width of the query projection: ``num_attention_heads * head_dim``."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of each of the key / value projections: ``num_key_value_heads * head_dim``."""
        return self.num_key_value_heads * self.head_dim

    @property
    def o_proj_bias(self) -> bool:
        return self.attention_bias and self.model_type == "llama"

    def replace(self, **changes) -> ModelConfig:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- HF I/O
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from the content of a HF ``config.json`` (a ``Qwen2`` or ``Llama`` causal LM)."""
        model_type = hf.get("model_type")
        if model_type is None:
            by_arch = {arch: t for t, arch in _ARCHITECTURES.items()}
            archs = [by_arch[a] for a in hf.get("architectures") or [] if a in by_arch]
            model_type = archs[0] if archs else None
        if model_type not in MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r} "
                             f"(architectures {hf.get('architectures')}); supported: {MODEL_TYPES}")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in hf]
        if missing:
            raise ValueError(f"HF config lacks required keys {missing}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"only hidden_act='silu' is supported, got {hf['hidden_act']!r}")
        if hf.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported")
        if hf.get("quantization_config"):
            method = hf["quantization_config"].get("quant_method", "?")
            raise ValueError(f"quantized checkpoints are not supported (quantization_config: {method})")
        if hf.get("use_sliding_window"):
            raise ValueError("use_sliding_window=True is not supported (full attention only)")
        rope = hf.get("rope_parameters") or {}
        rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        max_positions = hf.get("max_position_embeddings", _HF_MAX_POSITIONS[model_type])
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads"),
            head_dim=hf.get("head_dim"),
            max_position_embeddings=max_positions,
            rms_norm_eps=float(hf.get("rms_norm_eps", _HF_RMS_EPS[model_type])),
            rope_theta=float(rope_theta),
            rope_scaling=normalize_rope_scaling(hf, max_positions),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # HF's Qwen2 ignores attention_bias (always biased); Llama reads it.
            attention_bias=True if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
            bos_token_id=_first_id(hf.get("bos_token_id")),
            eos_token_id=_first_id(hf.get("eos_token_id")),
            pad_token_id=_first_id(hf.get("pad_token_id")),
            model_type=model_type,
        )

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ModelConfig:
        """Read ``directory/config.json``."""
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {Path(directory)}")
        with open(path) as f:
            return cls.from_hf(json.load(f))

    def to_hf(self) -> dict[str, Any]:
        """HF ``config.json`` content that transformers 4.x and 5.x both load as this model."""
        out: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,  # transformers 4.x spelling
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_parameters": {"rope_type": "default", **(self.rope_scaling or {}),
                                "rope_theta": self.rope_theta},  # 5.x spelling
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "llama":
            out.update(attention_bias=self.attention_bias, mlp_bias=False, pretraining_tp=1)
        else:
            out.update(use_sliding_window=False, sliding_window=None,
                       max_window_layers=self.num_hidden_layers)
        return out


def _first_id(value) -> int | None:
    """HF allows a list of ids (e.g. several EOS tokens); the first one is the canonical one."""
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


# ---------------------------------------------------------------------------- presets
PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized, for tests and RL on CPU; vocab_size comes from the tokenizer.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
                 tie_word_embeddings=True, model_type="qwen2"),
    # The shapes of Qwen/Qwen2-0.5B and Qwen/Qwen2-1.5B (config.json on the HF hub).
    "qwen2-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=131072,
                       rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True, attention_bias=True,
                       bos_token_id=151643, eos_token_id=151643, model_type="qwen2"),
    "qwen2-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072,
                       rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True, attention_bias=True,
                       bos_token_id=151643, eos_token_id=151643, model_type="qwen2"),
}


def preset(name: str, **overrides) -> ModelConfig:
    """``ModelConfig`` of a named preset with ``overrides`` applied, e.g.
    ``preset("tiny", vocab_size=tok.vocab_size)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {unknown} for preset {name!r}")
    kwargs = {**PRESETS[name], **overrides}
    if "vocab_size" not in kwargs:
        raise ValueError(f"preset {name!r} needs vocab_size, "
                         f"e.g. preset({name!r}, vocab_size=tok.vocab_size)")
    return ModelConfig(**kwargs)
