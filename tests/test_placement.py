"""Tests of worker-group placement (``distflow.placement``)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distflow.dag import Pipeline, Stage
from distflow.placement import Placement, PlacementError, plan_placement

pytestmark = pytest.mark.timeout(120)


def fn(ctx, **inputs):
    return {}


def pipeline_with_groups(*groups: str) -> Pipeline:
    """A chain of stages, one per entry of ``groups`` (repeats allowed)."""
    stages = []
    for k, g in enumerate(groups):
        stages.append(Stage(f"s{k}", fn, inputs=[f"d{k - 1}"] if k else [],
                            outputs=[f"d{k}"], group=g))
    return Pipeline("p", stages)


# ------------------------------------------------------------------ colocated

def test_colocated_gives_every_group_all_ranks():
    p = pipeline_with_groups("rollout", "train", "rollout", "ref")
    pl = plan_placement(p, 4)
    assert pl.strategy == "colocated" and pl.world_size == 4
    assert pl.groups == {"all": (0, 1, 2, 3), "rollout": (0, 1, 2, 3),
                         "train": (0, 1, 2, 3), "ref": (0, 1, 2, 3)}
    assert pl.ranks("train") == (0, 1, 2, 3)
    assert pl.describe() == {g: [0, 1, 2, 3] for g in ("all", "rollout", "train", "ref")}


def test_colocated_ignores_nothing_it_does_not_know():
    p = pipeline_with_groups("a", "b")
    with pytest.raises(PlacementError, match=r"groups \['zz'\] are sized.*groups: \['a', 'b'\]"):
        plan_placement(p, 2, "colocated", {"zz": 1})


def test_default_group_all_is_every_rank():
    p = pipeline_with_groups("all", "all")
    assert plan_placement(p, 3).groups == {"all": (0, 1, 2)}
    p = pipeline_with_groups("all", "x")
    assert plan_placement(p, 2, "split", {"x": 2}).groups == {"all": (0, 1), "x": (0, 1)}


# ------------------------------------------------------------------ split

def test_split_consecutive_ranks_in_order_of_first_use():
    # first use: train (s0), rollout (s1), ref (s3); sizes dict order must not matter
    p = pipeline_with_groups("train", "rollout", "train", "ref")
    pl = plan_placement(p, 6, "split", {"ref": 1, "rollout": 3, "train": 2})
    assert pl.groups == {"all": (0, 1, 2, 3, 4, 5), "train": (0, 1), "rollout": (2, 3, 4),
                         "ref": (5,)}
    assert pl.strategy == "split"


def test_split_alias_shares_ranks():
    p = pipeline_with_groups("a", "b", "c")
    pl = plan_placement(p, 5, "split", {"a": 2, "b": 3, "c": "a"})
    assert pl.groups["a"] == (0, 1) and pl.groups["b"] == (2, 3, 4)
    assert pl.groups["c"] == pl.groups["a"]


def test_split_alias_declared_first_does_not_take_ranks():
    p = pipeline_with_groups("c", "a", "b")
    pl = plan_placement(p, 5, "split", {"a": 2, "b": 3, "c": "b"})
    assert pl.groups["a"] == (0, 1) and pl.groups["b"] == (2, 3, 4) and pl.groups["c"] == (2, 3, 4)


def test_split_with_all_group_and_single_rank():
    p = pipeline_with_groups("all", "x")
    pl = plan_placement(p, 1, "split", {"x": 1})
    assert pl.groups == {"all": (0,), "x": (0,)}


@pytest.mark.parametrize("sizes,world,total", [
    ({"a": 1, "b": 2}, 4, 3),
    ({"a": 3, "b": 2}, 4, 5),
])
def test_split_sizes_must_add_up(sizes, world, total):
    p = pipeline_with_groups("a", "b")
    with pytest.raises(PlacementError,
                       match=rf"a={sizes['a']} \+ b={sizes['b']} = {total} but WORLD_SIZE is {world}"):
        plan_placement(p, world, "split", sizes)


def test_split_sum_ignores_aliases():
    p = pipeline_with_groups("a", "b", "c")
    with pytest.raises(PlacementError, match=r"a=1 \+ b=2 = 3 but WORLD_SIZE is 4"):
        plan_placement(p, 4, "split", {"a": 1, "b": 2, "c": "a"})


def test_split_missing_sizes():
    p = pipeline_with_groups("a", "b", "c")
    with pytest.raises(PlacementError, match=r"needs a size for groups \['b', 'c'\] \(e.g. groups.b=1\)"):
        plan_placement(p, 2, "split", {"a": 2})
    with pytest.raises(PlacementError, match=r"needs a size for groups \['a', 'b', 'c'\]"):
        plan_placement(p, 2, "split")


def test_split_unknown_group():
    p = pipeline_with_groups("a", "b")
    with pytest.raises(PlacementError, match=r"groups \['nope'\] are sized.*pipeline 'p'"):
        plan_placement(p, 3, "split", {"a": 1, "b": 1, "nope": 1})


def test_split_all_is_not_sizeable():
    p = pipeline_with_groups("a")
    with pytest.raises(PlacementError, match=r"groups \['all'\] are sized"):
        plan_placement(p, 2, "split", {"a": 2, "all": 2})


@pytest.mark.parametrize("target", ["zz", "c", "all"])
def test_split_bad_alias(target):
    # "zz" is no group; "c" aliases itself; "all" is not a sized group
    p = pipeline_with_groups("a", "b", "c")
    with pytest.raises(PlacementError,
                       match=rf"group 'c' shares the ranks of '{target}', which is not a sized "
                             rf"group \(sized: \['a', 'b'\]\)"):
        plan_placement(p, 3, "split", {"a": 1, "b": 2, "c": target})


def test_split_alias_of_alias_is_rejected():
    p = pipeline_with_groups("a", "b", "c")
    with pytest.raises(PlacementError, match=r"group '[bc]' shares the ranks of '[bc]'"):
        plan_placement(p, 2, "split", {"a": 2, "b": "c", "c": "b"})


@pytest.mark.parametrize("size", [0, -1, 1.5, None])
def test_split_size_must_be_positive_int(size):
    p = pipeline_with_groups("a", "b")
    with pytest.raises(PlacementError, match=rf"group 'b' has size {size!r}; a size must be an int >= 1"):
        plan_placement(p, 2, "split", {"a": 2, "b": size})


def test_unknown_strategy():
    p = pipeline_with_groups("a")
    with pytest.raises(PlacementError, match=r"placement 'spread' is not one of \['colocated', 'split', 'interleaved', 'disaggregated'\]"):
        plan_placement(p, 2, "spread")


@pytest.mark.parametrize("world", [0, -3])
def test_world_size_must_be_positive(world):
    with pytest.raises(PlacementError, match=rf"WORLD_SIZE must be >= 1, got {world}"):
        plan_placement(pipeline_with_groups("a"), world)


def test_placement_error_is_value_error():
    assert issubclass(PlacementError, ValueError)


# ------------------------------------------------------------------ property

@st.composite
def split_cases(draw):
    n_owned = draw(st.integers(1, 6))
    sizes = draw(st.lists(st.integers(1, 4), min_size=n_owned, max_size=n_owned))
    owned = [f"g{k}" for k in range(n_owned)]
    n_alias = draw(st.integers(0, 3))
    aliases = {f"alias{k}": draw(st.sampled_from(owned)) for k in range(n_alias)}
    # order of first use: a random interleaving, with repeats and the group "all"
    uses = owned + list(aliases) + draw(st.lists(st.sampled_from(owned + list(aliases) + ["all"]),
                                                 max_size=4))
    uses = draw(st.permutations(uses))
    cfg = {**dict(zip(owned, sizes)), **aliases}
    return uses, cfg, sum(sizes)


@settings(max_examples=200, deadline=None)
@given(split_cases())
def test_split_property(case):
    uses, cfg, world = case
    p = pipeline_with_groups(*uses)
    pl = plan_placement(p, world, "split", cfg)
    assert isinstance(pl, Placement) and pl.world_size == world
    assert pl.groups["all"] == tuple(range(world))
    assert set(pl.groups) == set(uses) | {"all"}
    owned = [g for g in dict.fromkeys(uses) if g != "all" and not isinstance(cfg[g], str)]
    # disjoint, covering, sized as asked, consecutive in order of first use
    flat = [r for g in owned for r in pl.groups[g]]
    assert flat == list(range(world))
    for g in owned:
        assert len(pl.groups[g]) == cfg[g]
    for g, target in cfg.items():
        if isinstance(target, str):
            assert pl.groups[g] == pl.groups[target]
    # colocated over the same pipeline: everyone everywhere
    co = plan_placement(p, world)
    assert all(r == tuple(range(world)) for r in co.groups.values())
    assert set(co.groups) == set(pl.groups)


# ------------------------------------------------------------------ weight-sync deadlock

class _Gen:
    holds = {"policy": "infer"}


class _Train:
    holds = {"policy": "train"}


def _sync_pipeline(score_group: str) -> Pipeline:
    """load -> score -> gen -> update, ``score`` on ``score_group``."""
    return Pipeline("p", [
        Stage("load", fn, outputs=["prompts"], group="rollout"),
        Stage("score", fn, inputs=["prompts"], outputs=["scored"], group=score_group),
        Stage("gen", _Gen, inputs=["scored"], outputs=["samples"], group="rollout"),
        Stage("update", _Train, inputs=["samples"], group="actor"),
    ], layouts={"disaggregated": lambda n: {"rollout": n // 2, "actor": n - n // 2,
                                            "critic": "actor"}},
        weight_sync=("actor", "rollout"))


def test_trainer_stage_before_generation_is_rejected_at_plan_time():
    from distflow.config import RunConfig
    from distflow.runtime.plan import make_plan

    cfg = RunConfig(placement="disaggregated")
    with pytest.raises(PlacementError) as e:
        make_plan(_sync_pipeline("critic"), cfg, 4)
    msg = str(e.value)
    assert ("would deadlock on weight sync: stage 'score' (group 'critic') runs on trainer ranks "
            "[2, 3] before generation stage 'gen' (group 'rollout', ranks [0, 1])") in msg, msg
    assert "blocks until 'gen' takes them" in msg
    # the same DAG is fine co-located, and with the stage on the rollout workers
    assert make_plan(_sync_pipeline("critic"), RunConfig(), 4).sync_ranks is None
    assert make_plan(_sync_pipeline("rollout"), cfg, 4).sync_ranks == (2, 0, 1)
