"""Log-probs and entropy from the final hidden states, the lm head applied in chunks of
tokens sized by a memory budget and recomputed in backward (``logprobs_from_hidden``,
``response_logprobs``): the same values and gradients as the full [N, R, V] logits, the
full path bit for bit below the budget, and never more than a chunk's logits alive."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from distflow import Batch
from distflow.algos import entropy_from_logits, logprobs_from_hidden, logprobs_from_logits
from distflow.models import DecoderLM, preset
from distflow.rl.stages import response_logits, response_logprobs

pytestmark = pytest.mark.timeout(60)
EOS, PAD, VOCAB = 1, 0, 1000


def _inputs(seed=0, n=3, t=7, h=16, v=VOCAB, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, t, h, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, dtype=dtype) * 0.5).requires_grad_()
    tokens = torch.randint(0, v, (n, t), generator=g)
    return hidden, weight, tokens


def _budget(rows, v=VOCAB):
    """A budget that makes chunks of ``rows`` positions."""
    return rows * 4 * v


def test_gradcheck_of_both_outputs_in_float64():
    hidden, weight, tokens = _inputs(v=40, h=8, dtype=torch.float64)
    fn = lambda h, w: logprobs_from_hidden(h, w, tokens, entropy=True, budget=_budget(4, 40))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight))


@pytest.mark.parametrize("rows", [1, 5, 21, 1000])  # 21 positions: ragged last chunk, one chunk
def test_values_and_gradients_equal_the_full_logits(rows):
    hidden, weight, tokens = _inputs()
    logits = F.linear(hidden, weight)
    lp0, ent0 = logprobs_from_logits(logits, tokens), entropy_from_logits(logits)
    a = torch.linspace(-1, 1, lp0.numel()).view(lp0.shape)
    b = torch.linspace(2, -1, lp0.numel()).view(lp0.shape)
    g0 = torch.autograd.grad((lp0 * a + ent0 * b).sum(), (hidden, weight), retain_graph=True)
    lp1, ent1 = logprobs_from_hidden(hidden, weight, tokens, entropy=True, budget=_budget(rows))
    g1 = torch.autograd.grad((lp1 * a + ent1 * b).sum(), (hidden, weight))
    assert lp1.dtype == ent1.dtype == torch.float32 and lp1.shape == tokens.shape
    assert torch.allclose(lp1, lp0, atol=1e-5) and torch.allclose(ent1, ent0, atol=1e-5)
    for x, y in zip(g1, g0):
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-4)
    # log-probs alone: the same numbers, and a gradient to the hidden states only
    lp2 = logprobs_from_hidden(hidden, weight.detach(), tokens, budget=_budget(rows))
    assert torch.equal(lp2, lp1.detach())
    (gh,) = torch.autograd.grad((lp2 * a).sum(), hidden)
    (gh0,) = torch.autograd.grad((lp0 * a).sum(), hidden)
    assert torch.allclose(gh, gh0, atol=1e-5, rtol=1e-4)


def test_bfloat16_weights_compute_in_float32():
    hidden, weight, tokens = _inputs(dtype=torch.bfloat16)
    lp0 = logprobs_from_logits(F.linear(hidden, weight).float(), tokens)
    g0 = torch.autograd.grad(lp0.sum(), (hidden, weight))
    lp1 = logprobs_from_hidden(hidden, weight, tokens, budget=_budget(4))
    g1 = torch.autograd.grad(lp1.sum(), (hidden, weight))
    assert lp1.dtype == torch.float32 and torch.allclose(lp1, lp0, atol=1e-4)
    for x, y in zip(g1, g0):
        assert x.dtype == torch.bfloat16 and torch.allclose(x.float(), y.float(), atol=2e-2, rtol=2e-2)


def test_inference_mode_and_bad_tokens():
    hidden, weight, tokens = _inputs()
    with torch.inference_mode():
        lp = logprobs_from_hidden(hidden, weight, tokens, budget=_budget(4))
    assert torch.allclose(lp, logprobs_from_logits(F.linear(hidden, weight), tokens).detach(), atol=1e-5)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 1000\)"):
        logprobs_from_hidden(hidden, weight, torch.full_like(tokens, VOCAB))
    with pytest.raises(ValueError, match="tokens must have shape"):
        logprobs_from_hidden(hidden, weight, tokens[:, 1:])
    with pytest.raises(ValueError, match="weight must be"):
        logprobs_from_hidden(hidden, weight.t(), tokens)


class _LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op returns (forward and backward), and the ops."""

    def __init__(self):
        super().__init__()
        self.largest, self.ops = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_more_than_a_chunk_of_logits_in_forward_or_backward():
    hidden, weight, tokens = _inputs(n=4, t=16, h=4, v=4000)        # 64 positions
    with _LargestTensor() as full:
        logp = logprobs_from_logits(F.linear(hidden, weight), tokens)
        logp.sum().backward()
    assert full.largest >= 64 * 4000                                # the whole logits
    with _LargestTensor() as chunked:
        logp, ent = logprobs_from_hidden(hidden, weight, tokens, entropy=True, budget=_budget(8, 4000))
        assert chunked.largest == 8 * 4000 and "aten.addmm_" not in chunked.ops
        (logp.sum() + ent.sum()).backward()
    assert "aten.addmm_" in chunked.ops                             # backward was seen
    assert chunked.largest == 8 * 4000                              # one chunk of 8 positions
    assert weight.grad.numel() < 8 * 4000                           # (not the weight's gradient)


# ------------------------------------------------------------------------ the RL stages

def _model(tied, seed=0):
    torch.manual_seed(seed)
    return DecoderLM(preset("tiny", vocab_size=VOCAB, eos_token_id=EOS, pad_token_id=PAD,
                            tie_word_embeddings=tied))


def _batch(seed=0, prompts=3, group=3, p=5, r=6):
    """Ragged left-padded prompts repeated ``group`` times (``group=1``: distinct), ragged
    right-padded responses."""
    g = torch.Generator().manual_seed(seed)
    tok = torch.full((prompts, p), PAD)
    pmask = torch.zeros((prompts, p), dtype=torch.bool)
    for i, k in enumerate(torch.randint(1, p + 1, (prompts,), generator=g).tolist()):
        tok[i, p - k:] = torch.randint(3, VOCAB, (k,), generator=g)
        pmask[i, p - k:] = True
    tok, pmask = tok.repeat_interleave(group, 0), pmask.repeat_interleave(group, 0)
    n = prompts * group
    rlen = torch.randint(1, r + 1, (n,), generator=g)
    rmask = torch.arange(r)[None] < rlen[:, None]
    resp = torch.where(rmask, torch.randint(3, VOCAB, (n, r), generator=g), torch.full((n, r), PAD))
    return Batch({"prompts": tok, "prompt_mask": pmask, "responses": resp, "response_mask": rmask},
                 torch.arange(n), pmask.sum(1) + rlen, groups=torch.arange(prompts).repeat_interleave(group))


def _logp_ent_grads(model, batch, budget):
    model.zero_grad()
    logp, ent = response_logprobs(model, batch, entropy=True, budget=budget)
    adv = torch.linspace(-1, 1, logp.numel()).reshape(logp.shape)
    ((logp * adv + logp.exp()) * batch["response_mask"]).sum().backward()
    return logp.detach(), ent, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("group", [3, 1])  # shared prompts (GRPO groups), distinct prompts
def test_response_logprobs_chunked_equal_the_full_logits(tied, group):
    model, batch = _model(tied), _batch(group=group)
    n, r = batch["responses"].shape
    lp0, ent0, g0 = _logp_ent_grads(model, batch, budget=n * r * VOCAB * 4)      # fits: full logits
    lp1, ent1, g1 = _logp_ent_grads(model, batch, budget=_budget(7))            # chunks of 7 tokens
    m = batch["response_mask"]
    assert torch.allclose(lp1[m], lp0[m], atol=1e-5) and torch.allclose(ent1[m], ent0[m], atol=1e-5)
    assert not ent1.requires_grad
    assert (model.lm_head.weight is model.embed_tokens.weight) == tied
    for name in g0:
        scale = g0[name].abs().max().clamp(min=1e-3)
        assert torch.allclose(g1[name] / scale, g0[name] / scale, atol=1e-5), name


def test_response_logprobs_below_the_budget_is_the_full_path_bit_for_bit():
    model, batch = _model(True), _batch()
    logits = response_logits(model, batch)
    with torch.inference_mode():
        ref = response_logprobs(model, batch)  # the reference stage's call, default budget
    logp, ent = response_logprobs(model, batch, entropy=True)
    assert torch.equal(ref, logprobs_from_logits(logits, batch["responses"]).detach())
    assert torch.equal(logp, logprobs_from_logits(logits, batch["responses"]))
    assert torch.equal(ent, entropy_from_logits(logits).detach())


@pytest.mark.parametrize("tied", [True, False])
def test_actor_update_loss_above_the_budget_equals_the_full_logits(monkeypatch, tied):
    """``ActorUpdate._loss`` (policy loss, KL to the reference, entropy metric) when the
    module budget is small enough to chunk (``LOGITS_BUDGET`` is read at each call)."""
    from types import SimpleNamespace

    from distflow.algos import get_policy_loss, losses
    from distflow.rl.stages import ActorUpdate

    model, batch = _model(tied, seed=1), _batch(seed=1)
    g = torch.Generator().manual_seed(2)
    shape = batch["responses"].shape
    batch = batch.with_columns(old_logprobs=-7 + torch.randn(shape, generator=g),
                               ref_logprobs=-7 + torch.randn(shape, generator=g),
                               advantages=torch.randn(shape, generator=g))
    update = ActorUpdate.__new__(ActorUpdate)
    update.actor, update.loss = SimpleNamespace(model=model), get_policy_loss("ppo_clip")
    ctx = SimpleNamespace(params={"clip_eps": 0.2, "kl_estimator": "k3", "kl_coef": 0.1, "kl_loss": True})

    def run():
        model.zero_grad()
        loss, stats = update._loss(ctx, batch)
        loss.backward()
        return loss.detach(), stats, {n: p.grad.clone() for n, p in model.named_parameters()}

    loss0, stats0, g0 = run()
    calls = []
    real = losses._ChunkedLogprobs.apply
    monkeypatch.setattr(losses._ChunkedLogprobs, "apply", lambda *a: calls.append(a[3]) or real(*a))
    monkeypatch.setattr(losses, "LOGITS_BUDGET", _budget(10))
    loss1, stats1, g1 = run()
    assert calls == [10]                                      # chunked, 10 tokens a chunk
    assert torch.allclose(loss1, loss0, rtol=1e-5, atol=1e-5)
    for k in stats0:
        assert stats1[k] == pytest.approx(stats0[k], rel=1e-5, abs=1e-5), k
    for name in g0:
        scale = g0[name].abs().max().clamp(min=1e-3)
        assert torch.allclose(g1[name] / scale, g0[name] / scale, atol=1e-5), name
