"""Shared-prefix computation (GRPO groups share their prompt) equals the unshared one:
model outputs, log-probs, gradients, generation; and the one-collective training step
equals the step with a precomputed normalizer."""
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distflow import Batch
from distflow.algos import logprobs_from_logits
from distflow.engines.generation import InferenceEngine
from distflow.engines.sampling import SamplingParams
from distflow.engines.training import OptimConfig, TrainEngine
from distflow.models import DecoderLM, preset
from distflow.models.prefix import even_groups, forward_shared, shared_prefixes
from distflow.rl.actors import Critic
from distflow.rl.stages import response_logits, response_outputs

pytestmark = pytest.mark.timeout(120)
EOS, PAD, VOCAB = 1, 0, 32


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return DecoderLM(preset("tiny", vocab_size=VOCAB, eos_token_id=EOS, pad_token_id=PAD, **overrides))


def _grpo_batch(seed=0, prompts=5, group=4, p=6, r=5, shuffle=False):
    """Ragged left-padded prompts, each repeated ``group`` times, ragged right-padded
    responses (some ending early)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, p + 1, (prompts,), generator=g)
    lens[0] = p
    tok = torch.full((prompts, p), PAD)
    pmask = torch.zeros((prompts, p), dtype=torch.bool)
    for i, n in enumerate(lens.tolist()):
        tok[i, p - n:] = torch.randint(3, VOCAB, (n,), generator=g)
        pmask[i, p - n:] = True
    tok, pmask = tok.repeat_interleave(group, 0), pmask.repeat_interleave(group, 0)
    n = prompts * group
    rlen = torch.randint(1, r + 1, (n,), generator=g)
    rlen[0] = r
    rmask = torch.arange(r)[None] < rlen[:, None]
    resp = torch.where(rmask, torch.randint(3, VOCAB, (n, r), generator=g), torch.full((n, r), PAD))
    order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
    return Batch({"prompts": tok[order], "prompt_mask": pmask[order], "responses": resp[order],
                  "response_mask": rmask[order]}, torch.arange(n), pmask.sum(1) + rlen,
                 groups=torch.arange(prompts).repeat_interleave(group)[order])


def test_shared_prefixes_finds_identical_prompts_only():
    b = _grpo_batch(shuffle=False)
    first, inverse = shared_prefixes(b["prompts"], b["prompt_mask"])
    assert len(first) == 5 and torch.equal(b["prompts"][first][inverse], b["prompts"])
    s = _grpo_batch(shuffle=True)  # not adjacent: found by sorting
    first, inverse = shared_prefixes(s["prompts"], s["prompt_mask"])
    assert len(first) == 5
    assert torch.equal(s["prompts"][first][inverse], s["prompts"])
    assert torch.equal(s["prompt_mask"][first][inverse], s["prompt_mask"])
    # distinct prompts, or too few repeats: no sharing
    distinct = torch.arange(12).reshape(4, 3)
    assert shared_prefixes(distinct, torch.ones(4, 3, dtype=torch.bool)) is None
    two = torch.tensor([[1, 2], [1, 2], [3, 4], [5, 6]])
    assert shared_prefixes(two, torch.ones(4, 2, dtype=torch.bool)) is None
    # the same tokens under a different mask are different prompts
    t = torch.tensor([[0, 5], [0, 5], [0, 5], [0, 5]])
    m = torch.tensor([[False, True], [True, True], [False, True], [True, True]])
    first, inverse = shared_prefixes(t, m)
    assert inverse.tolist() in ([0, 1, 0, 1], [1, 0, 1, 0])


def _uneven_batch(seed=0, p=4, r=3):
    """Groups of 1, 5, 2 and 3 samples of 4 prompts, interleaved."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, VOCAB, (4, p), generator=g)
    pmask = torch.ones((4, p), dtype=torch.bool)
    pmask[1, :2] = False
    which = torch.tensor([1, 0, 1, 2, 3, 1, 3, 1, 2, 3, 1])
    n = len(which)
    rmask = torch.arange(r)[None] < torch.randint(1, r + 1, (n,), generator=g)[:, None]
    resp = torch.where(rmask, torch.randint(3, VOCAB, (n, r), generator=g), torch.full((n, r), PAD))
    return Batch({"prompts": torch.where(pmask, prompts, PAD)[which], "prompt_mask": pmask[which],
                  "responses": resp, "response_mask": rmask}, torch.arange(n), groups=which)


def _shared_vs_plain(model, b, packed):
    tokens = torch.cat([b["prompts"], b["responses"]], 1)
    mask = torch.cat([b["prompt_mask"], b["response_mask"]], 1)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    p = b["prompts"].shape[1]
    weights = torch.randn(tokens.shape + (VOCAB,), generator=torch.Generator().manual_seed(9))
    results = []
    for shared in (False, True):
        model.zero_grad()
        if shared:
            first, inverse = shared_prefixes(b["prompts"], b["prompt_mask"], max_share=1.0)
            prefix_out, out = forward_shared(model, tokens[first, :p], pos[first, :p], mask[first, :p],
                                             inverse, tokens[:, p:], pos[:, p:], mask, packed=packed)
            full = torch.cat([prefix_out.index_select(0, inverse), out], 1)
        else:
            full = model(tokens, pos, mask)
        # a loss over every real position (prefix positions weigh once per row either way)
        (full * weights * mask[..., None]).sum().backward()
        results.append((full.detach(), {n: q.grad.clone() for n, q in model.named_parameters()}))
    (plain, g0), (shared, g1) = results
    assert torch.allclose(shared[mask], plain[mask], atol=1e-5)
    for name in g0:
        scale = g0[name].abs().max().clamp(min=1e-3)
        assert torch.allclose(g0[name] / scale, g1[name] / scale, atol=1e-5), name


def _assert_same(batch, lp0, g0, lp1, g1, atol):
    """Log-probs equal on the response tokens, every gradient equal relative to its scale."""
    m = batch["response_mask"]
    assert torch.allclose(lp0[m], lp1[m], atol=atol)
    for name in g0:
        scale = g0[name].abs().max().clamp(min=1e-3)
        assert torch.allclose(g0[name] / scale, g1[name] / scale, atol=atol), name


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_forward_shared_equals_the_plain_forward(shuffle, packed):
    _shared_vs_plain(_model(1, attention_bias=True), _grpo_batch(1, shuffle=shuffle), packed)


@pytest.mark.parametrize("packed", [False, True])
def test_forward_shared_with_uneven_groups(packed):
    _shared_vs_plain(_model(8), _uneven_batch(8), packed)


def test_even_groups_splits_a_prompt_drawn_twice():
    assert even_groups(torch.tensor([2] * 4 + [0] * 8 + [2] * 4), 3) is None  # sizes 8 and 8
    index = torch.tensor([0] * 4 + [1] * 8 + [2] * 4)
    piece_index, pick, first_piece = even_groups(index, 3)
    assert piece_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert pick.tolist() == [0, 1, 1, 2] and first_piece.tolist() == [0, 1, 3]
    assert even_groups(torch.tensor([1, 0, 1, 2, 3, 1, 3, 1, 2, 3, 1]), 4) is None  # all sizes differ


@pytest.mark.parametrize("packed", [None, True])
def test_forward_shared_with_a_prompt_drawn_twice(packed):
    b = _grpo_batch(4, prompts=4, group=4, p=3, r=3)
    b = Batch({k: torch.cat([b[k][:4], b[k][:4], b[k][4:]]) if k.startswith("prompt") else
               torch.cat([b[k][4:8], b[k][:4], b[k][4:]]) for k in ("prompts", "prompt_mask",
                                                                      "responses", "response_mask")},
              torch.arange(20))  # rows 0-7: one prompt, 8 samples; then groups of 4
    first, inverse = shared_prefixes(b["prompts"], b["prompt_mask"])
    assert torch.bincount(inverse).tolist() == [8, 4, 4, 4]
    assert even_groups(inverse, len(first)) is not None
    _shared_vs_plain(_model(9), b, packed)


def _logp_and_grads(model, batch, share):
    """Log-probs of a policy-gradient-like loss and every parameter's gradient (on the CPU,
    wherever the model is)."""
    model.zero_grad()
    logits = response_logits(model, batch, share)
    logp = logprobs_from_logits(logits, batch["responses"].to(logits.device))
    adv = torch.linspace(-1, 1, logp.numel(), device=logp.device).reshape(logp.shape)
    ((logp * adv + logp.exp()) * batch["response_mask"].to(logp.device)).sum().backward()
    return logp.detach().cpu(), {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("r", [1, 2, 5])
def test_shared_prompt_logprobs_and_gradients_equal_unshared(shuffle, r):
    model = _model(2, attention_bias=True)
    batch = _grpo_batch(2, r=r, shuffle=shuffle)
    lp0, g0 = _logp_and_grads(model, batch, share=False)
    lp1, g1 = _logp_and_grads(model, batch, share=True)
    _assert_same(batch, lp0, g0, lp1, g1, atol=1e-5)


def test_shared_prompt_critic_values_equal_unshared():
    critic = Critic(_model(3))
    torch.nn.init.normal_(critic.value_head.weight)
    batch = _grpo_batch(3)
    v0 = response_outputs(critic, batch, share_prefix=False)
    v1 = response_outputs(critic, batch, share_prefix=True)
    m = batch["response_mask"]
    assert torch.allclose(v0[m], v1[m], atol=1e-5)


def test_distinct_prompts_give_the_plain_forwards_outputs():
    model = _model(4)
    batch = _grpo_batch(4, prompts=8, group=1)
    assert shared_prefixes(batch["prompts"], batch["prompt_mask"]) is None
    a = response_logits(model, batch, share_prefix=True)   # packed if that pays
    b = response_logits(model, batch, share_prefix=False)  # the plain padded forward
    m = batch["response_mask"]
    assert torch.allclose(a[m], b[m], atol=1e-5)


def test_generation_shares_the_prefill_of_repeated_prompts():
    model = _model(5).eval()
    eng = InferenceEngine(model, EOS, PAD)
    prompts = [[5, 6, 7], [9, 3], [4]]
    rows = [p for p in prompts for _ in range(4)]
    params = SamplingParams(temperature=1.0, max_new_tokens=6)
    seeds = torch.arange(len(rows)) + 77
    grouped = eng.generate(rows, params, row_seeds=seeds)
    # every row alone (nothing to share): the same tokens, the same log-probs
    for i, row in enumerate(rows):
        alone = eng.generate([row], params, row_seeds=seeds[i:i + 1])
        n = int(alone.lengths[0])
        assert grouped.lengths[i] == n
        assert grouped.responses[i, :n].tolist() == alone.responses[0, :n].tolist()
        assert torch.allclose(grouped.logprobs[i, :n], alone.logprobs[0, :n], atol=1e-5)


def test_generate_padded_equals_generate():
    model = _model(6).eval()
    eng = InferenceEngine(model, EOS, PAD)
    rows = [[5, 6, 7], [5, 6, 7], [9, 3], [9, 3]]
    params = SamplingParams(temperature=0.0, max_new_tokens=4)
    a = eng.generate(rows, params)
    tok = torch.tensor([[PAD, PAD, 5, 6, 7], [PAD, PAD, 5, 6, 7], [PAD, PAD, PAD, 9, 3], [PAD, PAD, PAD, 9, 3]])
    b = eng.generate_padded(tok, tok != PAD, params)
    assert torch.equal(a.responses, b.responses) and torch.equal(a.logprobs, b.logprobs)
    assert torch.equal(a.prompts, b.prompts)


# -- the one-collective step ----------------------------------------------------------------
def _train(world, rank, by_stat, n_local, group=None, reducer=None, model=None):
    model = _model(7) if model is None else model
    engine = TrainEngine(model, OptimConfig(lr=1e-2, micro_batch_tokens=12), group, reducer=reducer)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, VOCAB, (8, 5), generator=g)
    valid = torch.rand((8, 4), generator=g) > 0.3
    shards = [torch.arange(0, 8)] if world == 1 else [torch.arange(0, n_local), torch.arange(n_local, 8)]
    mine = shards[rank]

    def loss_fn(index):
        rows = mine[index]
        logp = torch.log_softmax(model(tokens[rows])[:, :-1].float(), -1).gather(
            -1, tokens[rows, 1:, None]).squeeze(-1)
        m = valid[rows]
        loss = -(logp * m).sum()
        return loss, {"tokens": float(m.sum()), "nll": float(loss.detach())}

    total = float(valid.sum())
    if by_stat:
        stats = engine.step(len(mine), torch.full((len(mine),), 5), loss_fn, normalizer="tokens",
                            sums=("nll",))
    else:
        stats = engine.step(len(mine), torch.full((len(mine),), 5), loss_fn, normalizer=total)
    # the (clipped) gradients, and the parameters after the step
    return [p.grad.clone() for p in model.parameters()], [p.detach().clone() for p in model.parameters()], stats


def _close(grads, ref_grads, params, ref_params):
    for g, rg in zip(grads, ref_grads):
        scale = rg.abs().max().clamp(min=1e-6)
        assert torch.allclose(g / scale, rg / scale, atol=1e-5)
    for x, y in zip(params, ref_params):  # Adam's g / sqrt(v) amplifies rounding of tiny g
        assert torch.allclose(x, y, atol=1e-4)


def test_normalizer_by_stat_equals_a_precomputed_normalizer():
    ga, a, sa = _train(1, 0, by_stat=False, n_local=8)
    gb, b, sb = _train(1, 0, by_stat=True, n_local=8)
    assert sa["tokens"] == sb["tokens"] and abs(sa["grad_norm"] - sb["grad_norm"]) < 1e-5
    _close(gb, ga, b, a)


def _gloo(rank, world, init_file, out_dir, n_local):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        torch.save(_train(world, rank, True, n_local), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("n_local", [3, 0])  # uneven shards; a rank with no samples
def test_one_collective_step_over_ranks_equals_one_process(tmp_path, n_local):
    mp.spawn(_gloo, args=(2, str(tmp_path / "init"), str(tmp_path), n_local), nprocs=2)
    ref_grads, ref, ref_stats = _train(1, 0, by_stat=False, n_local=8)
    for rank in range(2):
        grads, params, stats = torch.load(tmp_path / f"rank{rank}.pt")
        assert stats["tokens"] == ref_stats["tokens"]  # global sums, exact
        assert abs(stats["nll"] - ref_stats["nll"]) < 1e-5 * abs(ref_stats["nll"])
        assert abs(stats["grad_norm"] - ref_stats["grad_norm"]) < 1e-5
        _close(grads, ref_grads, params, ref)


def test_ragged_packing_computes_real_tokens_only():
    """Long ragged responses (1..24 tokens): the cost model packs them, the model sees
    only the real tokens (rows padded to the longest packed row), and log-probs and
    gradients equal the plain padded forward."""
    model = _model(3, attention_bias=True)
    batch = _grpo_batch(3, prompts=4, group=6, p=5, r=24)
    seen = []
    hook = model.embed_tokens.register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
    lp1, g1 = _logp_and_grads(model, batch, share=True)
    hook.remove()
    real = int(batch["prompt_mask"].sum() / 6 + batch["response_mask"].sum()) - len(batch)  # last token predicts nothing
    assert len(seen) == 1 and seen[0][0] == 4  # one pass, one row per prompt
    assert seen[0][0] * seen[0][1] < 1.4 * real < 24 * len(batch)
    lp0, g0 = _logp_and_grads(model, batch, share=False)
    _assert_same(batch, lp0, g0, lp1, g1, atol=1e-5)


def test_distinct_prompts_pack_several_rows_per_row():
    """No prompt repeats, long ragged responses: rows are packed several to a packed row
    (fewer rows than samples), with the plain forward's log-probs and gradients."""
    model = _model(4)
    batch = _grpo_batch(4, prompts=12, group=1, p=4, r=24)
    seen = []
    hook = model.embed_tokens.register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape)))
    lp1, g1 = _logp_and_grads(model, batch, share=True)
    hook.remove()
    assert len(seen) == 1 and seen[0][0] < 12, seen
    lp0, g0 = _logp_and_grads(model, batch, share=False)
    _assert_same(batch, lp0, g0, lp1, g1, atol=1e-5)
