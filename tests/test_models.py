"""distflow.models: logit parity with transformers, HF checkpoint I/O, KV cache, tokenizers."""
from __future__ import annotations

import json

import pytest
import torch

from distflow.models import (CharTokenizer, DecoderLM, HFTokenizer, KVCache, ModelConfig, load_pretrained,
                             load_tokenizer, preset, save_pretrained)
from distflow.models.hf import hf_state_dict

VOCAB = 97


def _transformers():
    return pytest.importorskip("transformers")


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough that a wrong mask/rotary/bias shows up well above 1e-4."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.08 * noise)


def _left_padded(lengths: list[int], width: int, seed: int = 1):
    """``(ids [B, W], mask [B, W] bool, positions [B, W])`` with rows right-aligned."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, width - n:] = True
    ids[~mask] = 0
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def _hf_model(kind: str, tied: bool, **extra):
    tr = _transformers()
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                  max_position_embeddings=128, rms_norm_eps=1e-5)
    if kind == "qwen2":
        config = tr.Qwen2Config(rope_theta=1e6, **common, **extra)
        cls = tr.Qwen2ForCausalLM
    else:
        config = tr.LlamaConfig(rope_theta=5e5, **common, **extra)
        cls = tr.LlamaForCausalLM
    model = cls(config).eval()
    _randomize(model)
    if tied:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


# ---------------------------------------------------------------------------- parity with transformers
@pytest.mark.parametrize("kind,tied,extra", [
    ("qwen2", True, {}),
    ("qwen2", False, {}),
    ("llama", False, {}),
    ("llama", True, {"attention_bias": True, "head_dim": 32}),  # o_proj bias, head_dim != H / nh
], ids=["qwen2-tied", "qwen2-untied", "llama-untied", "llama-tied-bias-headdim"])
def test_logits_match_transformers(tmp_path, kind, tied, extra):
    hf = _hf_model(kind, tied, **extra)
    hf.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    assert model.config.model_type == kind and model.config.tie_word_embeddings == tied
    assert model.num_parameters() == sum(p.numel() for p in hf.parameters())

    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        out = model(ids)
    assert (out - ref).abs().max().item() < 1e-4

    # RoPE is shift-invariant, so only uneven positions show that position_ids are honoured
    gaps = torch.randint(1, 4, (2, 11), generator=torch.Generator().manual_seed(1))
    pos = gaps.cumsum(-1) - 1
    with torch.no_grad():
        ref = hf(input_ids=ids, position_ids=pos).logits
        out = model(ids, pos)
    assert (out - ref).abs().max().item() < 1e-4

    ids, mask, pos = _left_padded([12, 7, 1], 12)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long(), position_ids=pos).logits
        out, hidden = model(ids, pos, mask, return_hidden=True)
    assert hidden.shape == (3, 12, 64)
    assert torch.isfinite(out).all()  # padding queries see only themselves: no NaN
    assert (out[mask] - ref[mask]).abs().max().item() < 1e-4


@pytest.mark.parametrize("model_type,tied", [("qwen2", True), ("llama", False)])
def test_save_pretrained_loads_in_transformers(tmp_path, model_type, tied):
    tr = _transformers()
    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", vocab_size=VOCAB, model_type=model_type, tie_word_embeddings=tied,
                             eos_token_id=1, pad_token_id=0)).eval()
    _randomize(model, seed=3)
    save_pretrained(model, tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert hf_config["architectures"] == [f"{'Qwen2' if model_type == 'qwen2' else 'Llama'}ForCausalLM"]
    from safetensors.torch import load_file
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert ("lm_head.weight" in keys) == (not tied)  # a tied head is stored once, as the embedding

    hf = tr.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == hf_config["architectures"][0]
    ids, mask, pos = _left_padded([9, 4], 9, seed=5)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long(), position_ids=pos).logits
        out = model(ids, pos, mask)
    assert (out[mask] - ref[mask]).abs().max().item() < 1e-4

    again = load_pretrained(tmp_path)  # and back into distflow, bit for bit
    assert again.config == model.config
    with torch.no_grad():
        assert torch.equal(again(ids, pos, mask), out)


def test_sharded_checkpoint_and_dtype(tmp_path):
    from safetensors.torch import save_file
    model = DecoderLM(preset("tiny", vocab_size=VOCAB, tie_word_embeddings=False)).eval()
    save_pretrained(model, tmp_path / "single")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    state = hf_state_dict(model)
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, str(sharded / name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))

    ids = torch.randint(0, VOCAB, (2, 6))
    loaded = load_pretrained(sharded)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    half = load_pretrained(sharded, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    with torch.no_grad():
        logits = half(ids)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    save_pretrained(half, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


# ---------------------------------------------------------------------------- KV cache
def _tiny(seed: int = 0, **overrides) -> DecoderLM:
    torch.manual_seed(seed)
    model = DecoderLM(preset("tiny", vocab_size=VOCAB, num_hidden_layers=3, **overrides)).eval()
    _randomize(model, seed)
    return model


def _decode_incrementally(model, ids, mask, pos, prefill: int, chunk: int = 1):
    """Logits ``[B, W, V]`` from a prefill of ``prefill`` tokens, then chunks of ``chunk`` tokens."""
    b, w = ids.shape
    cache = KVCache.allocate(model.config, b, w, torch.float32, "cpu")
    outs, start = [], 0
    for end in [prefill, *range(prefill + chunk, w, chunk), w]:
        if end <= start:
            continue
        key_mask = None if mask is None else mask[:, :end]
        p = None if pos is None else pos[:, start:end]
        outs.append(model(ids[:, start:end], p, key_mask, cache))
        assert cache.length == end
        start = end
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("chunk", [1, 3])
def test_kv_cache_matches_full_forward(chunk):
    model = _tiny()
    ids = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        inc = _decode_incrementally(model, ids, None, None, prefill=5, chunk=chunk)
    assert (full - inc).abs().max().item() < 1e-5


@pytest.mark.parametrize("kv_heads", [2, 4])  # GQA decode path and plain multi-head
def test_kv_cache_left_padded(kv_heads):
    model = _tiny(seed=1, num_key_value_heads=kv_heads)
    ids, mask, pos = _left_padded([10, 6, 3], 10, seed=4)
    # generated tokens continue every row; the last row stops early (its key turns False)
    gen = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(6))
    gen_mask = torch.ones(3, 6, dtype=torch.bool)
    gen_mask[2, 3:] = False
    ids = torch.cat([ids, gen], 1)
    mask = torch.cat([mask, gen_mask], 1)
    pos = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(6)], 1)
    with torch.no_grad():
        full = model(ids, pos, mask)
        for chunk in (1, 4):
            inc = _decode_incrementally(model, ids, mask, pos, prefill=10, chunk=chunk)
            assert torch.isfinite(inc).all()
            assert (full[mask] - inc[mask]).abs().max().item() < 1e-5


def test_attention_mask_never_leaves_a_query_without_keys():
    from distflow.models.decoder import attention_mask
    key_mask = torch.tensor([[False, False, True, True, False], [False] * 5])
    for cached in (0, 2, 4):
        mask = attention_mask(key_mask, 5 - cached, cached, torch.device("cpu"))   # [B, 1, T, S]
        assert mask.shape == (2, 1, 5 - cached, 5)
        assert mask.any(-1).all()  # on CUDA a fully masked row gives NaN in SDPA
        q = torch.arange(cached, 5)[:, None]
        k = torch.arange(5)[None, :]
        expected = ((k <= q) & key_mask[:, None, :]) | (k == q)
        assert torch.equal(mask[:, 0], expected)


def test_kv_cache_errors():
    model = _tiny()
    cache = KVCache.allocate(model.config, 2, 5, torch.float32, "cpu")
    with torch.no_grad():
        model(torch.zeros(2, 4, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match=r"4 cached \+ 2 new tokens > max_len 5"):
            model(torch.zeros(2, 2, dtype=torch.long), cache=cache)
        assert cache.length == 4
        with pytest.raises(ValueError, match="allocated for batch 2, got input batch 3"):
            model(torch.zeros(3, 1, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match=r"key_mask must be \[B, S\] = \[2, 5\] \(4 cached \+ 1 new\)"):
            model(torch.zeros(2, 1, dtype=torch.long), key_mask=torch.ones(2, 1, dtype=torch.bool),
                  cache=cache)
        with pytest.raises(ValueError, match=r"position_ids must be \[B, T\] = \[2, 3\]"):
            model(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))


# ---------------------------------------------------------------------------- errors
def test_missing_config_names_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(preset("tiny", vocab_size=VOCAB).to_hf()))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_pretrained(tmp_path)


def test_missing_unexpected_and_misshaped_keys(tmp_path):
    from safetensors.torch import load_file, save_file
    save_pretrained(DecoderLM(preset("tiny", vocab_size=VOCAB)), tmp_path)
    path = str(tmp_path / "model.safetensors")
    good = load_file(path)

    state = dict(good)
    del state["model.layers.1.self_attn.k_proj.bias"]
    save_file(state, path)
    with pytest.raises(ValueError, match=r"missing keys \['model.layers.1.self_attn.k_proj.bias'\]"):
        load_pretrained(tmp_path)

    save_file({**good, "model.layers.2.mlp.up_proj.weight": torch.zeros(128, 64)}, path)
    with pytest.raises(ValueError, match="unexpected keys.*model.layers.2.mlp.up_proj.weight"):
        load_pretrained(tmp_path)

    save_file(good, path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"shape mismatch for model\.layers\.\d\.mlp\.\w+_proj\.weight: "
                                         r"checkpoint \((128, 64|64, 128)\), "
                                         r"model expects \((96, 64|64, 96)\)"):
        load_pretrained(tmp_path)


def test_config_validation():
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) must divide hidden_size \(66\)"):
        ModelConfig(vocab_size=10, hidden_size=66, intermediate_size=8, num_hidden_layers=1,
                    num_attention_heads=4)
    with pytest.raises(ValueError, match=r"num_key_value_heads \(3\) must divide num_attention_heads \(4\)"):
        preset("tiny", vocab_size=10, num_key_value_heads=3)
    with pytest.raises(ValueError, match="needs vocab_size"):
        preset("tiny")
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        preset("huge")
    with pytest.raises(ValueError, match="always has q/k/v biases"):
        preset("tiny", vocab_size=10, attention_bias=False)
    with pytest.raises(ValueError, match=r"eos_token_id \(10\) must be in \[0, vocab_size=10\)"):
        preset("tiny", vocab_size=10, eos_token_id=10)
    with pytest.raises(ValueError, match="rope type .dynamic. is not supported"):
        ModelConfig.from_hf({**preset("tiny", vocab_size=10).to_hf(),
                             "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        ModelConfig.from_hf({"model_type": "gpt2"})

    big = preset("qwen2-0.5b")
    assert (big.hidden_size, big.num_hidden_layers, big.num_attention_heads, big.num_key_value_heads,
            big.intermediate_size, big.vocab_size, big.head_dim) == (896, 24, 14, 2, 4864, 151936, 64)
    with torch.device("meta"):
        assert DecoderLM(big).num_parameters() == 494_032_768  # Qwen2-0.5B's published count
    assert ModelConfig.from_hf(big.to_hf()) == big
    llama = preset("tiny", vocab_size=10, model_type="llama")
    assert llama.attention_bias is False and ModelConfig.from_hf(llama.to_hf()) == llama
    legacy = {**llama.to_hf(), "eos_token_id": [7, 8]}
    del legacy["rope_parameters"]
    assert ModelConfig.from_hf(legacy).eos_token_id == 7


def test_init_and_tying():
    model = DecoderLM(preset("tiny", vocab_size=VOCAB))
    assert model.lm_head.weight is model.embed_tokens.weight
    assert abs(model.embed_tokens.weight.std().item() - 0.02) < 0.003
    assert torch.equal(model.norm.weight, torch.ones(64))
    assert torch.count_nonzero(model.layers[0].self_attn.q_proj.bias) == 0
    untied = DecoderLM(preset("tiny", vocab_size=VOCAB, tie_word_embeddings=False))
    assert untied.num_parameters() == model.num_parameters() + VOCAB * 64
    assert untied.num_parameters(exclude_embeddings=True) == model.num_parameters(exclude_embeddings=True)


# ---------------------------------------------------------------------------- tokenizers
def test_char_tokenizer(tmp_path):
    tok = CharTokenizer("0123456789+= ")
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.vocab_size) == (0, 1, 2, 16)
    ids = tok.encode("12+30=42")
    assert min(ids) >= 3 and tok.decode(ids) == "12+30=42"
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == "12+30=42"
    assert tok.decode(torch.tensor(ids)) == "12+30=42"
    with pytest.raises(ValueError, match="character 'x' is not in the alphabet"):
        tok.encode("1x")
    with pytest.raises(ValueError, match="appears twice"):
        CharTokenizer("abca")
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, CharTokenizer) and again.encode("9=9") == tok.encode("9=9")


def _word_level_tokenizer(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "</s>", "<s>"])
    tok.train_from_iterator(["the cat sat on the mat", "a dog sat on a log"], trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return tok


def test_hf_tokenizer(tmp_path):
    raw = _word_level_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "</s>", "bos_token": None,
        "pad_token": {"content": "<pad>", "special": True, "lstrip": False, "rstrip": False}}))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == raw.get_vocab_size()
    assert (tok.eos_id, tok.pad_id) == (raw.token_to_id("</s>"), raw.token_to_id("<pad>"))
    assert tok.bos_id == raw.token_to_id("<s>")  # bos_token null -> found by its usual name
    ids = tok.encode("the dog sat on the mat")
    assert len(ids) == 6 and tok.decode(ids) == "the dog sat on the mat"
    assert tok.decode([*ids, tok.eos_id, tok.pad_id]) == "the dog sat on the mat"

    # no tokenizer_config.json: ids from config.json (a list of EOS ids gives its first), pad -> eos
    other = tmp_path / "other"
    raw = _word_level_tokenizer(other)
    (other / "config.json").write_text(json.dumps({"eos_token_id": [3, 2]}))
    tok = HFTokenizer(other)
    assert (tok.eos_id, tok.pad_id) == (3, 1)  # "<pad>" is found by name
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or char_tokenizer.json"):
        load_tokenizer(tmp_path / "nowhere")
