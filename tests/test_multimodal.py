"""The VLM pieces on their own: data set, preprocessing errors, reordering (hypothesis +
hand-computed), the step plan, and gradients across the encoder/LLM boundary."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distflow.models.vlm import build_vlm, embed_with_images, pad_images, vlm_loss
from distflow.multimodal import digits as D
from distflow.multimodal.plan import llm_pipeline, one_f_one_b, plan_step
from distflow.multimodal.reorder import (StageCost, assign, johnson, makespan, order_microbatches,
                                         pipeline_makespan, pipeline_times)
from distflow.placement import PlacementError
from distflow.run import load_pipeline, prepare

PIPELINE = "pipelines/vlm.py"


# -- data ------------------------------------------------------------------------------------
def test_samples_are_deterministic_and_heterogeneous():
    specs = [D.spec("train", i) for i in range(200)]
    assert specs[:5] == [D.spec("train", i) for i in range(5)]
    assert {len(s.digits) for s in specs} == set(range(1, 9))
    assert len({s.seq_len for s in specs}) >= 20 and len({sum(s.patches) for s in specs}) > 30
    assert D.spec("heldout", 0) != D.spec("train", 0)
    s = D.SampleSpec("train", 0, (3, 7, 1), (8, 16, 24), 0)
    assert (s.answer, s.patches, s.seq_len) == ("3 7 1", (1, 4, 9), 1 + 3 + 27 + 5 + 1)
    assert D.SampleSpec("train", 0, (3, 7, 1), (8, 8, 8), 1).answer == "1 7 3"
    ids, targets = D.tokenize(s)
    assert (ids == D.IMAGE).sum() == 3 and ids[0] == D.BOS and ids[-1] == D.EOS
    scored = targets[targets != -100]
    assert bytes(scored[:-1].tolist()).decode() == "3 7 1" and scored[-1] == D.EOS


def test_preprocessing_decodes_resizes_and_patchifies():
    s = D.spec("train", 3)
    files = [D.render(s, k) for k in range(len(s.digits))]
    img = D.decode_pgm(files[0], "x")
    assert img.shape == (s.sides[0], s.sides[0]) and 0 <= img.min() and img.max() <= 1
    patches = D.preprocess_images(s, files)
    assert [p.shape for p in patches] == [(n, 64) for n in s.patches]


def test_corrupt_images_name_the_sample():
    s = D.spec("train", 5)
    good = D.render(s, 1)
    with pytest.raises(ValueError, match=r"sample train/5 image 1: corrupt image \(\d+ pixel bytes"):
        D.preprocess_images(s, [D.render(s, 0), good[:-3]] + [D.render(s, k) for k in range(2, len(s.digits))])
    with pytest.raises(ValueError, match="sample train/5 image 0: corrupt image"):
        D.preprocess_images(s, [b"\x89PNG\r\n garbage"])


def test_too_many_images_for_the_context_fails_before_any_worker():
    with pytest.raises(ValueError, match=r"max_images=8 images needs up to 52 tokens .* context=40"):
        prepare(PIPELINE, ["context=40"], 2)
    s = D.SampleSpec("train", 9, (1,) * 8, (24,) * 8, 0)
    with pytest.raises(ValueError, match=r"sample train/9 needs 52 tokens \(8 image tokens \+ text\) but the LLM context is 40"):
        D.check_fits([s], 40)


def test_image_group_of_size_zero_fails_before_any_worker():
    with pytest.raises(PlacementError, match="group 'encoder' has size 0"):
        prepare(PIPELINE, ["placement=disaggregated", "groups.encoder=0", "groups.llm=2"], 3)
    with pytest.raises(ValueError, match="size must be >= 1"):
        assign([1.0, 2.0], 0, True)


def test_llm_pipelines_that_do_not_fit_fail_before_any_worker():
    dis = ["placement=disaggregated", "groups.preprocess=1", "groups.encoder=1", "groups.llm=4"]
    with pytest.raises(ValueError, match=r"pp=3: the llm group's 4 ranks cannot form pipelines of 3 stages"):
        prepare(PIPELINE, ["emulate=true", "pp=3", *dis], 6)
    with pytest.raises(ValueError, match=r"pp=2 is emulated only \(emulate=true\)"):
        prepare(PIPELINE, ["pp=2", *dis], 6)
    assert prepare(PIPELINE, ["emulate=true", "pp=2", *dis], 6) is not None


# -- reordering ------------------------------------------------------------------------------
def test_assign_hand_computed():
    # LPT beats round-robin: {5,3,3} / {4,3} = 11 -> {5,3} / {4,3,3} = 10
    assert makespan([5, 4, 3, 3, 3], assign([5, 4, 3, 3, 3], 2, True), 2) == 10
    assert assign([5, 4, 3, 3, 3], 2, False) == [0, 1, 0, 1, 0]
    # LPT's worst case for 2 ranks: {3,2,2}/{3,2} = 7, while this input order gives 6
    assert assign([2, 3, 2, 3, 2], 2, True) == [0, 1, 0, 1, 0]


def test_inter_reordering_hand_computed():
    costs = [StageCost(4, 1, 0), StageCost(1, 4, 0)]
    # input order: encoder 0-4, 4-5; LLM waits until 4, runs 4-5 and 5-9
    assert pipeline_makespan(costs, [0, 1]) == 9
    # swapped: LLM starts at 1 (warm-up bubble 1 instead of 4) and ends at 6
    assert pipeline_makespan(costs, [1, 0]) == 6
    assert johnson([4, 1], [1, 4]) == [1, 0]
    assert order_microbatches(costs, True) == [1, 0] and order_microbatches(costs, False) == [0, 1]
    t = pipeline_times(costs, [1, 0])
    assert (t["enc_busy"], t["llm_busy"], t["bubble"]) == (5, 5, (6 - 5) + (6 - 5))
    # backward pass: encoder backwards wait for their gradients
    back = [StageCost(1, 3, 2), StageCost(3, 1, 6)]
    assert pipeline_makespan(back, [0, 1]) == 12


costs_st = st.lists(st.floats(0, 100, allow_nan=False), min_size=0, max_size=40)


@settings(max_examples=200, deadline=None)
@given(costs_st, st.integers(1, 9))
def test_assign_keeps_every_sample_once_and_never_worsens(costs, n):
    base = assign(costs, n, False)
    owner = assign(costs, n, True)
    assert len(owner) == len(costs) and all(0 <= r < n for r in owner)
    assert makespan(costs, owner, n) <= makespan(costs, base, n)


mb_st = st.lists(st.tuples(st.floats(0, 10), st.floats(0, 10), st.floats(0, 20)), min_size=1,
                 max_size=9).map(lambda xs: [StageCost(*x) for x in xs])


@settings(max_examples=200, deadline=None)
@given(mb_st, st.floats(0, 1))
def test_order_microbatches_is_a_permutation_and_never_worsens(costs, comm):
    order = order_microbatches(costs, True, comm)
    assert sorted(order) == list(range(len(costs)))
    assert pipeline_makespan(costs, order, comm) <= pipeline_makespan(costs, range(len(costs)), comm) + 1e-9


def test_plan_places_every_sample_once():
    p = {**load_pipeline(PIPELINE).params, "reorder": "both"}
    groups = {"preprocess": (0,), "encoder": (1, 2), "llm": (3, 4, 5)}
    plan = plan_step(p, "train", 64, 32, 4, groups, False)
    flat = sorted(j for mb in plan.order for j in mb)
    assert flat == list(range(32)) and len(plan.order) == 4
    assert set(plan.enc) <= {1, 2} and set(plan.llm) <= {3, 4, 5} and set(plan.pre) == {0}
    assert plan.ids[0] == 64 and plan.answer_tokens == sum(s.answer_tokens for s in plan.specs)
    mono = plan_step(p, "train", 64, 32, 4, {g: (0, 1) for g in groups}, True)
    assert mono.pre == mono.enc == mono.llm


def test_plan_with_llm_pipelines_sends_to_their_first_stages():
    p = {**load_pipeline(PIPELINE).params, "reorder": "both", "pp": 2}
    groups = {"preprocess": (0,), "encoder": (1,), "llm": (2, 3, 4, 5)}
    plan = plan_step(p, "train", 0, 16, 4, groups, False)
    assert set(plan.llm) == {2, 4} and sorted(j for mb in plan.order for j in mb) == list(range(16))
    assert [llm_pipeline(groups["llm"], 2, r) for r in (2, 3, 4, 5)] == [
        (0, (2, 3)), (1, (2, 3)), (0, (4, 5)), (1, (4, 5))]
    # Megatron layout: the first stage of each pipeline also preprocesses and encodes
    mono = plan_step({**p, "reorder": "none"}, "train", 0, 16, 4, {g: (0, 1, 2, 3) for g in groups}, True)
    assert mono.pre == mono.enc == mono.llm and set(mono.llm) == {0, 2}


# -- the model: gradients across the encoder/LLM boundary --------------------------------------
def _inputs(n=3):
    specs = [D.spec("train", i) for i in range(n)]
    pats = [x for s in specs for x in D.preprocess_images(s)]
    padded, counts = pad_images(pats, D.MAX_PATCHES)
    rows = [D.tokenize(s) for s in specs]
    t = max(len(a) for a, _ in rows)
    ids = torch.full((n, t), D.PAD)
    tg = torch.full((n, t), -100)
    for r, (a, b) in enumerate(rows):
        ids[r, :len(a)], tg[r, :len(b)] = a, b
    mask = torch.arange(t)[None, :] < torch.tensor([len(a) for a, _ in rows])[:, None]
    return padded, counts, ids, tg, mask


def test_boundary_gradients_equal_single_process_autograd():
    torch.manual_seed(0)
    padded, counts, ids, tg, mask = _inputs()
    tower, llm = build_vlm(D.VOCAB, D.MAX_PATCHES, seed=3)
    # reference: one graph through tower and LLM
    loss, _ = vlm_loss(llm, ids, tg, mask, D.IMAGE, tower(padded, counts))
    loss.backward()
    named = [*(("tower." + n, p) for n, p in tower.named_parameters()),
             *(("llm." + n, p) for n, p in llm.named_parameters())]
    ref = {n: p.grad.clone() for n, p in named}
    tower.zero_grad(), llm.zero_grad()
    # split at the boundary: the LLM side sees a leaf, returns its gradient to the tower
    out = tower(padded, counts)
    leaf = out.detach().requires_grad_()
    loss2, _ = vlm_loss(llm, ids, tg, mask, D.IMAGE, leaf)
    loss2.backward()
    torch.autograd.backward(out, leaf.grad)
    assert torch.equal(loss, loss2)
    for n, p in named:
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-6, atol=1e-8, msg=n)
    assert ref["tower.embed.weight"].abs().sum() > 0


def test_image_tokens_must_match_placeholders():
    padded, counts, ids, tg, mask = _inputs(2)
    _, llm = build_vlm(D.VOCAB, D.MAX_PATCHES)
    with pytest.raises(ValueError, match=r"\d+ image placeholder tokens but 1 image tokens"):
        embed_with_images(llm, ids, D.IMAGE, torch.zeros(1, 64))


def test_cost_model_replay_hand_computed():
    """benchmarks/multimodal.py's ``simulate``: one monolithic rank does everything in a
    row; two LLM stages run 1F1B (stage 0: F0 F1 B0 B1, stage 1: F0 B0 F1 B1)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from multimodal import simulate

    from distflow.multimodal.plan import sample_costs
    p = {**load_pipeline(PIPELINE).params, "cost_pre": 1e-3, "cost_enc": 2e-3, "cost_llm": 1e-3,
         "batch": 2, "microbatches": 2, "max_images": 8}
    pre, enc, llm = (sum(sample_costs(p, D.spec("train", j, 8))[k] for j in (0, 1)) for k in range(3))
    one = {g: (0,) for g in ("preprocess", "encoder", "llm")}
    assert simulate(p, one, True, 0) == pytest.approx(pre + enc + llm + 2 * enc)
    q = {**p, "cost_pre": 0.0, "cost_enc": 0.0, "pp": 2}
    c = [sample_costs(q, D.spec("train", j, 8))[2] for j in (0, 1)]
    f, b = [x / 6 for x in c], [x / 3 for x in c]
    s0_f1 = f[0] + f[1]
    s1_b0 = 2 * f[0] + b[0]
    s0_b0 = max(s0_f1, s1_b0) + b[0]
    s1_b1 = max(s1_b0, s0_f1) + f[1] + b[1]
    want = max(s0_b0, s1_b1) + b[1]
    got = simulate(q, {"preprocess": (0,), "encoder": (1,), "llm": (2, 3)}, False, 0)
    assert got == pytest.approx(want) and got > sum(c) / 2  # the pipeline's bubble


def test_one_f_one_b_orders():
    assert one_f_one_b(4, 2, 0) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("F", 3), ("B", 2), ("B", 3)]
    assert one_f_one_b(3, 2, 1) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2)]
    assert one_f_one_b(1, 4, 0) == [("F", 0), ("B", 0)]


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 12), st.integers(1, 6), st.data())
def test_one_f_one_b_runs_each_microbatch_once_forward_before_backward(n, pp, data):
    stage = data.draw(st.integers(0, pp - 1))
    ops = one_f_one_b(n, pp, stage)
    assert sorted(ops) == sorted([("F", k) for k in range(n)] + [("B", k) for k in range(n)])
    assert all(ops.index(("F", k)) < ops.index(("B", k)) for k in range(n))
    in_flight = max((sum(1 for o in ops[:i + 1] if o[0] == "F") - sum(1 for o in ops[:i + 1] if o[0] == "B")
                     for i in range(len(ops))), default=0)
    assert in_flight <= min(n, pp - stage)  # 1F1B bounds the activations a stage holds
