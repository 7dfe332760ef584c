"""Tests of pipeline validation and ordering (``distflow.dag``).

The hypothesis properties compare ``Pipeline`` against an independent reference written
here in plain Python (no networkx): uniqueness checks, a producer map, and Kahn's
algorithm that always picks the earliest-declared ready stage.
"""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distflow.dag import DAGError, Edge, Pipeline, Stage

pytestmark = pytest.mark.timeout(120)


def fn(ctx, **inputs):
    return {}


def S(name, inputs=(), outputs=(), **kw):
    return Stage(name, fn, inputs=inputs, outputs=outputs, **kw)


# ------------------------------------------------------------------ unit tests: errors

def test_empty_pipeline():
    with pytest.raises(DAGError, match="at least one stage"):
        Pipeline("p", [])


@pytest.mark.parametrize("bad", ["1load", "load-x", "", "a b", 3])
def test_stage_name_must_be_identifier(bad):
    with pytest.raises(DAGError, match="must be a Python identifier") as info:
        Stage(bad, fn)
    assert repr(bad) in str(info.value)


def test_stage_fn_must_be_callable():
    with pytest.raises(DAGError, match=r"stage 'load': fn 42 is not callable"):
        Stage("load", 42)


def test_duplicate_input_within_stage():
    with pytest.raises(DAGError, match=r"stage 'join' lists input\(s\) \['x'\] more than once"):
        S("join", inputs=["x", "y", "x"])


def test_duplicate_output_within_stage():
    with pytest.raises(DAGError, match=r"stage 'load' lists output\(s\) \['a', 'b'\] more than once"):
        S("load", outputs=["b", "a", "b", "a", "c"])


def test_stage_name_used_twice():
    with pytest.raises(DAGError, match=r"stage name 'load' is used twice"):
        Pipeline("p", [S("load", outputs=["x"]), S("load", outputs=["y"])])


def test_output_produced_twice():
    with pytest.raises(DAGError, match=r"output 'x' is produced by both stage 'a' and stage 'b'"):
        Pipeline("p", [S("a", outputs=["x"]), S("b", outputs=["x"])])


def test_missing_producer():
    with pytest.raises(DAGError, match=r"stage 'b' needs input 'y', which no stage produces "
                                       r"\(produced: \['x'\]\)"):
        Pipeline("p", [S("a", outputs=["x"]), S("b", inputs=["y"])])


def test_missing_producer_when_nothing_is_produced():
    with pytest.raises(DAGError, match=r"stage 'b' needs input 'y'.*produced: nothing"):
        Pipeline("p", [S("b", inputs=["y"])])


def test_cycle_names_its_stages():
    with pytest.raises(DAGError, match="the pipeline has a cycle") as info:
        Pipeline("p", [S("src", outputs=["s"]),
                       S("a", inputs=["s", "z"], outputs=["x"]),
                       S("b", inputs=["x"], outputs=["y"]),
                       S("c", inputs=["y"], outputs=["z"])])
    msg = str(info.value)
    path = msg.split(": ", 1)[1].split(" -> ")
    assert path[0] == path[-1]
    assert sorted(path[:-1]) == ["a", "b", "c"]
    assert "src" not in path


def test_self_loop_is_a_cycle():
    with pytest.raises(DAGError, match=r"cycle: a -> a"):
        Pipeline("p", [S("a", inputs=["x"], outputs=["x"])])


def test_dag_error_is_value_error():
    assert issubclass(DAGError, ValueError)


# ------------------------------------------------------------------ unit tests: structure

def test_order_earliest_declared_ready_first():
    # declared out of dependency order; c and d both become ready after a
    p = Pipeline("p", [S("d", inputs=["x"], outputs=["dd"]),
                       S("b", inputs=["dd", "cc"]),
                       S("c", inputs=["x"], outputs=["cc"]),
                       S("a", outputs=["x"])])
    assert p.order == ["a", "d", "c", "b"]
    assert p.edges == [Edge("a", "d", "x"), Edge("d", "b", "dd"), Edge("c", "b", "cc"),
                       Edge("a", "c", "x")]
    assert p.in_edges("b") == [Edge("d", "b", "dd"), Edge("c", "b", "cc")]
    assert p.out_edges("a") == [Edge("a", "d", "x"), Edge("a", "c", "x")]
    assert p.stage("c").outputs == ("cc",)


def test_several_sources_keep_declaration_order():
    p = Pipeline("p", [S("z", outputs=["q"]), S("y"), S("x", inputs=["q"])])
    assert p.order == ["z", "y", "x"]


def test_two_data_from_same_producer_are_two_edges():
    p = Pipeline("p", [S("a", outputs=["x", "y"]), S("b", inputs=["y", "x"])])
    assert p.edges == [Edge("a", "b", "y"), Edge("a", "b", "x")]
    assert p.order == ["a", "b"]
    assert Edge("a", "b", "y").key == "a.y->b"


def test_group_names_in_order_of_first_use():
    p = Pipeline("p", [S("a", outputs=["x"], group="roll"), S("b", inputs=["x"], group="train"),
                       S("c", inputs=["x"], group="roll"), S("d", inputs=["x"])])
    assert p.group_names == ["roll", "train", "all"]


def test_stage_normalises_lists_to_tuples():
    s = S("a", inputs=["x"], outputs=["y"])
    assert s.inputs == ("x",) and s.outputs == ("y",)


# ------------------------------------------------------------------ the reference

def reference(specs):
    """``(valid, order, edges)`` for a list of ``(name, inputs, outputs)``, or ``(False, ...)``."""
    if not specs:
        return False, None, None
    for name, ins, outs in specs:
        if not (isinstance(name, str) and name.isidentifier()):
            return False, None, None
        if len(set(ins)) != len(ins) or len(set(outs)) != len(outs):
            return False, None, None
    names = [n for n, _, _ in specs]
    if len(set(names)) != len(names):
        return False, None, None
    producer = {}
    for name, _, outs in specs:
        for o in outs:
            if o in producer:
                return False, None, None
            producer[o] = name
    edges = []
    for name, ins, _ in specs:
        for i in ins:
            if i not in producer:
                return False, None, None
            edges.append((producer[i], name, i))
    # Kahn, picking the earliest-declared ready stage each time
    preds = {n: set() for n in names}
    for src, dst, _ in edges:
        preds[dst].add(src)
    done, order = set(), []
    while len(order) < len(names):
        ready = [n for n in names if n not in done and preds[n] <= done]
        if not ready:
            return False, None, None  # the rest all wait on each other: a cycle
        order.append(ready[0])
        done.add(ready[0])
    return True, order, edges


def build(specs):
    return Pipeline("h", [Stage(n, fn, inputs=i, outputs=o) for n, i, o in specs])


def check_against_reference(specs):
    valid, ref_order, ref_edges = reference(specs)
    if not valid:
        with pytest.raises(DAGError):
            build(specs)
        return False
    p = build(specs)
    names = [n for n, _, _ in specs]
    assert sorted(p.order) == sorted(names) and len(p.order) == len(set(p.order))
    pos = {n: k for k, n in enumerate(p.order)}
    got_edges = [(e.src, e.dst, e.name) for e in p.edges]
    for src, dst, _ in got_edges:
        assert pos[src] < pos[dst], (src, dst, p.order)
    assert p.order == ref_order
    assert got_edges == ref_edges
    assert set(got_edges) == set(ref_edges)
    # determinism: the same pipeline built again orders the same way
    assert build(specs).order == p.order
    return True


NAMES = st.sampled_from(["a", "b", "c", "d", "e", "f", "1x"])  # "1x" is not an identifier
DATA = st.sampled_from(["p", "q", "r", "s", "t", "u"])
random_specs = st.lists(
    st.tuples(NAMES, st.lists(DATA, max_size=3), st.lists(DATA, max_size=3)),
    min_size=0, max_size=6)


@settings(max_examples=200, deadline=None)
@given(random_specs)
def test_random_pipelines_match_reference(specs):
    check_against_reference(specs)


@st.composite
def valid_specs(draw):
    """A DAG by construction (inputs only from earlier stages), declared in a random order."""
    n = draw(st.integers(1, 8))
    specs, produced = [], []
    for k in range(n):
        ins = draw(st.lists(st.sampled_from(produced), max_size=3, unique=True)) if produced else []
        outs = [f"d{k}_{j}" for j in range(draw(st.integers(0, 2)))]
        produced += outs
        specs.append((f"s{k}", ins, outs))
    perm = draw(st.permutations(range(n)))
    return [specs[i] for i in perm]


@settings(max_examples=200, deadline=None)
@given(valid_specs())
def test_valid_pipelines_order_and_edges(specs):
    assert check_against_reference(specs)


@st.composite
def cyclic_specs(draw):
    """A valid DAG plus one back edge, so it holds exactly the cycles through that edge."""
    specs = draw(valid_specs())
    by_topo = sorted(specs, key=lambda s: int(s[0][1:]))
    k = draw(st.integers(0, len(by_topo) - 1))
    j = draw(st.integers(k, len(by_topo) - 1))
    # stage k gains input "back", produced by stage j that (transitively or not) follows k;
    # force j to depend on k so the back edge closes a cycle
    name_k, ins_k, outs_k = by_topo[k]
    name_j, ins_j, outs_j = by_topo[j]
    fresh_k = f"fwd{k}"
    out = []
    for name, ins, outs in specs:
        ins, outs = list(ins), list(outs)
        if name == name_k:
            ins.append("back")
            outs.append(fresh_k)
        if name == name_j:
            outs.append("back")
            if j != k:
                ins.append(fresh_k)
        out.append((name, ins, outs))
    return out


@settings(max_examples=200, deadline=None)
@given(cyclic_specs())
def test_cycles_always_rejected(specs):
    assert reference(specs)[0] is False
    with pytest.raises(DAGError, match="cycle"):
        build(specs)


def test_random_generator_covers_every_outcome():
    """Sanity of the random strategy: each kind of failure and success does occur."""
    rng = random.Random(0)
    kinds = set()
    for _ in range(1000):
        specs = [(rng.choice("abcdef"), rng.sample("pqrstu", rng.randint(0, 2)),
                  rng.sample("pqrstu", rng.randint(0, 2))) for _ in range(rng.randint(1, 5))]
        valid = reference(specs)[0]
        try:
            build(specs)
            kinds.add("ok")
        except DAGError as exc:
            assert not valid
            kinds.add(str(exc).split(" ")[0] + ("cycle" if "cycle" in str(exc) else "")
                      + ("twice" if "twice" in str(exc) else "")
                      + ("both" if "both" in str(exc) else "")
                      + ("needs" if "needs" in str(exc) else ""))
    assert "ok" in kinds
    joined = " ".join(kinds)
    for word in ("cycle", "twice", "both", "needs"):
        assert word in joined, kinds
