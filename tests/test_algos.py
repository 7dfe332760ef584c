"""Tests of ``distflow.algos``: advantage estimators, KL estimators, losses and logit
helpers against HAND-COMPUTED values (the arithmetic is in the comments), plus
properties: padding never matters, k3 >= 0, grouped estimators vs a naive loop."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distflow.algos import (ADVANTAGES, AGG_MODES, KL_ESTIMATORS, POLICY_LOSSES, aggregate,
                            entropy_from_logits, gae, get_advantage, get_kl_estimator,
                            get_policy_loss, grpo, kl_divergence, logprobs_from_logits,
                            masked_mean, masked_whiten, ppo_policy_loss, reinforce_pp, rloo,
                            value_loss)

pytestmark = pytest.mark.timeout(60)

P = 123.0  # a garbage value in padded positions: must never show up in a result


def T(*rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


def close(actual, expected, atol=1e-5):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-5)


# ------------------------------------------------------------------ masked reductions

def test_masked_mean_ignores_padding_and_empty_is_zero():
    x = T([1, 2, 3, P], [4, P, P, P])
    m = T([1, 1, 1, 0], [1, 0, 0, 0])
    close(masked_mean(x, m), (1 + 2 + 3 + 4) / 4)          # 2.5
    close(masked_mean(x, m, dim=-1), [2.0, 4.0])           # (1+2+3)/3, 4/1
    close(masked_mean(x, torch.zeros_like(m)), 0.0)        # nothing selected -> 0, not NaN
    close(masked_mean(x, m.bool(), dim=0), [2.5, 2, 3, 0])  # column 3 empty -> 0


def test_masked_whiten_by_hand():
    x = T([1, 2, 3, P])
    m = T([1, 1, 1, 0])
    # mean 2, unbiased var ((-1)^2 + 0 + 1^2) / (3 - 1) = 1 -> (x - 2) / sqrt(1 + 1e-8)
    close(masked_whiten(x, m), [[-1, 0, 1, 0]])
    # shift_mean=False adds the mean back: [1, 2, 3], padding still 0
    close(masked_whiten(x, m, shift_mean=False), [[1, 2, 3, 0]])
    # a single real entry has var 0 and whitens to 0
    close(masked_whiten(T([5, P]), T([1, 0])), [[0, 0]])


# ------------------------------------------------------------------------------ GRPO

GROUPS = torch.tensor([7, 3, 7, 9, 7, 3, 7, 3])
REWARDS = torch.tensor([1., 2., 0., 5., 1., 2., 0., 2.])
# group 7: rewards [1, 0, 1, 0]; group 3: [2, 2, 2] (all equal); group 9: [5] (size 1)
LENS = torch.tensor([3, 1, 2, 3, 0, 3, 1, 2])
MASK8 = (torch.arange(3)[None, :] < LENS[:, None]).long()  # [8, 3], row 4 empty


def test_grpo_two_groups_equal_group_and_singleton():
    adv, ret = grpo(REWARDS, MASK8, GROUPS)
    # group 7: mean 0.5, deviations +-0.5, unbiased var 4 * 0.25 / (4 - 1) = 1/3,
    # std = 0.57735 -> A = +-0.5 / (0.57735 + 1e-6) = +-0.866025 (= sqrt(3)/2)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    seq = torch.tensor([a, 0, -a, 0, a, 0, -a, 0])  # groups 3 and 9 -> 0
    close(adv, seq[:, None] * MASK8)
    close(ret, adv)
    assert adv.shape == (8, 3) and (adv[MASK8 == 0] == 0).all()


def test_grpo_uses_unbiased_std_and_dr_grpo_skips_it():
    r, g, m = torch.tensor([0., 1.]), torch.tensor([0, 0]), torch.ones(2, 1)
    # mean 0.5; unbiased std sqrt((0.25 + 0.25) / 1) = 0.7071 -> A = +-0.5/0.7071 = +-0.7071
    # (a biased std, 0.5, would give +-1)
    close(grpo(r, m, g)[0], [[-math.sqrt(0.5)], [math.sqrt(0.5)]])
    # Dr.GRPO: A = r - mean = +-0.5
    close(grpo(r, m, g, norm_by_std=False)[0], [[-0.5], [0.5]])
    close(grpo(REWARDS, MASK8, GROUPS, norm_by_std=False)[0],
          torch.tensor([.5, 0, -.5, 0, .5, 0, -.5, 0])[:, None] * MASK8)


def test_grpo_equal_inexact_rewards_give_exact_zero():
    # 0.1 is not exact in binary; the group mean of [0.1] * 3 may differ from 0.1 by an ulp,
    # and dividing that by (std ~ 0) + 1e-6 must not blow it up
    adv, _ = grpo(torch.full((3,), 0.1), torch.ones(3, 2), torch.zeros(3, dtype=torch.long))
    assert (adv == 0).all()


# ------------------------------------------------------------------------------ RLOO

def test_rloo_by_hand():
    r = torch.tensor([1., 3., 0., 1., 6., 0., 4.])
    g = torch.tensor([0, 1, 0, 0, 1, 0, 2])
    m = torch.ones(7, 2)
    m[2, 1] = 0
    # group 0 = [1, 0, 1, 0]: r=1 -> 1 - (0+1+0)/3 = 2/3; r=0 -> 0 - (1+1+0)/3 = -2/3
    # group 1 = [3, 6]: 3 - 6 = -3, 6 - 3 = 3; group 2 = [4] (size 1) -> 0
    seq = torch.tensor([2 / 3, -3, -2 / 3, 2 / 3, 3, -2 / 3, 0])
    adv, ret = rloo(r, m, g)
    close(adv, seq[:, None] * m)
    close(ret, adv)
    # equal rewards -> 0
    assert (rloo(REWARDS, MASK8, GROUPS)[0][[1, 5, 7]] == 0).all()


# ---------------------------------------------------------------------- REINFORCE++

R2 = torch.tensor([1., 2.])
M23 = T([1, 1, 1], [1, 1, 0])


def test_reinforce_pp_raw_returns():
    # rewards sit on the last real token: row 0 -> [0, 0, 1], row 1 -> [0, 2, pad]
    # gamma 1: reward-to-go [1, 1, 1], [2, 2, 0]
    adv, ret = reinforce_pp(R2, M23, whiten=False)
    close(ret, [[1, 1, 1], [2, 2, 0]])
    close(adv, ret)
    # gamma 0.5: row 0: t2 = 1, t1 = 0.5 * 1, t0 = 0.5 * 0.5; row 1: t1 = 2, t0 = 1
    adv, ret = reinforce_pp(R2, M23, gamma=0.5, whiten=False)
    close(ret, [[0.25, 0.5, 1], [1, 2, 0]])


def test_reinforce_pp_whitened_over_batch():
    # gamma 1: real returns {1, 1, 1, 2, 2}: mean 7/5 = 1.4, deviations -0.4 (x3), 0.6 (x2)
    # sum of squares 3*0.16 + 2*0.36 = 1.2, unbiased var 1.2/4 = 0.3, std 0.5477226
    adv, ret = reinforce_pp(R2, M23)
    lo, hi = -0.4 / math.sqrt(0.3), 0.6 / math.sqrt(0.3)   # -0.730297, 1.095445
    close(adv, [[lo, lo, lo], [hi, hi, 0]])
    close(ret, [[1, 1, 1], [2, 2, 0]])                     # returns stay unwhitened
    # gamma 0.5: {0.25, 0.5, 1, 1, 2}: mean 4.75/5 = 0.95,
    # deviations -0.7, -0.45, 0.05, 0.05, 1.05; squares .49 + .2025 + .0025 + .0025 + 1.1025
    # = 1.8, var 1.8/4 = 0.45, std 0.6708204
    s = math.sqrt(0.45)
    adv, _ = reinforce_pp(R2, M23, gamma=0.5)
    close(adv, [[-0.7 / s, -0.45 / s, 0.05 / s], [0.05 / s, 1.05 / s, 0]])


def test_reinforce_pp_token_rewards_with_folded_kl():
    # per-token rewards -0.1 (a KL penalty) and +1 at the end: reward-to-go
    # t2 = 0.9, t1 = -0.1 + 0.9 = 0.8, t0 = -0.1 + 0.8 = 0.7; padding value ignored
    tok = T([-0.1, -0.1, 0.9, P])
    _, ret = reinforce_pp(tok, T([1, 1, 1, 0]), whiten=False)
    close(ret, [[0.7, 0.8, 0.9, 0]])


# ------------------------------------------------------------------------------- GAE

def test_gae_gamma1_lam1_is_reward_to_go_minus_value():
    r = T([0, 0, 1], [0, 2, P])
    v = T([.5, .2, .3], [1, 1.5, P])
    m = T([1, 1, 1], [1, 1, 0])
    # reward-to-go [1, 1, 1], [2, 2, -]; A = G - V = [.5, .8, .7], [1, .5, 0]; R = A + V = G
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0, whiten=False)
    close(adv, [[.5, .8, .7], [1, .5, 0]])
    close(ret, [[1, 1, 1], [2, 2, 0]])


def test_gae_gamma09_lam08_by_hand():
    r, v, m = T([0, 0, 1, P]), T([.5, .6, .7, P]), T([1, 1, 1, 0])
    # V beyond the last real token = 0; gamma * lam = 0.72
    # t2: delta = 1 + 0.9*0 - 0.7 = 0.3;       A2 = 0.3
    # t1: delta = 0 + 0.9*0.7 - 0.6 = 0.03;    A1 = 0.03 + 0.72*0.3 = 0.246
    # t0: delta = 0 + 0.9*0.6 - 0.5 = 0.04;    A0 = 0.04 + 0.72*0.246 = 0.21712
    # returns = A + V = [0.71712, 0.846, 1.0]
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.8, whiten=False)
    close(adv, [[0.21712, 0.246, 0.3, 0]])
    close(ret, [[0.71712, 0.846, 1.0, 0]])
    # whitened: (A - mean) / std over the 3 real tokens; returns unchanged
    adv_w, ret_w = gae(r, v, m, gamma=0.9, lam=0.8)
    close(adv_w, masked_whiten(T([0.21712, 0.246, 0.3, 0]), m))
    close(ret_w, ret)
    # a sequence-level reward [N] is put on the last real token: same result
    close(gae(torch.tensor([1.]), v, m, gamma=0.9, lam=0.8, whiten=False)[0], adv)


# -------------------------------------------------------------------------------- KL

def test_kl_estimators_known_numbers():
    logp, ref = torch.tensor([-1., -2., -0.5]), torch.tensor([-2., -1., -0.5])
    close(kl_divergence(logp, ref, "k1"), [1, -1, 0])                 # logp - ref
    close(kl_divergence(logp, ref, "k2"), [0.5, 0.5, 0])              # 0.5 * d^2
    # k3 with x = ref - logp: x = -1 -> e^-1 + 1 - 1 = 0.367879; x = 1 -> e - 2 = 0.718282
    k3 = [math.exp(-1), math.e - 2, 0]
    close(kl_divergence(logp, ref, "k3"), k3)
    close(kl_divergence(logp, ref, "low_var_kl"), k3)
    close(kl_divergence(logp, ref, "kl"), [1, -1, 0])                 # verl aliases
    close(kl_divergence(logp, ref, "mse"), [0.5, 0.5, 0])


def test_k3_clamped_with_finite_gradient():
    logp = torch.tensor([0., -30., -1000.], requires_grad=True)
    ref = torch.tensor([-30., 0., 0.])
    # x = -30 -> e^-20 + 20 - 1 = 19 -> 10; x = 30 and 1000 -> huge -> 10
    k = kl_divergence(logp, ref, "k3")
    close(k, [10, 10, 10])
    k.sum().backward()
    assert torch.isfinite(logp.grad).all()


@settings(max_examples=200, deadline=None)
@given(st.floats(-50, 50), st.floats(-50, 50), st.sampled_from([torch.float32, torch.float64]))
def test_k3_nonnegative(a, b, dtype):
    k = kl_divergence(torch.tensor([a], dtype=dtype), torch.tensor([b], dtype=dtype), "k3")
    assert k.item() >= 0.0
    assert kl_divergence(torch.tensor([a], dtype=dtype),
                         torch.tensor([a], dtype=dtype), "k3").item() == 0.0


@settings(max_examples=200, deadline=None)
@given(st.floats(-30, 30), st.floats(1e-4, 30), st.booleans())
def test_k3_zero_iff_equal(a, d, neg):
    b = a - d if neg else a + d
    assert kl_divergence(torch.tensor([a], dtype=torch.float64),
                         torch.tensor([b], dtype=torch.float64), "k3").item() > 0.0


# ------------------------------------------------------------------------ aggregation

def test_aggregate_modes_on_ragged_mask():
    loss = T([1, 2, 3], [4, P, P], [P, P, P])
    m = T([1, 1, 1], [1, 0, 0], [0, 0, 0])   # last row all padding
    close(aggregate(loss, m, "token-mean"), 10 / 4)              # (1+2+3+4) / 4 = 2.5
    close(aggregate(loss, m, "seq-mean-token-sum"), (6 + 4) / 2)  # 5, empty row skipped
    close(aggregate(loss, m, "seq-mean-token-mean"), (2 + 4) / 2)  # 3
    for agg in AGG_MODES:
        close(aggregate(loss, torch.zeros_like(m), agg), 0.0)


# ----------------------------------------------------------------------- policy loss

def test_ppo_ratio_one_is_minus_mean_advantage():
    old = T([-1, -2, -3], [-1, P, P])
    adv = T([1, 2, 3], [4, P, P])
    m = T([1, 1, 1], [1, 0, 0])
    loss, stats = ppo_policy_loss(old.clone(), old, adv, m)
    close(loss, -(1 + 2 + 3 + 4) / 4)                            # -2.5
    assert stats == {"clipfrac": 0.0, "approx_kl": 0.0, "ppo_kl": 0.0, "ratio_mean": 1.0}
    # the aggregation modes, with loss_mat = -adv:
    close(ppo_policy_loss(old, old, adv, m, agg="seq-mean-token-sum")[0], -(6 + 4) / 2)
    close(ppo_policy_loss(old, old, adv, m, agg="seq-mean-token-mean")[0], -(2 + 4) / 2)


def test_ppo_clipping_zero_gradient_and_clipfrac():
    old = torch.zeros(1, 5)
    # ratios: 1.5 (A=+1, clipped at 1.2), 1 (A=+2), 0.5 (A=-1, clipped at 0.8),
    #         1.5 (A=-1, NOT clipped: the unclipped term is the larger), padding
    logp = torch.log(T([1.5, 1.0, 0.5, 1.5, 7.0])).requires_grad_(True)
    adv = T([1, 2, -1, -1, P])
    m = T([1, 1, 1, 1, 0])
    loss, stats = ppo_policy_loss(logp, old, adv, m, clip_eps=0.2)
    # per token: max(-1*1.5, -1*1.2) = -1.2; -2*1 = -2; max(0.5, 0.8) = 0.8; max(1.5, 1.2)
    # = 1.5 -> token-mean (-1.2 - 2 + 0.8 + 1.5) / 4 = -0.225
    close(loss, -0.225)
    assert stats["clipfrac"] == pytest.approx(2 / 4)
    # ratio_mean (1.5 + 1 + 0.5 + 1.5) / 4 = 1.125
    assert stats["ratio_mean"] == pytest.approx(1.125)
    loss.backward()
    # d/dlogp of -A * ratio / 4 = -A * ratio / 4: token 1 -> -2*1/4 = -0.5,
    # token 3 -> +1*1.5/4 = 0.375; clipped tokens 0 and 2 and padding -> exactly 0
    close(logp.grad, [[0, -0.5, 0, 0.375, 0]])
    assert logp.grad[0, 0] == 0 and logp.grad[0, 2] == 0 and logp.grad[0, 4] == 0


def test_ppo_clip_higher_and_kl_stats():
    logp, old, m = torch.log(T([1.25])), torch.zeros(1, 1), torch.ones(1, 1)
    # ratio 1.25, A = 1: clipped at 1.2 with eps 0.2 -> -1.2; kept with eps_high 0.28 -> -1.25
    close(ppo_policy_loss(logp, old, torch.ones(1, 1), m)[0], -1.2)
    loss, stats = ppo_policy_loss(logp, old, torch.ones(1, 1), m, clip_eps_high=0.28)
    close(loss, -1.25)
    assert stats["clipfrac"] == 0.0
    # KL(old || new) with ratio r = 2: k3 = r - 1 - log r = 1 - 0.693147 = 0.306853,
    # k1 = old - new = -log 2
    _, stats = ppo_policy_loss(torch.log(T([2.0])), old, torch.ones(1, 1), m)
    assert stats["approx_kl"] == pytest.approx(1 - math.log(2), rel=1e-5)
    assert stats["ppo_kl"] == pytest.approx(-math.log(2), rel=1e-5)
    assert stats["ratio_mean"] == pytest.approx(2.0, rel=1e-5)


# ------------------------------------------------------------------------ value loss

def test_value_loss_clipping():
    old = T([1.0, 1.0, 1.0, P])
    v = T([1.5, 1.1, 1.5, P]).requires_grad_(True)
    ret = T([2.0, 0.0, 0.0, P])
    m = T([1, 1, 1, 0])
    # token 0: v_clip = 1 + clamp(0.5, -.2, .2) = 1.2; (1.5-2)^2 = .25 < (1.2-2)^2 = .64 -> .64
    # token 1: within the clip: (1.1-0)^2 = 1.21 both ways -> 1.21 (not counted as clipped)
    # token 2: v_clip 1.2: (1.5-0)^2 = 2.25 > (1.2-0)^2 = 1.44 -> 2.25
    # loss = 0.5 * (.64 + 1.21 + 2.25) / 3 = 0.683333
    loss, stats = value_loss(v, old, ret, m, clip_eps=0.2)
    close(loss, 0.5 * (0.64 + 1.21 + 2.25) / 3)
    assert stats["vf_clipfrac"] == pytest.approx(1 / 3)
    loss.backward()
    # d/dv 0.5 * (v - R)^2 / 3 = (v - R) / 3: token 1 -> 1.1/3, token 2 -> 1.5/3;
    # token 0 is clipped -> 0; padding -> 0
    close(v.grad, [[0, 1.1 / 3, 0.5, 0]])


# ------------------------------------------------------------------- logit helpers

def test_entropy_uniform_is_log_v_and_stable():
    close(entropy_from_logits(torch.zeros(2, 3, 7)), torch.full((2, 3), math.log(7)))
    close(entropy_from_logits(torch.full((1, 2, 7), 1e4)), torch.full((1, 2), math.log(7)))
    z = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(0)) * 3
    p = torch.softmax(z, -1)
    close(entropy_from_logits(z), -(p * p.log()).sum(-1))
    # gradient matches the naive formula
    zz = z.clone().requires_grad_(True)
    entropy_from_logits(zz).sum().backward()
    zn = z.clone().requires_grad_(True)
    pn = torch.softmax(zn, -1)
    (-(pn * pn.log()).sum()).backward()
    close(zz.grad, zn.grad)
    # a one-hot-ish distribution has entropy ~0
    close(entropy_from_logits(T([[0.0, -1e4, -1e4]])), [[0.0]])


def test_logprobs_match_naive_softmax():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 4, 9, generator=g) * 2
    tok = torch.randint(0, 9, (3, 4), generator=g)
    naive = torch.log(torch.softmax(z, -1)).gather(-1, tok[..., None]).squeeze(-1)
    close(logprobs_from_logits(z, tok), naive)
    # stable where the naive form underflows: log softmax([1000, 0])[1] = -1000
    close(logprobs_from_logits(T([[1000.0, 0.0]]), torch.tensor([[1]])), [[-1000.0]])
    # a large common offset changes nothing (z on a 2^-8 grid, so z + 1e4 is exact in
    # float32; without the max shift the float32 ulp at 1e4, ~1e-3, would show)
    zg = torch.round(z * 256) / 256
    naive_g = torch.log(torch.softmax(zg, -1)).gather(-1, tok[..., None]).squeeze(-1)
    close(logprobs_from_logits(zg + 1e4, tok), naive_g)
    # bf16 logits are computed in float32
    assert logprobs_from_logits(z.bfloat16(), tok).dtype == torch.float32
    # gradients flow: d logp / d z = onehot - softmax
    zz = z.clone().requires_grad_(True)
    logprobs_from_logits(zz, tok)[0, 0].backward()
    expect = -torch.softmax(z[0, 0], -1)
    expect[tok[0, 0]] += 1
    close(zz.grad[0, 0], expect)


# -------------------------------------------------------- padding never affects results

def _ragged(seed: int, n: int, t: int):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, t + 1, (n,), generator=g)
    mask = torch.arange(t)[None, :] < lens[:, None]
    rnd = lambda: torch.randn(n, t, generator=g)  # noqa: E731
    junk = lambda: torch.randn(n, t, generator=g) * 1e3  # noqa: E731
    return g, mask, rnd, junk


def _all_outputs(mask, tok, vals, old_vals, logp, old_logp, adv, rewards, groups):
    out = {
        "mean": masked_mean(tok, mask), "mean_row": masked_mean(tok, mask, dim=-1),
        "whiten": masked_whiten(tok, mask),
        "grpo": grpo(rewards, mask, groups), "rloo": rloo(rewards, mask, groups),
        "rpp_seq": reinforce_pp(rewards, mask, gamma=0.9),
        "rpp_tok": reinforce_pp(tok, mask, gamma=0.9),
        "gae": gae(tok, vals, mask, gamma=0.9, lam=0.8),
        "vloss": value_loss(vals, old_vals, tok, mask),
    }
    for agg in AGG_MODES:
        out["agg" + agg] = aggregate(tok, mask, agg)
        out["ppo" + agg] = ppo_policy_loss(logp, old_logp, adv, mask, agg=agg)
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 5), st.integers(1, 6))
def test_padding_values_never_matter(seed, n, t):
    g, mask, rnd, junk = _ragged(seed, n, t)
    rewards = torch.randn(n, generator=g)
    groups = torch.randint(0, 3, (n,), generator=g)
    clean = [rnd() for _ in range(6)]                       # tok, vals, old, logp, old, adv
    clean[3] = clean[4] + 0.3 * clean[3]                    # ratios near 1, some clipped
    dirty = [torch.where(mask, x, junk()) for x in clean]
    a = _all_outputs(mask, *clean, rewards, groups)
    b = _all_outputs(mask, *dirty, rewards, groups)
    for key in a:
        ta = a[key] if isinstance(a[key], tuple) else (a[key],)
        tb = b[key] if isinstance(b[key], tuple) else (b[key],)
        for x, y in zip(ta, tb):
            if isinstance(x, dict):
                assert x == y, key
            else:
                assert torch.equal(x, y), key
                if x.dim() == 2:
                    assert (x[~mask] == 0).all(), key   # token outputs are 0 on padding


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 5), st.integers(1, 6))
def test_padding_gets_zero_gradient(seed, n, t):
    _, mask, rnd, junk = _ragged(seed, n, t)
    logp = torch.where(mask, rnd() * 0.3, junk()).requires_grad_(True)
    vals = torch.where(mask, rnd(), junk()).requires_grad_(True)
    for agg in AGG_MODES:
        ppo_policy_loss(logp, torch.zeros(n, t), rnd(), mask, agg=agg)[0].backward()
    value_loss(vals, rnd(), rnd(), mask)[0].backward()
    assert (logp.grad[~mask] == 0).all() and (vals.grad[~mask] == 0).all()


# ------------------------------------------------- grouped estimators vs a naive loop

@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(-3, 3)), min_size=1, max_size=12))
def test_grpo_rloo_match_naive_per_group_loop(pairs):
    groups = torch.tensor([p[0] for p in pairs])
    rewards = torch.tensor([float(p[1]) for p in pairs], dtype=torch.float64)
    mask = torch.ones(len(pairs), 2)
    g_adv = grpo(rewards, mask, groups)[0][:, 0]
    r_adv = rloo(rewards, mask, groups)[0][:, 0]
    for i, (gid, r) in enumerate(pairs):
        grp = torch.tensor([float(q[1]) for q in pairs if q[0] == gid], dtype=torch.float64)
        if len(grp) == 1:
            exp_g = exp_r = 0.0
        else:
            exp_g = ((r - grp.mean()) / (grp.std() + 1e-6)).item()   # torch.std: unbiased
            exp_r = r - (grp.sum() - r).item() / (len(grp) - 1)
        assert g_adv[i].item() == pytest.approx(exp_g, abs=1e-9)
        assert r_adv[i].item() == pytest.approx(exp_r, abs=1e-9)


# ---------------------------------------------------------------- registries, errors

def test_registries_pick_by_name():
    assert set(ADVANTAGES) == {"grpo", "rloo", "reinforce_pp", "gae"}
    assert get_advantage("grpo") is grpo and get_advantage("gae") is gae
    assert {"k1", "k2", "k3", "low_var_kl"} <= set(KL_ESTIMATORS)
    assert get_kl_estimator("low_var_kl") is get_kl_estimator("k3")
    assert POLICY_LOSSES == {"ppo_clip": ppo_policy_loss}
    assert get_policy_loss("ppo_clip") is ppo_policy_loss


@pytest.mark.parametrize("call, known", [
    (lambda: get_advantage("ppo"), "gae, grpo, reinforce_pp, rloo"),
    (lambda: get_kl_estimator("k4"), "k1, k2, k3, kl, low_var_kl, mse"),
    (lambda: kl_divergence(torch.zeros(1), torch.zeros(1), "abs"), "k1, k2, k3"),
    (lambda: get_policy_loss("dual_clip"), "ppo_clip"),
    (lambda: aggregate(torch.zeros(1, 1), torch.ones(1, 1), "sum"), "token-mean"),
])
def test_unknown_names_list_known_ones(call, known):
    with pytest.raises(ValueError, match="unknown") as e:
        call()
    assert known in str(e.value)


@pytest.mark.parametrize("call, numbers", [
    (lambda: grpo(torch.zeros(3), torch.ones(4, 2), torch.zeros(4, dtype=torch.long)),
     ["[4]", "[3]"]),
    (lambda: rloo(torch.zeros(4), torch.ones(4, 2), torch.zeros(5, dtype=torch.long)),
     ["[4]", "[5]"]),
    (lambda: grpo(torch.zeros(2), torch.ones(2, 2), torch.zeros(2)), ["float32"]),
    (lambda: grpo(torch.zeros(2), T([1, 0.5], [1, 1]), torch.zeros(2, dtype=torch.long)),
     ["0.5"]),
    (lambda: gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 4)), ["[2, 3]", "[2, 4]"]),
    (lambda: ppo_policy_loss(torch.zeros(2, 3), torch.zeros(2, 2), torch.zeros(2, 3),
                             torch.ones(2, 3)), ["[2, 2]", "[2, 3]"]),
    (lambda: value_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3),
                        torch.ones(3, 3)), ["[3, 3]", "[2, 3]"]),
    (lambda: kl_divergence(torch.zeros(3), torch.zeros(2)), ["[2]", "[3]"]),
    (lambda: logprobs_from_logits(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long)),
     ["[2, 3]", "[2, 4]"]),
    (lambda: logprobs_from_logits(torch.zeros(1, 2, 5), torch.tensor([[0, 5]])), ["5"]),
    (lambda: reinforce_pp(torch.zeros(2), torch.ones(2, 3), gamma=1.5), ["1.5"]),
])
def test_bad_input_raises_value_error_naming_numbers(call, numbers):
    with pytest.raises(ValueError) as e:
        call()
    for s in numbers:
        assert s in str(e.value), (s, str(e.value))
