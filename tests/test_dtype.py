"""dtype=float32|bfloat16|auto: which dtype a model loads in, bf16 generation and training on
CPU, and the fp32 master weights a bf16 training step updates and copies back."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from distflow.algos import logprobs_from_logits
from distflow.engines.generation import InferenceEngine
from distflow.engines.sampling import SamplingParams
from distflow.engines.training import OptimConfig, TrainEngine
from distflow.models import CharTokenizer, DecoderLM, preset, save_pretrained
from distflow.models.hf import resolve_dtype

VOCAB = 40


def _model(dtype=torch.float32, seed=0) -> DecoderLM:
    torch.manual_seed(seed)
    return DecoderLM(preset("tiny", vocab_size=VOCAB)).to(dtype)


def _loss(model, ids):
    """Summed next-token log-likelihood loss of ``ids [N, T]`` and its token count."""
    logp = logprobs_from_logits(model(ids[:, :-1]), ids[:, 1:])
    return -logp.sum(), {"tokens": float(logp.numel())}


def test_auto_dtype_follows_the_checkpoint(tmp_path):
    for dtype in (torch.float32, torch.bfloat16):
        save_pretrained(_model(dtype), tmp_path / str(dtype))
        assert resolve_dtype("auto", tmp_path / str(dtype))[0] == dtype  # bf16 stays bf16
        assert resolve_dtype("float32", tmp_path / str(dtype))[0] == torch.float32
        assert resolve_dtype("bfloat16", tmp_path / str(dtype))[0] == torch.bfloat16
    config = tmp_path / str(torch.float32) / "config.json"
    hf = json.loads(config.read_text())
    hf.pop("dtype")
    hf["torch_dtype"] = "float16"  # transformers 4.x spelling; fp16 is not trained as such
    config.write_text(json.dumps(hf))
    dtype, why = resolve_dtype("auto", config.parent)
    assert dtype == torch.float32 and "records float16" in why and "dtype=bfloat16" in why
    assert resolve_dtype("auto") == (torch.float32, "dtype=auto: float32 for a randomly initialised model")
    with pytest.raises(ValueError, match="dtype must be one of .*'float16'"):
        resolve_dtype("float16")


def test_rl_policy_loads_in_the_resolved_dtype(tmp_path, capsys):
    from distflow.models import load_tokenizer
    from distflow.rl import actors
    save_pretrained(_model(torch.bfloat16), tmp_path)
    CharTokenizer("0123456789+=").save(tmp_path)
    getattr(actors, "_PROCESS", {}).pop("tokenizer", None)  # another test's, cached per process
    for dtype, expected in (("auto", torch.bfloat16), ("float32", torch.float32)):
        ctx = SimpleNamespace(params={"model": str(tmp_path), "dtype": dtype, "task": "reverse"},
                              rank=0, seed=0, shared=lambda key, build: build())
        model = actors._initial_model(ctx)
        assert {p.dtype for p in model.parameters()} == {expected}
        assert f"model {str(tmp_path)!r} in {str(expected)[6:]}" in capsys.readouterr().err
        critic = actors.Critic(model)  # PPO's value head follows the body's dtype
        assert critic.value_head.weight.dtype == expected
        assert critic(torch.tensor([[3, 4]]), None, None).dtype == torch.float32
    assert load_tokenizer(tmp_path).vocab_size == 15


def test_bf16_step_updates_fp32_masters_and_copies_back():
    model = _model(torch.bfloat16)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = TrainEngine(model, OptimConfig(lr=1e-5, micro_batch_tokens=24))
    ids = torch.randint(3, VOCAB, (6, 9), generator=torch.Generator().manual_seed(0))

    # the reference: bf16 gradients of each micro-batch, summed in fp32, and fp32 AdamW on
    # fp32 copies of the initial weights
    ref_model = _model(torch.bfloat16)
    parts = [torch.arange(0, 3), torch.arange(3, 6)]  # 3 rows x 8 tokens = the 24-token budget
    grads = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in ref_model.named_parameters()}
    for index in parts:
        ref_model.zero_grad()
        _loss(ref_model, ids[index])[0].backward()
        for n, p in ref_model.named_parameters():
            grads[n] += p.grad.float()
    masters = {n: p.detach().float().clone().requires_grad_() for n, p in ref_model.named_parameters()}
    for n, m in masters.items():
        m.grad = grads[n] / 48  # normalized by the token count
    norm = torch.nn.utils.clip_grad_norm_(list(masters.values()), 1.0)
    groups = [{"params": [m for m in masters.values() if m.dim() >= 2], "weight_decay": 0.0},
              {"params": [m for m in masters.values() if m.dim() < 2], "weight_decay": 0.0}]
    torch.optim.AdamW(groups, lr=1e-5, betas=(0.9, 0.95), fused=True).step()

    stats = engine.step(6, torch.full((6,), 8), lambda i: _loss(model, ids[i]), normalizer="tokens")
    assert stats["tokens"] == 48 and stats["grad_norm"] == pytest.approx(float(norm), rel=1e-5)
    ours = dict(zip(engine.master.names, engine.master.masters))
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and p.grad is None  # the model keeps no gradient
        assert ours[n].dtype == torch.float32
        assert torch.allclose(ours[n], masters[n], rtol=0, atol=1e-7), n
        assert torch.equal(p, ours[n].to(torch.bfloat16)), n  # copied back
    state = engine.optimizer.state[ours["layers.0.mlp.up_proj.weight"]]
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
    # a step of 1e-5 is below bf16's resolution for most weights: only the masters record it
    w = "layers.0.mlp.up_proj.weight"
    moved_master = (ours[w] != initial[w].float()).float().mean().item()
    moved_bf16 = (dict(model.named_parameters())[w] != initial[w]).float().mean().item()
    assert moved_master > 0.9 and moved_bf16 < 0.5 * moved_master


def test_bf16_master_weights_survive_save_and_load(tmp_path):
    model = _model(torch.bfloat16)
    engine = TrainEngine(model, OptimConfig(lr=1e-3))
    ids = torch.randint(3, VOCAB, (4, 7), generator=torch.Generator().manual_seed(1))
    engine.step(4, torch.full((4,), 6), lambda i: _loss(model, ids[i]), normalizer="tokens")
    engine.save(tmp_path)
    fresh = TrainEngine(_model(torch.bfloat16, seed=5), OptimConfig(lr=1e-3))
    fresh.load(tmp_path)
    for a, b in zip(engine.master.masters, fresh.master.masters):
        assert torch.equal(a, b)  # fp32 bits, not the bf16 weights upcast
    for a, b in zip(model.parameters(), fresh.model.parameters()):
        assert torch.equal(a, b)
    assert TrainEngine(_model(), OptimConfig()).master is None  # fp32: nothing extra


def test_bf16_generation_then_training_on_cpu():
    model = _model(torch.bfloat16, seed=2)
    engine = InferenceEngine(model, eos_id=1, pad_id=0)
    prompts = [[5, 6, 7], [8, 9], [5, 6, 7]]
    out = engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=1.0),
                          generator=torch.Generator().manual_seed(0))
    assert out.responses.shape[0] == 3 and out.logprobs.dtype == torch.float32
    assert torch.isfinite(out.logprobs).all() and (out.logprobs[out.response_mask] < 0).all()
    with torch.no_grad():
        assert model(torch.tensor([[5, 6, 7]])).dtype == torch.bfloat16

    train = TrainEngine(model, OptimConfig(lr=1e-2))
    seqs = torch.cat([torch.tensor([[5, 6, 7], [0, 8, 9], [5, 6, 7]]), out.responses], 1)
    before = [p.detach().clone() for p in model.parameters()]
    stats = train.step(3, torch.full((3,), seqs.shape[1]), lambda i: _loss(model, seqs[i]), normalizer="tokens")
    assert stats["grad_norm"] > 0 and all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
