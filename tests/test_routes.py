"""Tests of route planning (``distflow.runtime.exchange.plan_routes``)."""
from __future__ import annotations

from pathlib import Path

import pytest

from distflow.dag import Edge, Pipeline, Stage
from distflow.placement import plan_placement
from distflow.run import load_pipeline
from distflow.runtime.exchange import Route, plan_routes

pytestmark = pytest.mark.timeout(120)

FANOUT = Path(__file__).parent / "pipelines" / "fanout.py"


def fn(ctx, **inputs):
    return {}


def S(name, inputs=(), outputs=(), group="all", dp=True):
    return Stage(name, fn, inputs=inputs, outputs=outputs, group=group, data_parallel=dp)


def kinds(pipeline, world, strategy="colocated", sizes=None, routing="p2p"):
    placement = plan_placement(pipeline, world, strategy, sizes)
    routes = plan_routes(pipeline, placement, routing)
    assert set(routes) == set(pipeline.edges)
    for e, r in routes.items():
        assert r.edge == e
        assert r.src == placement.ranks(pipeline.stage(e.src).group)
        assert r.dst == placement.ranks(pipeline.stage(e.dst).group)
        assert r.src_dp == pipeline.stage(e.src).data_parallel
        assert r.dst_dp == pipeline.stage(e.dst).data_parallel
    return {e.key: r.kind for e, r in routes.items()}


def chain(g1, dp1, g2, dp2):
    return Pipeline("p", [S("a", outputs=["x"], group=g1, dp=dp1),
                          S("b", inputs=["x"], group=g2, dp=dp2)])


# ------------------------------------------------------------------ single edges

def test_same_group_dp_to_dp_is_local():
    assert kinds(chain("g", True, "g", True), 3, "split", {"g": 3}) == {"a.x->b": "local"}
    assert kinds(chain("all", True, "all", True), 2) == {"a.x->b": "local"}


def test_different_groups_dp_to_dp_reshard():
    assert kinds(chain("g", True, "h", True), 3, "split", {"g": 1, "h": 2}) == {"a.x->b": "reshard"}


def test_different_groups_on_same_ranks_are_local():
    # colocated: the groups differ by name but share every rank
    assert kinds(chain("g", True, "h", True), 4) == {"a.x->b": "local"}
    # split with an alias
    assert kinds(chain("g", True, "h", True), 2, "split", {"g": 2, "h": "g"}) == {"a.x->b": "local"}


def test_group_all_under_split():
    # "all" is every rank: local from a group that also spans every rank, else reshard
    assert kinds(chain("g", True, "all", True), 3, "split", {"g": 3}) == {"a.x->b": "local"}
    p = Pipeline("p", [S("a", outputs=["x"], group="g"), S("b", inputs=["x"], group="all"),
                       S("c", group="h")])
    assert kinds(p, 3, "split", {"g": 1, "h": 2}) == {"a.x->b": "reshard"}


@pytest.mark.parametrize("sizes,world", [({"g": 2}, 2), ({"g": 1, "h": 1}, 2)])
def test_dp_to_replicated_is_gather(sizes, world):
    p = chain("g", True, "g" if len(sizes) == 1 else "h", False)
    assert kinds(p, world, "split", sizes) == {"a.x->b": "gather"}


@pytest.mark.parametrize("dst_dp", [True, False])
@pytest.mark.parametrize("same", [True, False])
def test_replicated_to_anything_is_replicate(dst_dp, same):
    p = chain("g", False, "g" if same else "h", dst_dp)
    sizes = {"g": 2} if same else {"g": 1, "h": 1}
    assert kinds(p, 2, "split", sizes) == {"a.x->b": "replicate"}
    assert kinds(p, 2) == {"a.x->b": "replicate"}


@pytest.mark.parametrize("src_dp", [True, False])
@pytest.mark.parametrize("dst_dp", [True, False])
@pytest.mark.parametrize("strategy,sizes", [("colocated", None), ("split", {"g": 1, "h": 1})])
def test_hub_routing_makes_every_edge_hub(src_dp, dst_dp, strategy, sizes):
    p = chain("g", src_dp, "h", dst_dp)
    assert kinds(p, 2, strategy, sizes, routing="hub") == {"a.x->b": "hub"}


def test_route_is_frozen_record():
    p = chain("g", True, "h", True)
    routes = plan_routes(p, plan_placement(p, 3, "split", {"g": 1, "h": 2}), "p2p")
    r = routes[Edge("a", "b", "x")]
    assert r == Route(Edge("a", "b", "x"), "reshard", (0,), (1, 2), True, True)
    with pytest.raises(Exception):
        r.kind = "local"


# ------------------------------------------------------------------ fan-in upgrade rule

def test_fanout_pipeline_upgrades_local_neg_edge():
    p = load_pipeline(str(FANOUT))
    got = kinds(p, 5, "split", {"a": 2, "b": 3, "c": "a"})
    assert got == {"load.x->square": "reshard",
                   "load.x->negate": "local",
                   "square.sq->join": "reshard",
                   "negate.neg->join": "reshard",  # upgraded: would be local on its own
                   "join.joined->sink": "gather"}


def test_fanout_neg_edge_alone_is_local():
    # the same groups and ranks, without the sq input to join: nothing to disagree with
    p = Pipeline("solo", [S("load", outputs=["x"], group="a"),
                          S("negate", inputs=["x"], outputs=["neg"], group="c"),
                          S("join", inputs=["neg"], outputs=["joined"], group="a"),
                          S("sink", inputs=["joined"], group="a", dp=False)])
    got = kinds(p, 2, "split", {"a": 2, "c": "a"})
    assert got == {"load.x->negate": "local", "negate.neg->join": "local",
                   "join.joined->sink": "gather"}


def test_fanout_colocated_everything_local_no_upgrade():
    p = load_pipeline(str(FANOUT))
    got = kinds(p, 3)
    assert got == {"load.x->square": "local", "load.x->negate": "local",
                   "square.sq->join": "local", "negate.neg->join": "local",
                   "join.joined->sink": "gather"}


def test_fanout_hub():
    p = load_pipeline(str(FANOUT))
    assert set(kinds(p, 5, "split", {"a": 2, "b": 3, "c": "a"}, routing="hub").values()) == {"hub"}


def test_two_local_inputs_from_different_sources_are_upgraded():
    p = Pipeline("p", [S("s1", outputs=["x"], group="g"), S("s2", outputs=["y"], group="g"),
                       S("join", inputs=["x", "y"], group="g")])
    assert kinds(p, 2) == {"s1.x->join": "reshard", "s2.y->join": "reshard"}


def test_two_local_inputs_sharded_alike_stay_local():
    # both inputs derive from the same source through local edges: same sharding
    p = Pipeline("p", [S("s", outputs=["x"]), S("f", inputs=["x"], outputs=["y"]),
                       S("join", inputs=["x", "y"])])
    assert kinds(p, 3) == {"s.x->f": "local", "s.x->join": "local", "f.y->join": "local"}


def test_local_plus_replicate_input_upgrades_local():
    # a replicated producer's slice follows the LPT plan, so the local input must too
    p = Pipeline("p", [S("s", outputs=["x"]), S("r", outputs=["w"], dp=False),
                       S("join", inputs=["x", "w"])])
    assert kinds(p, 2) == {"s.x->join": "reshard", "r.w->join": "replicate"}


def test_after_upgrade_downstream_local_edges_agree():
    # join's output is LPT-sharded; a later stage meeting it with a reshard-ed input
    # onto the same ranks needs no further upgrade
    p = Pipeline("p", [S("s1", outputs=["x"], group="g"), S("s2", outputs=["y"], group="g"),
                       S("join", inputs=["x", "y"], outputs=["j"], group="g"),
                       S("t", outputs=["z"], group="h"),
                       S("last", inputs=["j", "z"], group="g")])
    got = kinds(p, 3, "split", {"g": 2, "h": 1})
    assert got == {"s1.x->join": "reshard", "s2.y->join": "reshard",
                   "join.j->last": "local", "t.z->last": "reshard"}


def test_replicated_consumer_with_mixed_inputs_is_not_upgraded():
    p = Pipeline("p", [S("s1", outputs=["x"]), S("s2", outputs=["y"]),
                       S("sink", inputs=["x", "y"], dp=False)])
    assert kinds(p, 2) == {"s1.x->sink": "gather", "s2.y->sink": "gather"}


def test_upgraded_route_keeps_ranks():
    p = load_pipeline(str(FANOUT))
    routes = plan_routes(p, plan_placement(p, 5, "split", {"a": 2, "b": 3, "c": "a"}), "p2p")
    neg = next(r for e, r in routes.items() if e.key == "negate.neg->join")
    assert neg == Route(neg.edge, "reshard", (0, 1), (0, 1), True, True)


@pytest.mark.parametrize("pipeline", ["grpo", "ppo"])
def test_rollouts_cross_once_to_each_set_of_consumer_ranks(pipeline):
    """Reward, reference, values and advantages read the rollouts; under disaggregated
    placement they share the trainer's workers, so the rollouts travel in one transfer."""
    p = load_pipeline(str(Path(__file__).parents[1] / "pipelines" / f"{pipeline}.py"))
    routes = plan_routes(p, plan_placement(p, 4, "disaggregated", {}), "p2p")
    readers = [e.dst for e in routes if e.name == "rollouts"]
    assert len(readers) == {"grpo": 3, "ppo": 4}[pipeline]
    assert {routes[e].key for e in routes if e.name == "rollouts"} == {"gen.rollouts:reshard->dp[2,3]"}
    interleaved = plan_routes(p, plan_placement(p, 4, "interleaved", {}), "p2p")
    keys = {interleaved[e].key for e in interleaved if e.name == "rollouts"}
    assert len(keys) == len({(r.kind, r.dst) for e, r in interleaved.items() if e.name == "rollouts"})
    # with routing=hub (the single-controller baseline) every edge keeps its own transfer
    hub = plan_routes(p, plan_placement(p, 4, "disaggregated", {}), "hub")
    assert len({r.key for r in hub.values()}) == len(hub)
