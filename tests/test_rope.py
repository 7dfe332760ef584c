"""Rotary scaling (``linear``, ``llama3``, ``yarn``): logit parity with transformers on tiny
models built here, config round trips, and the types that are refused."""
from __future__ import annotations

import json

import pytest
import torch

from distflow.models import DecoderLM, ModelConfig, load_pretrained, preset, save_pretrained
from distflow.models.rope import inv_frequencies

VOCAB = 61
# Tiny shapes whose 8 rotary frequencies (head_dim 16, theta 1e4) have wavelengths from 6 to
# 2e4 positions: with an original context of 32 each scaling rule takes all its branches.
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.5},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "yarn-mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                    "beta_fast": 16, "beta_slow": 2, "mscale": 0.9, "mscale_all_dim": 0.6},
}


def _hf_model(kind: str, scaling: dict | None):
    tr = pytest.importorskip("transformers")
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rope_theta=1e4, tie_word_embeddings=False)
    config_cls, model_cls = ((tr.Qwen2Config, tr.Qwen2ForCausalLM) if kind == "qwen2"
                             else (tr.LlamaConfig, tr.LlamaForCausalLM))
    config = config_cls(**common, rope_scaling=dict(scaling) if scaling else None)
    model = model_cls(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.1 * noise)
    return model


@pytest.mark.parametrize("name,kind", [("linear", "llama"), ("llama3", "llama"), ("yarn", "qwen2"),
                                       ("yarn-mscale", "llama")])
def test_scaled_rope_logits_match_transformers(tmp_path, name, kind):
    scaling = SCALINGS[name]
    hf = _hf_model(kind, scaling)
    hf.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    assert model.config.rope_scaling["rope_type"] == scaling["rope_type"]

    # positions past the original context, with gaps, so every frequency band matters
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    pos = torch.randint(1, 6, (2, 40), generator=torch.Generator().manual_seed(2)).cumsum(-1)
    with torch.no_grad():
        ref = hf(input_ids=ids, position_ids=pos).logits
        out = model(ids, pos)
        plain = DecoderLM(model.config.replace(rope_scaling=None))
        plain.load_state_dict(model.state_dict())
        unscaled = plain(ids, pos)
    assert (out - ref).abs().max().item() < 1e-4
    assert (unscaled - ref).abs().max().item() > 1e-2  # the scaling is really in play

    # and back: a distflow checkpoint with this scaling loads in transformers the same way
    save_pretrained(model, tmp_path / "ours")
    again = type(hf).from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (again(input_ids=ids, position_ids=pos).logits - ref).abs().max().item() < 1e-4
    assert ModelConfig.from_pretrained(tmp_path / "ours") == model.config


def test_inv_frequencies_match_transformers_init_functions():
    tr = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    for name, scaling in SCALINGS.items():
        config = tr.LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=1e4,
                                max_position_embeddings=256, rope_scaling=dict(scaling))
        ref, ref_scale = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
        ours, scale = inv_frequencies(16, 1e4, scaling)
        assert torch.allclose(ours, ref, rtol=1e-6, atol=0), name
        assert scale == pytest.approx(ref_scale, rel=1e-12), name


def test_llama31_config_is_accepted_and_round_trips():
    """The rope section of Meta-Llama-3.1-8B's config.json (4.x spelling) and its 5.x form."""
    llama31 = {**preset("tiny", vocab_size=10, model_type="llama").to_hf(),
               "rope_theta": 500000.0, "max_position_embeddings": 131072,
               "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    del llama31["rope_parameters"]
    cfg = ModelConfig.from_hf(llama31)
    assert cfg.rope_scaling == llama31["rope_scaling"] and cfg.rope_theta == 5e5
    v5 = {k: v for k, v in llama31.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = {**llama31["rope_scaling"], "rope_theta": 500000.0}
    assert ModelConfig.from_hf(v5) == cfg
    assert ModelConfig.from_hf(json.loads(json.dumps(cfg.to_hf()))) == cfg
    # yarn without original_max_position_embeddings takes max_position_embeddings, as HF does
    qwen = {**preset("tiny", vocab_size=10).to_hf(), "rope_scaling": {"type": "yarn", "factor": 4.0}}
    assert ModelConfig.from_hf(qwen).rope_scaling == {"rope_type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 256}


@pytest.mark.parametrize("spec,match", [
    ({"rope_type": "dynamic", "factor": 2.0}, "rope type 'dynamic' is not supported"),
    ({"rope_type": "longrope", "factor": 2.0}, "rope type 'longrope' is not supported"),
    ({"rope_type": "llama3", "factor": 8.0}, r"missing keys \['low_freq_factor', 'high_freq_factor'\]"),
    ({"rope_type": "yarn", "factor": 4.0, "wobble": 1}, r"unknown keys \['wobble'\]"),
    ({"rope_type": "linear", "factor": 0.0}, "factor must be > 0"),
    ({"rope_type": "default", "partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported"),
])
def test_unsupported_rope_is_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf({**preset("tiny", vocab_size=10).to_hf(), "rope_scaling": spec})


def test_quantized_checkpoint_is_refused():
    with pytest.raises(ValueError, match=r"quantized checkpoints are not supported \(quantization_config: awq\)"):
        ModelConfig.from_hf({**preset("tiny", vocab_size=10).to_hf(),
                             "quantization_config": {"quant_method": "awq", "bits": 4}})
