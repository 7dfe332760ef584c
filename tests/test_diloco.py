"""DiLoCo / Streaming DiLoCo (distflow.diloco): equal to data parallel at H=1, streaming
with one fragment equal to DiLoCo, hand-computed fragment trajectories, identical outer
state on every island, exact resume with an exchange in flight, config errors, and a
2-process gloo run equal to the threaded one. Islands run as threads (ThreadReducer)."""
import copy
import os
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from diloco_threads import ThreadReducer
from distflow.diloco import (DiLoCo, DiLoCoConfig, ProcessGroupReducer, make_fragments,
                             validate_fragments)
from distflow.models import DecoderLM, preset


def run_islands(num_islands: int, fn, timeout_s: float = 60.0) -> list:
    """``fn(island, reducer)`` on one thread per island; returns the results in island order."""
    reducers = ThreadReducer.group(num_islands, timeout_s=timeout_s)
    results, errors = [None] * num_islands, []

    def target(i):
        try:
            results[i] = fn(i, reducers[i])
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
            reducers[i].abort()

    threads = [threading.Thread(target=target, args=(i,)) for i in range(num_islands)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads), "an island thread hung"
    return results


def mlp(seed: int = 0) -> torch.nn.Module:
    """Initialized from its own generator: island threads must not share the global RNG."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def mlp_loss(model, island: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * island + step)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)
    return F.mse_loss(model(x), y)


def decoder(seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    return DecoderLM(preset("tiny", vocab_size=16, num_hidden_layers=4))


def lm_loss(model, island: int, step: int) -> torch.Tensor:
    ids = torch.randint(0, 16, (4, 9), generator=torch.Generator().manual_seed(1000 * island + step))
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, 16), ids[:, 1:].reshape(-1))


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train(model, cfg, reducer, island, steps, loss_fn, make_opt, fragments=None, snapshot=None):
    """``steps`` inner steps with an outer sync object; returns (model, optimizer, diloco)."""
    opt = make_opt(model.parameters())
    sync = DiLoCo(model, cfg, reducer, fragments)
    for step in range(steps):
        opt.zero_grad()
        loss_fn(model, island, step).backward()
        opt.step()
        sync.after_inner_step()
        if snapshot is not None:
            snapshot(step, model, sync)
    return model, opt, sync


def adamw(ps):
    return torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)


def test_h1_with_sgd_equals_data_parallel():
    base, lr, steps, n = mlp(), 0.1, 10, 3
    cfg = DiLoCoConfig(mode="diloco", inner_steps=1, outer_lr=1.0, outer_momentum=0.0)

    def island(i, reducer):
        trajectory = []
        train(copy.deepcopy(base), cfg, reducer, i, steps, mlp_loss,
              lambda ps: torch.optim.SGD(ps, lr=lr),
              snapshot=lambda step, model, sync: trajectory.append(params(model)))
        return trajectory

    trajectories = run_islands(n, island)
    ref = copy.deepcopy(base)
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    for step in range(steps):
        opt.zero_grad()
        (sum(mlp_loss(ref, i, step) for i in range(n)) / n).backward()  # the islands' mean gradient
        opt.step()
        for trajectory in trajectories:
            for name, p in ref.named_parameters():
                torch.testing.assert_close(trajectory[step][name], p.detach(), rtol=0, atol=1e-6)
    assert not torch.equal(trajectories[0][steps - 1]["0.weight"], base[0].weight)


@pytest.mark.parametrize("quantize", ["fp32", "e3m0"])
def test_streaming_one_fragment_equals_diloco(quantize):
    base = decoder()
    out = {}
    for mode in ("diloco", "streaming"):
        cfg = DiLoCoConfig(mode=mode, inner_steps=3, fragments=1, quantize=quantize)
        out[mode] = run_islands(2, lambda i, r: params(train(copy.deepcopy(base), cfg, r, i, 7, lm_loss, adamw)[0]))
    for a, b in zip(out["diloco"], out["streaming"]):
        assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(out["diloco"][0]["norm.weight"], base.norm.weight)


def test_outer_state_identical_on_every_island_and_alpha_one_keeps_local():
    base = decoder()
    cfg = DiLoCoConfig(mode="streaming", inner_steps=4, fragments=2, overlap_steps=1,
                       alpha=1.0, quantize="e3m0")

    def island(i, reducer):
        states, merges = [], 0
        model = copy.deepcopy(base)
        opt, sync = adamw(model.parameters()), DiLoCo(model, cfg, reducer)
        for step in range(10):
            opt.zero_grad()
            lm_loss(model, i, step).backward()
            opt.step()
            before, syncs = params(model), sync.syncs
            sync.after_inner_step()
            after = params(model)
            assert all(torch.equal(before[n], after[n]) for n in before)  # alpha = 1: local untouched
            merges += sync.syncs - syncs
            states.append(sync.state_dict())
        return states, merges, after

    results = run_islands(2, island)
    (states0, merges, local0), (states1, _, local1) = results
    assert merges == 4  # fragment 0 starts at 4, 8; fragment 1 at 2, 6, 10 (tau=1: 10 in flight)
    for s0, s1 in zip(states0, states1):
        assert s0.keys() == s1.keys()
        assert all(torch.equal(s0[k], s1[k]) for k in s0)
    assert "diloco/pending/1/finish_step" in states0[-1]
    assert not torch.equal(local0["norm.weight"], local1["norm.weight"])  # islands saw different data
    assert states0[-1]["diloco/momentum/embed_tokens.weight"].abs().sum() > 0


class TwoParams(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(1))
        self.b = torch.nn.Parameter(torch.zeros(1))


# Hand-computed trajectories. Two islands, params a (fragment 0) and b (fragment 1), both
# start at 0; inner SGD lr 1 with constant gradient g = 1 (island 0) and g = 3 (island 1),
# so each inner step moves local params by -1 / -3. H = 4, P = 2: offsets 0 and 2, so a
# starts syncs at t = 4, 8 and b at t = 2, 6, 10; each finishes tau steps after it starts.
# Outer: lr 0.5, momentum 0.5, Nesterov:  d = mean_i(G - L_i) at the start,
#   buf = 0.5 buf + d,  G -= 0.5 (d + 0.5 buf),  L_i := alpha L_i + (1 - alpha) G.
#
# tau=0 alpha=0
#   a: t4 L=-4,-12 d=8 buf=8 G=-6 L=-6 | t8 L=-10,-18 d=8 buf=12 G=-6-0.5*14=-13 L=-13
#      | t10 L=-15,-19
#   b: t2 L=-2,-6 d=4 buf=4 G=-3 | t6 L=-7,-15 d=8 buf=10 G=-3-0.5*13=-9.5
#      | t10 L=-13.5,-21.5 d=8 buf=13 G=-9.5-0.5*14.5=-16.75 L=-16.75
# tau=0 alpha=0.5
#   a: t4 d=8 buf=8 G=-6 L=.5(-4)+.5(-6)=-5, .5(-12)+.5(-6)=-9
#      | t8 L=-9,-21 d=(3+15)/2=9 buf=13 G=-6-0.5*15.5=-13.75 L=-11.375,-17.375 | t10 L=-13.375,-23.375
#   b: t2 d=4 buf=4 G=-3 L=-2.5,-4.5 | t6 L=-6.5,-16.5 d=8.5 buf=10.5 G=-3-0.5*13.75=-9.875
#      L=-8.1875,-13.1875 | t10 L=-12.1875,-25.1875 d=8.8125 buf=14.0625
#      G=-9.875-0.5*15.84375=-17.796875 L=-14.9921875,-21.4921875
# tau=0 alpha=1: L_i = -t g_i always -> L=-10,-30 at t10
#   a: t4 d=8 buf=8 G=-6 | t8 d=(2+18)/2=10 buf=14 G=-6-0.5*17=-14.5
#   b: t2 d=4 buf=4 G=-3 | t6 d=(3+15)/2=9 buf=11 G=-3-0.5*14.5=-10.25
#      | t10 d=(-0.25+19.75)/2=9.75 buf=15.25 G=-10.25-0.5*17.375=-18.9375
# tau=1 alpha=0 (d taken at the start, applied one step later)
#   a: t4 d=8 | t5 L=-5,-15 buf=8 G=-6 L=-6 | t8 L=-9,-15 d=6 | t9 buf=10 G=-6-0.5*11=-11.5 L=-11.5
#      | t10 L=-12.5,-14.5
#   b: t2 d=4 | t3 buf=4 G=-3 L=-3 | t6 L=-6,-12 d=6 | t7 buf=8 G=-3-0.5*10=-8 L=-8
#      | t10 L=-11,-17 d=6 in flight (finishes at t11)
# tau=1 alpha=0.5
#   a: t4 d=8 | t5 L=-5,-15 buf=8 G=-6 L=-5.5,-10.5 | t8 L=-8.5,-19.5 d=(2.5+13.5)/2=8
#      | t9 L=-9.5,-22.5 buf=12 G=-6-0.5*14=-13 L=-11.25,-17.75 | t10 L=-12.25,-20.75
#   b: t2 d=4 | t3 L=-3,-9 buf=4 G=-3 L=-3,-6 | t6 L=-6,-15 d=7.5 | t7 L=-7,-18 buf=9.5
#      G=-3-0.5*12.25=-9.125 L=-8.0625,-13.5625 | t10 L=-11.0625,-22.5625 d=(1.9375+13.4375)/2=7.6875
# tau=1 alpha=1: L=-10,-30 at t10
#   a: t4 d=8 | t5 buf=8 G=-6 | t8 d=10 | t9 buf=14 G=-14.5
#   b: t2 d=4 | t3 buf=4 G=-3 | t6 d=9 | t7 buf=11 G=-10.25 | t10 d=(-0.25+19.75)/2=9.75 in flight
HAND = {  # (tau, alpha): (a: L0, L1, G, buf), (b: L0, L1, G, buf), b's in-flight d or None
    (0, 0.0): ((-15, -19, -13, 12), (-16.75, -16.75, -16.75, 13), None),
    (0, 0.5): ((-13.375, -23.375, -13.75, 13), (-14.9921875, -21.4921875, -17.796875, 14.0625), None),
    (0, 1.0): ((-10, -30, -14.5, 14), (-10, -30, -18.9375, 15.25), None),
    (1, 0.0): ((-12.5, -14.5, -11.5, 10), (-11, -17, -8, 8), 6.0),
    (1, 0.5): ((-12.25, -20.75, -13, 12), (-11.0625, -22.5625, -9.125, 9.5), 7.6875),
    (1, 1.0): ((-10, -30, -14.5, 14), (-10, -30, -10.25, 11), 9.75),
}


def _ten_constant_gradient_steps(i, reducer, cfg):
    """Island ``i`` of the hand-computed trajectory: SGD lr 1 on gradients 1 (island 0) or
    3 (island 1), fragments [a], [b], ten inner steps."""
    model = TwoParams()
    opt, sync = torch.optim.SGD(model.parameters(), lr=1.0), DiLoCo(model, cfg, reducer, [["a"], ["b"]])
    for _ in range(10):
        for p in model.parameters():
            p.grad = torch.full_like(p, (1.0, 3.0)[i])
        opt.step()
        sync.after_inner_step()
    return model, sync


def _hand_config(tau, alpha):
    """The streaming setting of the hand-computed tables."""
    return DiLoCoConfig(mode="streaming", inner_steps=4, fragments=2, overlap_steps=tau,
                        alpha=alpha, outer_lr=0.5, outer_momentum=0.5)


@pytest.mark.parametrize("tau,alpha", list(HAND))
def test_hand_computed_streaming_trajectory(tau, alpha):
    cfg = _hand_config(tau, alpha)

    def island(i, reducer):
        model, sync = _ten_constant_gradient_steps(i, reducer, cfg)
        return model.a.item(), model.b.item(), sync.state_dict(), sync.stats()

    (a0, b0, sd, stats), (a1, b1, sd1, _) = run_islands(2, island)
    (la0, la1, ga, ma), (lb0, lb1, gb, mb), in_flight = HAND[(tau, alpha)]
    assert (a0, a1, b0, b1) == (la0, la1, lb0, lb1)
    assert [sd[k].item() for k in ("diloco/global/a", "diloco/momentum/a",
                                   "diloco/global/b", "diloco/momentum/b")] == [ga, ma, gb, mb]
    assert all(torch.equal(sd[k], sd1[k]) for k in sd)
    if in_flight is None:
        assert not any("pending" in k for k in sd)
    else:
        assert (sd["diloco/pending/1/finish_step"].item(), sd["diloco/pending/1/b"].item()) == (11, in_flight)
    # 5 starts of one fp32 element each; finished syncs: 5, or 4 with b's last one in flight
    assert stats == {"diloco/bytes_sent": 20.0, "diloco/syncs": 5.0 - tau, "diloco/export_bytes": 0.0}


# consensus() at t10 (continuing the table above): a last started at t8 < t10, so one more
# exchange d = mean(G - L) and outer step; b started at t10: its sync is completed, no new one.
# tau=0 alpha=0:   a: d=((-13+15)+(-13+19))/2=4 buf=.5*12+4=10 G=-13-.5*(4+5)=-17.5;  b: G=-16.75
# tau=1 alpha=0.5: a: d=((-13+12.25)+(-13+20.75))/2=3.5 buf=9.5 G=-13-.5*(3.5+4.75)=-17.125
#                  b: in flight d=7.6875 buf=.5*9.5+7.6875=12.4375 G=-9.125-.5*(7.6875+6.21875)=-16.078125
CONSENSUS = {(0, 0.0): (-17.5, -16.75), (1, 0.5): (-17.125, -16.078125)}


@pytest.mark.parametrize("tau,alpha", list(CONSENSUS))
def test_consensus_completes_every_fragment_without_changing_the_training_state(tau, alpha):
    cfg = _hand_config(tau, alpha)

    def island(i, reducer):
        model, sync = _ten_constant_gradient_steps(i, reducer, cfg)
        before = (params(model), sync.state_dict(), sync.stats())
        final = sync.consensus()
        with sync.swapped_in(final):
            swapped = params(model)
        return before, (params(model), sync.state_dict(), sync.stats()), final, swapped

    results = run_islands(2, island)
    for (model0, sd0, stats0), (model1, sd1, stats1), final, swapped in results:
        assert {n: v.item() for n, v in final.items()} == dict(zip("ab", CONSENSUS[(tau, alpha)]))
        assert all(torch.equal(swapped[n], final[n]) for n in final)
        assert all(torch.equal(model0[n], model1[n]) for n in model0)  # restored after the block
        assert sd0.keys() == sd1.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
        # one more fp32 element (fragment a) exchanged, counted apart from training syncs
        assert stats1 == {**stats0, "diloco/export_bytes": 4.0}


def test_consensus_of_diloco_at_a_sync_step_is_the_global_model():
    cfg = DiLoCoConfig(mode="diloco", inner_steps=3)

    def island(i, reducer):
        model, _, sync = train(mlp(), cfg, reducer, i, 6, mlp_loss, adamw)
        final = sync.consensus()
        return final, sync.global_params, sync.export_bytes

    for final, global_params, export_bytes in run_islands(2, island):
        assert export_bytes == 0 and all(torch.equal(final[n], global_params[n]) for n in final)


def test_merge_weights_local_by_alpha():
    # one island, x = 0, gradient 1, inner SGD lr 1, H = 2, outer lr 0.5 without momentum:
    # t2: L = -2, d = 2, G = -0.5 * 2 = -1, merge L = 0.25 * (-2) + 0.75 * (-1) = -1.25
    cfg = DiLoCoConfig(mode="streaming", inner_steps=2, alpha=0.25, outer_lr=0.5, outer_momentum=0.0)
    model = TwoParams()
    opt, sync = torch.optim.SGD(model.parameters(), lr=1.0), DiLoCo(model, cfg, ThreadReducer.group(1)[0])
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        sync.after_inner_step()
    assert (model.a.item(), sync.state_dict()["diloco/global/a"].item()) == (-1.25, -1.0)


def test_resume_mid_flight_equals_uninterrupted(tmp_path):
    base = decoder()
    cfg = DiLoCoConfig(mode="streaming", inner_steps=4, fragments=2, overlap_steps=1,
                       alpha=0.5, quantize="e3m0")
    total, cut = 12, 6  # fragment 1 starts at t=6 and finishes at t=7: in flight at the cut

    def uninterrupted(i, reducer):
        model, _, sync = train(copy.deepcopy(base), cfg, reducer, i, total, lm_loss, adamw)
        return params(model), sync.state_dict()

    def resumed(i, reducer):
        model, opt, sync = train(copy.deepcopy(base), cfg, reducer, i, cut, lm_loss, adamw)
        path = tmp_path / f"diloco_{i}.safetensors"
        save_file(sync.state_dict(), str(path))
        model_state, opt_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
        del model, opt, sync
        model = copy.deepcopy(base)  # its params and optimizer state must come from the checkpoint
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        model.load_state_dict(model_state)
        opt = adamw(model.parameters())
        opt.load_state_dict(opt_state)
        sync = DiLoCo(model, cfg, reducer)
        sd = load_file(str(path))
        assert "diloco/pending/1/finish_step" in sd
        sync.load_state_dict(sd)
        for step in range(cut, total):
            opt.zero_grad()
            lm_loss(model, i, step).backward()
            opt.step()
            sync.after_inner_step()
        return params(model), sync.state_dict()

    for (p_ref, s_ref), (p_res, s_res) in zip(run_islands(2, uninterrupted), run_islands(2, resumed)):
        assert all(torch.equal(p_ref[n], p_res[n]) for n in p_ref)
        assert s_ref.keys() == s_res.keys() and all(torch.equal(s_ref[k], s_res[k]) for k in s_ref)


@pytest.mark.parametrize("kwargs,message", [
    (dict(inner_steps=0), "inner_steps \\(H\\) must be >= 1, got 0"),
    (dict(mode="streaming", inner_steps=8, fragments=4, overlap_steps=2), "tau=2.*8/4 = 2"),
    (dict(mode="streaming", inner_steps=30, fragments=4, overlap_steps=8), "tau=8.*30/4 = 7.5"),
    (dict(alpha=1.5), "alpha must be in \\[0, 1\\], got 1.5"),
    (dict(alpha=-0.1), "got -0.1"),
    (dict(mode="localsgd"), "'localsgd'"),
    (dict(quantize="fp8"), "'fp8'"),
    (dict(fragments=0), "fragments \\(P\\) must be >= 1, got 0"),
    (dict(overlap_steps=-1), "got -1"),
    (dict(outer_lr=0.0), "outer_lr must be > 0, got 0.0"),
    (dict(outer_momentum=1.0), "got 1.0"),
    (dict(mode="diloco", fragments=2), "fragments=2.*mode='streaming'"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiLoCoConfig(**kwargs)


def test_fragments_must_cover_every_param_once():
    model = decoder()
    names = [n for n, _ in model.named_parameters()]
    cfg = DiLoCoConfig(mode="streaming", inner_steps=4, fragments=2)
    reducer = ThreadReducer.group(1)[0]
    with pytest.raises(ValueError, match=r"missing \['norm.weight'\]"):
        DiLoCo(model, cfg, reducer, [names[:10], names[10:-1]])
    with pytest.raises(ValueError, match=r"duplicated \['embed_tokens.weight'\]"):
        DiLoCo(model, cfg, reducer, [names[:10], names[10:] + names[:1]])
    with pytest.raises(ValueError, match=r"unknown \['nope'\]"):
        validate_fragments([names, ["nope"]], names)
    with pytest.raises(ValueError, match="got 1 fragments"):
        DiLoCo(model, cfg, reducer, [names])
    with pytest.raises(ValueError, match="needs a reducer"):
        DiLoCo(model, cfg, None)


def test_make_fragments_strided_and_balanced():
    model = DecoderLM(preset("tiny", vocab_size=16, num_hidden_layers=6))
    named = list(model.named_parameters())
    fragments = make_fragments(named, 2)
    validate_fragments(fragments, [n for n, _ in named])
    blocks = [sorted({int(n.split(".")[1]) for n in f if n.startswith("layers.")}) for f in fragments]
    assert blocks == [[0, 2, 4], [1, 3, 5]]
    # embed_tokens goes to the lighter fragment 0 (tie -> lowest), then norm.weight to fragment 1
    assert "embed_tokens.weight" in fragments[0] and "norm.weight" in fragments[1]
    assert len(make_fragments(named, None)) == 2  # about 3 blocks per fragment
    assert [len(f) for f in make_fragments([("w", torch.zeros(3)), ("v", torch.zeros(2))], 2)] == [1, 1]
    with pytest.raises(ValueError, match=r"num_fragments=9 must be in \[1, 8\] \(6 blocks \+ 2 other"):
        make_fragments(named, 9)  # 6 blocks + embed_tokens + norm (lm_head is tied)


def test_ddp_mode_is_a_no_op():
    model = mlp()
    before = params(model)
    sync = DiLoCo(model, DiLoCoConfig(), None)
    for _ in range(5):
        sync.after_inner_step()
    assert all(torch.equal(before[n], p) for n, p in params(model).items())
    assert sync.stats() == {"diloco/bytes_sent": 0.0, "diloco/syncs": 0.0, "diloco/export_bytes": 0.0}
    assert sync.state_dict()["diloco/step"].item() == 5


# ---- real processes over gloo

GLOO_CONFIGS = [
    DiLoCoConfig(mode="diloco", inner_steps=3, quantize="e3m0"),
    DiLoCoConfig(mode="streaming", inner_steps=4, fragments=2, overlap_steps=1, alpha=0.5),
]
GLOO_STEPS = 9


def _train_gloo_configs(island: int, reducer) -> list:
    out = []
    for cfg in GLOO_CONFIGS:
        model, _, sync = train(mlp(), cfg, reducer, island, GLOO_STEPS, mlp_loss, adamw)
        out.append((params(model), sync.state_dict()))
    return out


def _gloo_island(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        torch.save(_train_gloo_configs(rank, ProcessGroupReducer()), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(90)
def test_gloo_processes_match_threads(tmp_path):
    ctx = mp.spawn(_gloo_island, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 60
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("gloo islands did not finish within 60 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    threads = run_islands(2, _train_gloo_configs)
    for c, cfg in enumerate(GLOO_CONFIGS):
        (p0, s0), (p1, s1) = ranks[0][c], ranks[1][c]
        assert all(torch.equal(s0[k], s1[k]) for k in s0)  # identical outer state on both ranks
        if cfg.mode == "diloco":  # H=3 divides 9 steps: the last step synced, local = global
            assert all(torch.equal(p0[n], p1[n]) for n in p0)
        for r in range(2):
            p_thread, s_thread = threads[r][c]
            p_rank, s_rank = ranks[r][c]
            assert all(torch.equal(p_rank[n], p_thread[n]) for n in p_rank)
            assert s_rank.keys() == s_thread.keys()
            assert all(torch.equal(s_rank[k], s_thread[k]) for k in s_rank)
