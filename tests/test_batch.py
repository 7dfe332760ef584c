"""Tests of ``distflow.runtime.batch.Batch``: validation, selection, concatenation,
canonical order, and the round trip through the wire format."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distflow.runtime.batch import Batch
from distflow.transport.wire import Message, decode, encode

pytestmark = [pytest.mark.timeout(120),
              # decoded tensors view read-only frames; wire.py expects that
              pytest.mark.filterwarnings("ignore:The given buffer is not writable")]


def make(n: int = 4, **extra) -> Batch:
    data = {"x": torch.arange(n * 3, dtype=torch.float32).reshape(n, 3),
            "tok": torch.arange(n, dtype=torch.int64) * 10, **extra}
    return Batch(data, torch.arange(100, 100 + n), lengths=torch.arange(1, n + 1),
                 groups=torch.arange(n) // 2, meta={"step": 7})


# ---------------------------------------------------------------------- construction

def test_defaults():
    b = Batch({"x": torch.zeros(3, 2)}, [5, 6, 7])
    assert len(b) == 3
    assert b.sample_ids.dtype == torch.int64 and b.sample_ids.tolist() == [5, 6, 7]
    assert b.lengths.dtype == torch.int64 and b.lengths.tolist() == [1, 1, 1]
    assert b.groups.tolist() == [5, 6, 7]  # each sample is its own group
    assert b.num_tokens == 3
    assert b.meta == {}
    # groups is a copy of sample_ids, not an alias of it
    b.groups[0] = 99
    assert b.sample_ids[0] == 5


def test_index_vectors_are_int64_from_lists_and_other_dtypes():
    b = Batch({}, torch.tensor([3, 1], dtype=torch.int32), lengths=[10, 20],
              groups=torch.tensor([0, 0], dtype=torch.int16))
    for t in (b.sample_ids, b.lengths, b.groups):
        assert t.dtype == torch.int64
    assert b.num_tokens == 30 and isinstance(b.num_tokens, int)


def test_empty_batch():
    b = Batch({"x": torch.zeros(0, 5)}, [])
    assert len(b) == 0 and b.num_tokens == 0
    assert b.lengths.shape == (0,) and b.groups.shape == (0,)


def test_accessors():
    b = make(4)
    assert "x" in b and "nope" not in b
    assert torch.equal(b["tok"], torch.tensor([0, 10, 20, 30]))
    with pytest.raises(KeyError):
        b["nope"]


@pytest.mark.parametrize("shape", [(3,), (3, 2), (5, 2), (2, 3)])
def test_mismatched_dim0_names_the_column(shape):
    with pytest.raises(ValueError, match="'bad'") as info:
        Batch({"ok": torch.zeros(4), "bad": torch.zeros(shape)}, torch.arange(4))
    assert "4" in str(info.value)


def test_zero_dim_tensor_names_the_column():
    with pytest.raises(ValueError, match="'scalar'"):
        Batch({"scalar": torch.tensor(1.0)}, [0])


def test_non_tensor_column_names_the_column():
    with pytest.raises(ValueError, match="'lst'.*list"):
        Batch({"lst": [1, 2]}, [0, 1])


@pytest.mark.parametrize("name", ["__sample_id", "__length", "__group"])
def test_reserved_column_names(name):
    with pytest.raises(ValueError, match=repr(name)):
        Batch({name: torch.zeros(2)}, [0, 1])


@pytest.mark.parametrize("field", ["lengths", "groups"])
@pytest.mark.parametrize("value", [[1, 2], [1, 2, 3, 4], [[1, 2, 3]], 5])
def test_wrong_length_index_vectors(field, value):
    with pytest.raises(ValueError, match=field):
        Batch({}, [0, 1, 2], **{field: value})


def test_sample_ids_must_be_a_vector():
    with pytest.raises(ValueError, match="sample_ids"):
        Batch({}, torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="sample_ids"):
        Batch({}, torch.tensor(3))


# ------------------------------------------------------------------------- semantics

def test_select_positions_in_order():
    b = make(5)
    s = b.select([4, 0, 2])
    assert s.sample_ids.tolist() == [104, 100, 102]
    assert s.lengths.tolist() == [5, 1, 3]
    assert s.groups.tolist() == [2, 0, 1]
    assert torch.equal(s["x"], b["x"][[4, 0, 2]])
    assert s["tok"].tolist() == [40, 0, 20]
    assert s.meta == {"step": 7} and s.meta is not b.meta


def test_select_tensor_index_repeat_and_empty():
    b = make(3)
    r = b.select(torch.tensor([1, 1]))
    assert r.sample_ids.tolist() == [101, 101] and r["tok"].tolist() == [10, 10]
    e = b.select([])
    assert len(e) == 0 and e["x"].shape == (0, 3) and e.num_tokens == 0


def test_select_does_not_alias_the_index_vectors():
    b = make(3)
    s = b.select([0, 1, 2])
    s.lengths[0] = 1000
    assert b.lengths[0] == 1


def test_sorted_is_canonical_order():
    b = Batch({"v": torch.tensor([30., 10., 20., 0.])}, [3, 1, 2, 0], lengths=[4, 2, 3, 1],
              groups=[1, 0, 1, 0])
    s = b.sorted()
    assert s.sample_ids.tolist() == [0, 1, 2, 3]
    assert s["v"].tolist() == [0., 10., 20., 30.]
    assert s.lengths.tolist() == [1, 2, 3, 4]
    assert s.groups.tolist() == [0, 0, 1, 1]
    assert b.sample_ids.tolist() == [3, 1, 2, 0]  # the original is untouched


def test_cat():
    a, b = make(2), make(3).select([2, 1, 0])
    c = Batch.cat([a, b])
    assert c.sample_ids.tolist() == [100, 101, 102, 101, 100]
    assert c.lengths.tolist() == [1, 2, 3, 2, 1]
    assert c.groups.tolist() == [0, 0, 1, 0, 0]
    assert torch.equal(c["x"], torch.cat([a["x"], b["x"]]))
    assert c.meta == {"step": 7}
    assert c.num_tokens == a.num_tokens + b.num_tokens


def test_cat_takes_meta_from_first_and_handles_empty_parts():
    a = Batch({"x": torch.zeros(0, 2)}, [], meta={"first": True})
    b = Batch({"x": torch.ones(2, 2)}, [1, 2], meta={"second": True})
    c = Batch.cat([a, b])
    assert c.meta == {"first": True}
    assert c.sample_ids.tolist() == [1, 2] and c["x"].tolist() == [[1, 1], [1, 1]]


def test_cat_errors():
    with pytest.raises(ValueError, match="at least one"):
        Batch.cat([])
    with pytest.raises(ValueError, match="columns"):
        Batch.cat([make(2), Batch({"x": torch.zeros(1, 3)}, [9])])
    with pytest.raises(ValueError, match="columns"):  # same names, different order
        Batch.cat([Batch({"a": torch.zeros(1), "b": torch.zeros(1)}, [0]),
                   Batch({"b": torch.zeros(1), "a": torch.zeros(1)}, [1])])


def test_with_columns_adds_and_replaces():
    b = make(3)
    w = b.with_columns(y=torch.tensor([1, 2, 3]), tok=torch.tensor([7, 8, 9]))
    assert list(w.data) == ["x", "tok", "y"]
    assert w["tok"].tolist() == [7, 8, 9] and w["y"].tolist() == [1, 2, 3]
    assert torch.equal(w.sample_ids, b.sample_ids) and torch.equal(w.groups, b.groups)
    assert torch.equal(w.lengths, b.lengths)
    assert b["tok"].tolist() == [0, 10, 20] and "y" not in b  # original untouched
    w.meta["new"] = 1
    assert "new" not in b.meta


def test_with_columns_validates():
    b = make(3)
    with pytest.raises(ValueError, match="'y'"):
        b.with_columns(y=torch.zeros(2))
    with pytest.raises(ValueError, match="__group"):
        b.with_columns(__group=torch.zeros(3))


# ----------------------------------------------------------------------------- wire

def wire_round_trip(b: Batch) -> Batch:
    frames = encode(Message(0, "batch", ("it", 1), b.meta, b.tensors()))
    m = decode([bytes(f) for f in frames])
    return Batch.from_tensors(m.tensors, m.meta)


def assert_batches_equal(a: Batch, b: Batch):
    assert list(a.data) == list(b.data)
    for k in a.data:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for f in ("sample_ids", "lengths", "groups"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert a.meta == b.meta


def test_tensors_contains_reserved_columns():
    b = make(3)
    t = b.tensors()
    assert set(t) == {"x", "tok", "__sample_id", "__length", "__group"}
    assert torch.equal(t["__sample_id"], b.sample_ids)
    assert torch.equal(t["__length"], b.lengths) and torch.equal(t["__group"], b.groups)


def test_from_tensors_requires_index_columns():
    t = make(2).tensors()
    del t["__length"]
    with pytest.raises(ValueError, match="__length"):
        Batch.from_tensors(t)


def test_from_tensors_meta_is_copied():
    meta = {"a": 1}
    b = Batch.from_tensors(make(2).tensors(), meta)
    b.meta["b"] = 2
    assert meta == {"a": 1}
    assert Batch.from_tensors(make(2).tensors()).meta == {}


def test_wire_round_trip_simple():
    b = make(4, mask=torch.tensor([True, False, True, True]),
             emb=torch.randn(4, 2, 3, dtype=torch.bfloat16))
    assert_batches_equal(wire_round_trip(b), b)
    assert_batches_equal(wire_round_trip(b.select([3, 1])), b.select([3, 1]))
    assert_batches_equal(wire_round_trip(b.select([])), b.select([]))


def test_wire_round_trip_of_non_contiguous_columns():
    base = torch.arange(24.).reshape(4, 6)
    b = Batch({"t": base[:, ::2], "u": base.T[:4]}, [0, 1, 2, 3])
    got = wire_round_trip(b)
    assert torch.equal(got["t"], base[:, ::2]) and torch.equal(got["u"], base.T[:4])


@st.composite
def batches(draw):
    n = draw(st.integers(0, 12))
    ids = draw(st.lists(st.integers(-2 ** 40, 2 ** 40), min_size=n, max_size=n, unique=True))
    lengths = draw(st.lists(st.integers(0, 5000), min_size=n, max_size=n))
    groups = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    data = {}
    for i in range(draw(st.integers(0, 3))):
        dtype = draw(st.sampled_from([torch.float32, torch.int64, torch.bool, torch.float16]))
        trailing = draw(st.lists(st.integers(0, 3), max_size=2))
        vals = draw(st.lists(st.integers(-100, 100), min_size=n * int(torch.tensor(trailing).prod()),
                             max_size=n * int(torch.tensor(trailing).prod())))
        data[f"c{i}"] = torch.tensor(vals, dtype=torch.int64).reshape(n, *trailing).to(dtype)
    meta = draw(st.dictionaries(st.text(max_size=5), st.integers(-5, 5), max_size=3))
    return Batch(data, ids, lengths, groups, meta)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_wire_round_trip_property(b):
    assert_batches_equal(wire_round_trip(b), b)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(), st.data())
def test_select_cat_sorted_properties(b, data):
    n = len(b)
    perm = data.draw(st.permutations(list(range(n))))
    cut = data.draw(st.integers(0, n))
    parts = [b.select(perm[:cut]), b.select(perm[cut:])]
    assert sum(len(p) for p in parts) == n
    assert sum(p.num_tokens for p in parts) == b.num_tokens
    # Splitting, shuffling and joining, then sorting, gives back the sorted batch.
    assert_batches_equal(Batch.cat(parts).sorted(), b.sorted())
    s = b.sorted()
    assert s.sample_ids.tolist() == sorted(b.sample_ids.tolist())
    # Each sample keeps its own length, group and column values.
    row = {int(i): k for k, i in enumerate(b.sample_ids.tolist())}
    for k, sid in enumerate(s.sample_ids.tolist()):
        assert s.lengths[k] == b.lengths[row[sid]] and s.groups[k] == b.groups[row[sid]]
        for c in b.data:
            assert torch.equal(s[c][k], b[c][row[sid]])
