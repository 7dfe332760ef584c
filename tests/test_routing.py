"""Tests of the deterministic LPT routing plans (``distflow.runtime.routing``)."""
from __future__ import annotations

import copy
import random
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distflow.runtime.batch import Batch
from distflow.runtime.routing import lpt_assign, reshard_plan, split_by_plan, units_of

pytestmark = pytest.mark.timeout(120)


# ------------------------------------------------------------------ hand-computed cases

def test_lpt_assign_hand_examples():
    assert lpt_assign([], 3) == []
    assert lpt_assign([5], 3) == [0]
    assert lpt_assign([5, 7], 1) == [0, 0]
    # equal costs: position order onto bins by index, then wrap to the least loaded
    assert lpt_assign([3, 3, 3], 2) == [0, 1, 0]
    # order 5,4,3,2,1: 5->b0, 4->b1, 3->b1 (4<5), 2->b0 (5<7), 1-> tie 7/7 -> b0
    assert lpt_assign([1, 2, 3, 4, 5], 2) == [0, 0, 1, 1, 0]
    # ties in cost are broken by position: unit 0 (cost 2) before unit 2 (cost 2)
    assert lpt_assign([2, 3, 2], 3) == [1, 0, 2]
    # the classic LPT case: loads 11/8/8 where 9/9/9 is optimal
    assert lpt_assign([5, 5, 4, 4, 3, 3, 3], 3) == [0, 1, 2, 2, 0, 1, 0]
    # zero-cost units never change a load, so they all land on the least loaded index
    assert lpt_assign([0, 0, 0], 2) == [0, 0, 0]
    assert lpt_assign([0, 4, 0], 2) == [1, 0, 1]
    # more bins than units: the big ones go to the low indices
    assert lpt_assign([1, 10, 5], 5) == [2, 0, 1]


def test_lpt_assign_needs_a_bin():
    with pytest.raises(ValueError, match="at least one"):
        lpt_assign([1, 2], 0)
    with pytest.raises(ValueError):
        lpt_assign([], -1)


def test_units_of_groups_in_first_seen_order():
    b = Batch({}, [0, 1, 2, 3, 4], lengths=[1, 2, 3, 4, 5], groups=[7, 3, 7, 9, 3])
    unit_of_sample, costs = units_of(b)
    assert unit_of_sample == [0, 1, 0, 2, 1]
    assert costs == [4, 7, 4]


def test_units_of_default_groups_and_empty():
    b = Batch({}, [5, 6, 7], lengths=[3, 0, 2])
    assert units_of(b) == ([0, 1, 2], [3, 0, 2])
    assert units_of(Batch({}, [])) == ([], [])


def test_reshard_plan_hand_example():
    # flat costs [4, 1 | 3]: 4->c0, 3->c1, 1->c1 (3 < 4)
    assert reshard_plan([[4, 1], [3]], 2) == [[0, 1], [1]]
    assert reshard_plan([[], [2, 2], []], 3) == [[], [0, 1], []]
    assert reshard_plan([], 2) == []
    with pytest.raises(ValueError):
        reshard_plan([[1]], 0)


def test_split_by_plan_hand_example():
    b = Batch({"v": torch.tensor([10, 11, 12, 13, 14])}, [0, 1, 2, 3, 4],
              lengths=[5, 1, 1, 2, 2], groups=[1, 2, 1, 3, 2])
    # units by first sight: g1 = {0, 2} cost 6, g2 = {1, 4} cost 3, g3 = {3} cost 2
    _, costs = units_of(b)
    assert costs == [6, 3, 2]
    (plan,) = reshard_plan([costs], 2)
    assert plan == [0, 1, 1]
    parts = split_by_plan(b, plan, 2)
    assert [p.sample_ids.tolist() for p in parts] == [[0, 2], [1, 3, 4]]
    assert [p["v"].tolist() for p in parts] == [[10, 12], [11, 13, 14]]
    assert [p.num_tokens for p in parts] == [6, 5]
    # a third, unused consumer gets an empty batch with the same columns
    parts = split_by_plan(b, plan, 3)
    assert len(parts[2]) == 0 and parts[2]["v"].shape == (0,)


# ----------------------------------------------------------------------- properties

def reference_lpt(costs, n_bins):
    """A slow, obviously-correct LPT: scan for the least loaded bin (lowest index)."""
    loads, assign = [0] * n_bins, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        b = min(range(n_bins), key=lambda b: (loads[b], b))
        assign[i] = b
        loads[b] += costs[i]
    return assign


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5000), max_size=60), st.integers(1, 8))
def test_lpt_assign_matches_reference_and_bound(costs, n_bins):
    assign = lpt_assign(costs, n_bins)
    assert assign == reference_lpt(costs, n_bins)
    assert len(assign) == len(costs) and all(0 <= b < n_bins for b in assign)
    loads = [0] * n_bins
    for c, b in zip(costs, assign):
        loads[b] += c
    assert sum(loads) == sum(costs)
    if costs:  # every load <= total / n + max cost, in exact integer arithmetic
        assert n_bins * max(loads) <= sum(costs) + n_bins * max(costs)
    assert lpt_assign(list(costs), n_bins) == assign  # deterministic


@st.composite
def producer_batches(draw):
    """1..8 producers, each with groups of 1..8 samples (contiguous or scattered),
    lengths 0..5000, and sample ids and group ids unique across all producers."""
    n_prod = draw(st.integers(1, 8))
    next_id = draw(st.integers(-1000, 1000))
    batches = []
    for p in range(n_prod):
        sizes = draw(st.lists(st.integers(1, 8), max_size=8))
        gids = draw(st.lists(st.integers(0, 10 ** 6), min_size=len(sizes),
                             max_size=len(sizes), unique=True))
        groups = [p * 10 ** 7 + g for g, s in zip(gids, sizes) for _ in range(s)]
        n = len(groups)
        if draw(st.booleans()):  # scatter the group members through the batch
            groups = draw(st.permutations(groups))
        ids = list(range(next_id, next_id + n))
        next_id += n + draw(st.integers(0, 3))
        if draw(st.booleans()):
            ids = draw(st.permutations(ids))
        lengths = draw(st.lists(st.integers(0, 5000), min_size=n, max_size=n))
        batches.append(Batch({"x": torch.tensor(ids, dtype=torch.float64).reshape(n, 1) * 2,
                              "g": torch.tensor(groups, dtype=torch.int64)},
                             ids, lengths, groups))
    return batches, draw(st.integers(1, 8))


def route(batches, n_consumers):
    costs = [units_of(b)[1] for b in batches]
    plan = reshard_plan(costs, n_consumers)
    parts = [split_by_plan(b, dest, n_consumers) for b, dest in zip(batches, plan)]
    received = [Batch.cat([parts[p][c] for p in range(len(batches))])
                for c in range(n_consumers)]
    return costs, plan, received


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(producer_batches())
def test_reshard_delivers_everything_once_grouped_and_balanced(case):
    batches, n_cons = case
    costs, plan, received = route(batches, n_cons)

    # the plan's shape: one consumer index in range per unit of each producer
    assert len(plan) == len(batches)
    for c, d in zip(costs, plan):
        assert len(d) == len(c) and all(0 <= x < n_cons for x in d)
    assert len(received) == n_cons

    # every sample exactly once, with its own length, group and data
    sent = Counter(i for b in batches for i in b.sample_ids.tolist())
    got = Counter(i for r in received for i in r.sample_ids.tolist())
    assert got == sent
    assert all(v == 1 for v in got.values())
    length_of = {i: l for b in batches for i, l in zip(b.sample_ids.tolist(), b.lengths.tolist())}
    group_of = {i: g for b in batches for i, g in zip(b.sample_ids.tolist(), b.groups.tolist())}
    for r in received:
        for i, l, g, x, gc in zip(r.sample_ids.tolist(), r.lengths.tolist(), r.groups.tolist(),
                                  r["x"].flatten().tolist(), r["g"].tolist()):
            assert l == length_of[i] and g == group_of[i] == gc and x == 2 * i

    # every group on a single consumer
    consumers_of_group: dict[int, set] = {}
    for c, r in enumerate(received):
        for g in r.groups.tolist():
            consumers_of_group.setdefault(g, set()).add(c)
    assert all(len(s) == 1 for s in consumers_of_group.values())
    assert set(consumers_of_group) == {g for b in batches for g in b.groups.tolist()}

    # the loads follow the plan and obey the balance bound
    loads = [r.num_tokens for r in received]
    plan_loads = [0] * n_cons
    for c, d in zip(costs, plan):
        for cost, dest in zip(c, d):
            plan_loads[dest] += cost
    assert loads == plan_loads
    total = sum(b.num_tokens for b in batches)
    assert sum(loads) == total
    all_costs = [x for c in costs for x in c]
    max_cost = max(all_costs, default=0)
    assert n_cons * max(loads) <= total + n_cons * max_cost
    assert max(loads) - min(loads) <= max_cost  # LPT keeps the spread within one unit

    # deterministic: the same inputs (as fresh copies) give the same plan and split
    batches2 = [copy.deepcopy(b) for b in batches]
    costs2, plan2, received2 = route(batches2, n_cons)
    assert costs2 == costs and plan2 == plan
    for a, b in zip(received, received2):
        assert a.sample_ids.tolist() == b.sample_ids.tolist()
        assert torch.equal(a["x"], b["x"])


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(producer_batches())
def test_every_rank_computes_the_same_plan(case):
    """Each rank computes the plan on its own from the same costs; all plans agree and a
    producer's split depends only on its own batch and its row of the plan."""
    batches, n_cons = case
    costs = [units_of(b)[1] for b in batches]
    plans = [reshard_plan([list(c) for c in costs], n_cons) for _ in range(3)]
    assert plans[0] == plans[1] == plans[2]
    for b, d in zip(batches, plans[0]):
        one = split_by_plan(b, d, n_cons)
        two = split_by_plan(copy.deepcopy(b), list(d), n_cons)
        assert [p.sample_ids.tolist() for p in one] == [p.sample_ids.tolist() for p in two]


def test_large_random_instance_is_balanced():
    rng = random.Random(1234)
    batches = []
    sid = 0
    for p in range(8):
        groups, lengths = [], []
        for g in range(200):
            for _ in range(rng.randint(1, 8)):
                groups.append(p * 1000 + g)
                lengths.append(rng.randint(0, 5000))
        rng.shuffle(groups)
        n = len(groups)
        batches.append(Batch({}, list(range(sid, sid + n)), lengths, groups))
        sid += n
    costs, plan, received = route(batches, 7)
    loads = [r.num_tokens for r in received]
    total = sum(loads)
    max_cost = max(c for cs in costs for c in cs)
    assert 7 * max(loads) <= total + 7 * max_cost
    assert sorted(i for r in received for i in r.sample_ids.tolist()) == list(range(sid))
    # with many small units LPT is nearly perfect: within one max unit of the mean
    assert max(loads) - min(loads) <= max_cost
