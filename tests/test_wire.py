"""Tests of the data-plane wire format (``distflow.transport.wire``).

Round trips are checked bit for bit (NaN payloads, -0.0, subnormals included), through
plain ``bytes`` and through real zero-copy ``zmq.Frame`` objects; every malformed or
hostile message must raise ``WireError`` and nothing else.
"""
from __future__ import annotations

import gc
import math
import pickle

import msgpack
import numpy as np
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distflow.transport.wire import DTYPES, Limits, Message, WireError, decode, encode

pytestmark = [pytest.mark.timeout(120),
              # decoded tensors view read-only frames; wire.py expects that
              pytest.mark.filterwarnings("ignore:The given buffer is not writable")]

SETTINGS = settings(max_examples=120, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# --------------------------------------------------------------------------- helpers

def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t`` as a flat uint8 tensor (exact comparison, NaNs included)."""
    flat = t.detach().resolve_conj().resolve_neg().reshape(-1)
    return flat.clone(memory_format=torch.contiguous_format).view(torch.uint8)


def assert_same_tensor(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert tuple(got.shape) == tuple(want.shape), (got.shape, want.shape)
    assert torch.equal(bits(got), bits(want))
    if want.numel():  # an element-wise view as an int of the same size, too
        ity = _INT_OF_SIZE.get(want.element_size())
        if ity is not None and not want.is_complex():
            assert torch.equal(got.contiguous().view(ity), want.contiguous().view(ity))
    if not (want.is_floating_point() or want.is_complex()):
        assert torch.equal(got, want)
    else:  # value equality where NaNs are equal to NaNs
        g, w = got.to(torch.complex128 if want.is_complex() else torch.float64), \
            want.to(torch.complex128 if want.is_complex() else torch.float64)
        assert torch.equal(torch.isnan(g), torch.isnan(w))
        assert torch.equal(torch.nan_to_num(g, nan=0.0), torch.nan_to_num(w, nan=0.0))


def assert_same_message(got: Message, want: Message) -> None:
    assert isinstance(got, Message)
    assert got.src == want.src
    assert got.kind == want.kind
    assert got.key == tuple(want.key)
    assert got.meta == want.meta
    assert list(got.tensors) == list(want.tensors)  # names and their order
    for name, t in want.tensors.items():
        assert_same_tensor(got.tensors[name], t)


def header_bytes(**overrides) -> bytes:
    header = {"v": 1, "src": 0, "kind": "k", "key": [], "meta": None, "tensors": []}
    header.update(overrides)
    return msgpack.packb(header, use_bin_type=True)


def addr(buf) -> int:
    return np.frombuffer(buf, dtype=np.uint8).__array_interface__["data"][0]


# ------------------------------------------------------------------------ strategies

DTYPE_NAMES = sorted(DTYPES)


@st.composite
def tensors(draw, max_side: int = 5):
    """Any wire dtype, 0..4 dims (zero-size dims included), random raw bytes, and a
    random memory layout (contiguous, transposed, strided, offset, expanded, ...)."""
    dtype = DTYPES[draw(st.sampled_from(DTYPE_NAMES))]
    shape = draw(st.lists(st.integers(0, max_side), min_size=0, max_size=4))
    layout = draw(st.sampled_from(["contig", "transpose", "stride", "offset", "expand",
                                   "permute", "channels_last", "conj"]))
    base_shape = list(shape)
    if layout == "transpose" and len(shape) >= 2:
        base_shape[0], base_shape[-1] = base_shape[-1], base_shape[0]
    elif layout == "stride" and shape:
        base_shape[-1] = 2 * shape[-1] + 1
    elif layout == "offset" and shape:
        base_shape[0] = shape[0] + 2
    elif layout == "expand" and shape:
        base_shape[0] = 1
    elif layout == "permute" and len(shape) >= 3:
        base_shape = [shape[2], shape[0], shape[1], *shape[3:]]
    itemsize = torch.empty((), dtype=dtype).element_size()
    n = math.prod(base_shape)
    raw = draw(st.binary(min_size=n * itemsize, max_size=n * itemsize))
    u8 = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else \
        torch.empty(0, dtype=torch.uint8)
    if dtype == torch.bool:
        base = (u8 % 2).to(torch.bool)
    else:
        base = u8.view(dtype)
    base = base.reshape(base_shape).clone()
    if layout == "transpose" and len(shape) >= 2:
        t = base.transpose(0, -1)
    elif layout == "stride" and shape:
        t = base[..., 1::2]
    elif layout == "offset" and shape:
        t = base[1:-1]
    elif layout == "expand" and shape:
        t = base.expand(*shape)
    elif layout == "permute" and len(shape) >= 3:
        t = base.permute(1, 2, 0, *range(3, len(shape)))
    elif layout == "channels_last" and len(shape) == 4:
        t = base.contiguous(memory_format=torch.channels_last)
    elif layout == "conj" and dtype.is_complex:
        t = base.conj()  # a lazy conjugate view: the bit must be resolved on encode
    else:
        t = base
    assert list(t.shape) == shape
    return t


ints64 = st.integers(-(2 ** 63), 2 ** 64 - 1)
msgpack_values = st.recursive(
    st.none() | st.booleans() | ints64 | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
keys = st.lists(st.text(max_size=10) | st.integers(-(2 ** 63), 2 ** 63 - 1), max_size=4)


@st.composite
def messages(draw, max_tensors: int = 4):
    names = draw(st.lists(st.text(max_size=12), max_size=max_tensors, unique=True))
    return Message(src=draw(st.integers(0, 2 ** 40)), kind=draw(st.text(max_size=16)),
                   key=tuple(draw(keys)), meta=draw(msgpack_values),
                   tensors={name: draw(tensors()) for name in names})


@pytest.fixture(scope="module")
def pair():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://wire-test")
    b.connect("inproc://wire-test")
    yield a, b
    a.close(linger=0)
    b.close(linger=0)
    ctx.term()


def via_zmq(pair, frames) -> list:
    a, b = pair
    a.send_multipart(frames, copy=False)
    assert b.poll(5000), "message did not arrive"
    got = b.recv_multipart(copy=False)
    assert all(isinstance(f, zmq.Frame) for f in got)
    return got


# ----------------------------------------------------------------------- round trips

@SETTINGS
@given(messages())
def test_round_trip_bytes(msg):
    frames = encode(msg)
    assert len(frames) == 1 + len(msg.tensors)
    got = decode([bytes(f) for f in frames])
    assert_same_message(got, msg)


@SETTINGS
@given(messages())
def test_round_trip_encoded_frames_directly(msg):
    # The encoder's frames are memoryviews; decode accepts them as they are.
    assert_same_message(decode(encode(msg)), msg)


@SETTINGS
@given(messages())
def test_round_trip_zmq_zero_copy(pair, msg):
    frames = via_zmq(pair, encode(msg))
    got = decode(frames)
    assert_same_message(got, msg)
    # Zero copy: a non-empty tensor is a view of its received frame, unless the frame is
    # misaligned for the dtype (torch kernels assume aligned elements), then an aligned copy.
    for (name, t), frame in zip(got.tensors.items(), frames[1:]):
        if t.numel():
            if addr(frame.buffer) % t.element_size() == 0:
                assert t.data_ptr() == addr(frame.buffer), name
            else:
                assert t.data_ptr() % t.element_size() == 0, name


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_every_dtype_round_trips_with_special_values(pair, dtype_name):
    dtype = DTYPES[dtype_name]
    if dtype.is_floating_point:
        t = torch.tensor([0.0, -0.0, 1.5, -2.25, float("inf"), float("-inf"), float("nan"),
                          1e-40, 3.0e38], dtype=torch.float64).to(dtype)
    elif dtype.is_complex:
        t = torch.tensor([complex(1, -2), complex(float("nan"), 0), complex(-0.0, float("inf"))],
                         dtype=dtype)
    elif dtype == torch.bool:
        t = torch.tensor([True, False, True])
    else:
        info = torch.iinfo(dtype)
        t = torch.tensor([info.min, info.max, 0, 1], dtype=dtype)
    t = t.reshape(1, -1, 1)
    msg = Message(3, "x", ("a", 1), {"d": dtype_name}, {"t": t, "s": t[0, 0, 0]})
    for got in (decode([bytes(f) for f in encode(msg)]), decode(via_zmq(pair, encode(msg)))):
        assert got.tensors["t"].dtype == dtype
        assert got.tensors["t"].shape == (1, t.shape[1], 1)
        assert got.tensors["s"].shape == ()
        assert_same_message(got, msg)


def test_bit_exact_nan_payloads():
    raw = torch.tensor([0x7FF8000000000001, 0x7FF0000000000ABC, -1], dtype=torch.int64)
    t = raw.view(torch.float64)
    got = decode([bytes(f) for f in encode(Message(0, "k", (), None, {"t": t}))]).tensors["t"]
    assert torch.equal(got.view(torch.int64), raw)


def test_non_contiguous_layouts_are_encoded_in_logical_order():
    base = torch.arange(24, dtype=torch.int32).reshape(2, 3, 4)
    views = {"T": base.transpose(0, 2), "step": base[:, ::2, 1::3], "off": base[1:, 1:],
             "exp": torch.arange(3).reshape(3, 1).expand(3, 5), "perm": base.permute(2, 0, 1),
             "cl": base.reshape(1, 2, 3, 4).contiguous(memory_format=torch.channels_last),
             "conj": torch.tensor([[1 + 2j, 3 - 4j]]).conj(),
             "neg": torch.tensor([1 + 2j, 3 - 4j]).conj().imag}
    got = decode([bytes(f) for f in encode(Message(0, "k", (), None, views))]).tensors
    for name, v in views.items():
        assert got[name].is_contiguous(), name
        assert torch.equal(got[name], v.resolve_conj().resolve_neg()), name
    assert got["conj"].tolist() == [[1 - 2j, 3 + 4j]]
    assert got["neg"].tolist() == [-2.0, 4.0]


def test_requires_grad_tensor_is_sent_as_data():
    t = torch.randn(3, 2, requires_grad=True)
    got = decode([bytes(f) for f in encode(Message(0, "k", (), None, {"t": t * 2}))])
    assert torch.equal(got.tensors["t"], (t * 2).detach())
    assert not got.tensors["t"].requires_grad


def test_encode_rejects_non_tensor_and_unsupported_dtype():
    with pytest.raises(TypeError, match="'x'"):
        encode(Message(0, "k", (), None, {"x": [1, 2]}))
    with pytest.raises(TypeError, match="'q'"):
        encode(Message(0, "k", (), None, {"q": torch.zeros(2, dtype=torch.uint16)}))


@pytest.mark.parametrize("n", [5, 40_000])  # small (inline zmq msg) and large (shared)
def test_decoded_tensor_survives_dropping_the_frames(pair, n):
    want = {"a": torch.arange(n, dtype=torch.float64) * 0.5 - 3,
            "b": torch.arange(2 * n, dtype=torch.int16).reshape(2, n),
            "c": torch.linspace(-1, 1, n, dtype=torch.complex64)}
    frames = via_zmq(pair, encode(Message(1, "k", ("s", 2), None,
                                          {k: v.clone() for k, v in want.items()})))
    got = decode(frames).tensors
    ptrs = {k: t.data_ptr() for k, t in got.items()}
    del frames
    gc.collect()
    # Churn the allocator so a freed frame would be overwritten.
    junk = [bytearray(b"\xa5" * (16 * n)) for _ in range(32)]
    for _ in range(3):
        pair[0].send_multipart([b"\xff" * (16 * n)] * 3, copy=False)
        pair[1].recv_multipart(copy=False)
    gc.collect()
    for k, v in want.items():
        assert got[k].data_ptr() == ptrs[k]
        assert torch.equal(got[k], v), k
        assert float(got[k].abs().sum()) == float(v.abs().sum())
    del junk


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("offset", [0, 1, 2, 4, 8])
def test_misaligned_frames_decode_to_aligned_usable_tensors(dtype_name, offset):
    dtype = DTYPES[dtype_name]
    want = (torch.arange(37, dtype=torch.float64) - 11).to(dtype).reshape(37, 1)
    header, payload = (bytes(f) for f in encode(Message(0, "k", (), None, {"t": want})))
    backing = bytearray(len(payload) + 64)
    base = addr(backing)
    start = (-base) % 64 + offset  # a known alignment of the frame's first byte
    backing[start:start + len(payload)] = payload
    frame = memoryview(backing)[start:start + len(payload)]
    got = decode([header, frame]).tensors["t"]
    assert got.data_ptr() % got.element_size() == 0
    if offset % want.element_size() == 0:
        assert got.data_ptr() == base + start  # aligned: still zero copy
    assert_same_tensor(got, want)
    # Vectorized kernels run on it without faulting and give the right answers.
    assert torch.equal(got.clone(), want)
    if dtype != torch.bool:
        assert torch.equal((got * 1).sum(0), (want * 1).sum(0))


def test_decoded_tensor_from_bytes_survives_dropping_the_bytes():
    want = torch.arange(1000, dtype=torch.float32)
    frames = [bytes(f) for f in encode(Message(0, "k", (), None, {"t": want.clone()}))]
    got = decode(frames).tensors["t"]
    del frames
    gc.collect()
    _ = [bytes(range(256)) * 64 for _ in range(64)]
    assert torch.equal(got, want)


# --------------------------------------------------------------------------- rejection

def expect_wire_error(frames, limits: Limits = Limits(), match: str | None = None):
    with pytest.raises(WireError, match=match) as info:
        decode(frames, limits)
    assert isinstance(info.value, ValueError)
    return info.value


def valid_frames(**tensors_) -> list[bytes]:
    tensors_ = tensors_ or {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
                            "b": torch.tensor([1, 2, 3, 4], dtype=torch.int64)}
    return [bytes(f) for f in encode(Message(0, "k", ("x",), {"m": 1}, tensors_))]


def test_valid_frames_decode():
    m = decode(valid_frames())
    assert m.tensors["a"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert m.tensors["b"].tolist() == [1, 2, 3, 4]


def test_wire_error_is_value_error():
    assert issubclass(WireError, ValueError)


@SETTINGS
@given(st.binary(max_size=200), st.lists(st.binary(max_size=32), max_size=3))
def test_garbage_header_raises_wire_error(header, rest):
    try:
        m = decode([header, *rest])
    except WireError:
        return
    # Garbage that happens to be a valid header is fine, but then it must be valid.
    assert isinstance(m, Message)
    assert len(m.tensors) == len(rest)


def test_empty_message():
    expect_wire_error([], match="empty")


def test_truncated_message_missing_tensor_frame():
    f = valid_frames()
    expect_wire_error(f[:-1], match="truncated")
    expect_wire_error(f[:1], match="truncated")


def test_extra_frame():
    f = valid_frames()
    expect_wire_error([*f, b"\x00" * 8], match="padded")
    expect_wire_error([*f, b""], match="padded")


def test_frame_length_mismatch():
    f = valid_frames()
    expect_wire_error([f[0], f[1][:-1], f[2]], match="frame has")
    expect_wire_error([f[0], f[1] + b"\x00", f[2]], match="frame has")
    expect_wire_error([f[0], f[2], f[1]], match="frame has")  # swapped frames


def spec_frames(spec, payload: bytes) -> list[bytes]:
    return [header_bytes(tensors=[spec]), payload]


def test_spec_is_accepted_when_well_formed():
    m = decode(spec_frames(["t", "int32", [2], 8], b"\x01\x00\x00\x00\x02\x00\x00\x00"))
    assert m.tensors["t"].tolist() == [1, 2]


@pytest.mark.parametrize("nbytes", [7, 9, 0, -8, 8.0, "8", None, True, [8], 2 ** 64 - 1])
def test_wrong_nbytes_in_spec(nbytes):
    expect_wire_error(spec_frames(["t", "int32", [2], nbytes], b"\x00" * 8))


def test_nbytes_matching_frame_but_not_shape():
    expect_wire_error(spec_frames(["t", "int32", [2], 12], b"\x00" * 12), match="declared")


@pytest.mark.parametrize("dtype", ["float128", "uint16", "Float32", "", None, 5, True,
                                   ["float32"], {"a": 1}, b"float32", 1.5])
def test_unknown_dtype(dtype):
    expect_wire_error(spec_frames(["t", dtype, [2], 8], b"\x00" * 8), match="dtype")


@pytest.mark.parametrize("shape", [[-1], [2, -3], [True], [False, 2], [2.0], [1.5],
                                   ["2"], [None], [[2]], 2, "2", None, {"a": 2}])
def test_bad_shape_entries(shape):
    expect_wire_error(spec_frames(["t", "int8", shape, 2], b"\x00" * 2), match="shape")


def test_too_many_dims():
    ok = decode(spec_frames(["t", "int8", [1] * 16, 1], b"\x07"))
    assert ok.tensors["t"].dim() == 16 and ok.tensors["t"].flatten().tolist() == [7]
    expect_wire_error(spec_frames(["t", "int8", [1] * 17, 1], b"\x07"), match="shape")
    expect_wire_error(spec_frames(["t", "int8", [1] * 3, 1], b"\x07"), Limits(max_ndim=2))


@pytest.mark.parametrize("shape", [[2 ** 64 - 1, 0], [2 ** 63, 0], [2 ** 40, 2 ** 40, 0],
                                   [0] + [2 ** 20] * 15])
def test_huge_dims_of_zero_size_tensor(shape):
    expect_wire_error(spec_frames(["t", "float32", shape, 0], b""), match="shape")


def test_zero_size_tensors_are_fine():
    m = decode(spec_frames(["t", "float64", [3, 0, 2], 0], b""))
    assert m.tensors["t"].shape == (3, 0, 2) and m.tensors["t"].dtype == torch.float64


@pytest.mark.parametrize("spec", [["t", "int8", [1]], ["t", "int8", [1], 1, 0], "t", None,
                                  {"name": "t"}, [1, "int8", [1], 1], [None, "int8", [1], 1]])
def test_malformed_spec(spec):
    expect_wire_error(spec_frames(spec, b"\x00"))


@pytest.mark.parametrize("header", [[], [1, 2, 3], "hello", 1, None, b"\x01", 1.5, True])
def test_header_not_a_map(header):
    expect_wire_error([msgpack.packb(header, use_bin_type=True)], match="header must be a map")


@pytest.mark.parametrize("change", ["drop", "extra", "rename", "bytes_key"])
def test_header_wrong_keys(change):
    header = {"v": 1, "src": 0, "kind": "k", "key": [], "meta": None, "tensors": []}
    if change == "drop":
        del header["meta"]
    elif change == "extra":
        header["x"] = 1
    elif change == "rename":
        header["Tensors"] = header.pop("tensors")
    else:  # a bytes key alongside str keys (not sortable together)
        header[b"tensors"] = header.pop("tensors")
    expect_wire_error([msgpack.packb(header, use_bin_type=True)], match="keys")


def test_header_with_non_string_map_keys():
    expect_wire_error([msgpack.packb({1: 2}, use_bin_type=True)])
    expect_wire_error([header_bytes(meta={1: "x"})])


@pytest.mark.parametrize("v", [0, 2, -1, "1", None, 1.0, True, [1], 2 ** 64 - 1])
def test_wrong_version(v):
    expect_wire_error([header_bytes(v=v)], match="version")


@pytest.mark.parametrize("src", [-1, "0", None, True, 1.0, [0]])
def test_bad_src(src):
    expect_wire_error([header_bytes(src=src)], match="src")


@pytest.mark.parametrize("field,value", [("kind", 1), ("kind", None), ("kind", b"k"),
                                         ("key", "abc"), ("key", None), ("key", {"a": 1}),
                                         ("tensors", None), ("tensors", {"t": 1})])
def test_bad_kind_key_tensors_types(field, value):
    expect_wire_error([header_bytes(**{field: value})])


@pytest.mark.parametrize("where", ["meta", "nested", "key", "spec"])
def test_msgpack_ext_types_are_rejected(where):
    ext = msgpack.ExtType(5, b"payload")
    if where == "meta":
        raw = header_bytes(meta=ext)
    elif where == "nested":
        raw = header_bytes(meta={"a": [1, {"b": ext}]})
    elif where == "key":
        raw = header_bytes(key=["x", ext])
    else:
        raw = header_bytes(tensors=[["t", ext, [1], 1]])
    frames = [raw] + ([b"\x00"] if where == "spec" else [])
    expect_wire_error(frames, match="ext")


def test_msgpack_timestamp_ext_is_rejected():
    import datetime
    ts = msgpack.Timestamp.from_datetime(datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc))
    expect_wire_error([header_bytes(meta=ts)], match="ext")


def test_header_over_max_header_bytes():
    f = [bytes(x) for x in encode(Message(0, "k", (), {"blob": "x" * 5000}, {}))]
    assert decode(f, Limits(max_header_bytes=len(f[0]))).meta == {"blob": "x" * 5000}
    expect_wire_error(f, Limits(max_header_bytes=len(f[0]) - 1), match="header of")
    # The default limit (1 MiB) rejects a 2 MiB header.
    big = [bytes(x) for x in encode(Message(0, "k", (), b"\x00" * (2 << 20), {}))]
    expect_wire_error(big, match="header of")


def test_message_over_max_message_bytes():
    f = valid_frames(t=torch.zeros(1000, dtype=torch.float64))
    total = sum(len(x) for x in f)
    assert decode(f, Limits(max_message_bytes=total)).tensors["t"].shape == (1000,)
    expect_wire_error(f, Limits(max_message_bytes=total - 1), match="exceeds")


def test_message_over_limit_counts_all_frames():
    # No frame alone is large, but together they are (including undeclared frames).
    f = [header_bytes()] + [b"\x00" * 100] * 50
    expect_wire_error(f, Limits(max_message_bytes=1000), match="exceeds")


def test_too_many_tensors():
    f = valid_frames(**{f"t{i}": torch.zeros(1) for i in range(5)})
    assert len(decode(f, Limits(max_tensors=5)).tensors) == 5
    expect_wire_error(f, Limits(max_tensors=4), match="at most 4")


def test_duplicate_tensor_names():
    spec = ["t", "int8", [2], 2]
    expect_wire_error([header_bytes(tensors=[spec, spec]), b"\x01\x02", b"\x03\x04"],
                      match="twice")
    other = ["t", "float32", [1], 4]
    expect_wire_error([header_bytes(tensors=[spec, other]), b"\x01\x02", b"\x00" * 4],
                      match="twice")


def test_trailing_bytes_after_header():
    f = valid_frames()
    expect_wire_error([f[0] + b"\x00", *f[1:]], match="msgpack")
    expect_wire_error([f[0][:-1], *f[1:]], match="msgpack")


def test_deeply_nested_header():
    deep = b"\x91" * 100_000 + b"\xc0"  # [[[[...None...]]]]
    expect_wire_error([deep])


def test_pickle_header_is_rejected_without_unpickling(tmp_path):
    class CreatesFile:
        def __init__(self, path):
            self.path = str(path)

        def __reduce__(self):
            return (open, (self.path, "w"))

    # The payload is live: unpickling it does create the file.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(CreatesFile(probe))).close()
    assert probe.exists()

    target = tmp_path / "pwned"
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        payload = pickle.dumps(CreatesFile(target), protocol=protocol)
        for frames in ([payload], [payload, b"\x00" * 8],
                       [header_bytes(meta=payload)]):  # pickle bytes as *data* are inert
            try:
                m = decode(frames)
            except WireError:
                m = None
            if frames[0] is payload:
                assert m is None, f"protocol {protocol}: pickle header was accepted"
            else:
                assert m.meta == payload
            assert not target.exists(), f"protocol {protocol}: the pickle was executed"


@st.composite
def mutated(draw):
    msg = draw(messages(max_tensors=3))
    frames = [bytearray(bytes(f)) for f in encode(msg)]
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "extend", "drop_frame",
                                   "dup_frame", "add_frame", "swap_frames", "empty_frame"]))
        i = draw(st.integers(0, len(frames) - 1)) if frames else 0
        if op == "flip" and frames and frames[i]:
            j = draw(st.integers(0, len(frames[i]) - 1))
            frames[i][j] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and frames and frames[i]:
            j = draw(st.integers(0, len(frames[i]) - 1))
            frames[i][j] = draw(st.integers(0, 255))
        elif op == "truncate" and frames:
            del frames[i][draw(st.integers(0, len(frames[i]))):]
        elif op == "extend" and frames:
            frames[i] += draw(st.binary(min_size=1, max_size=16))
        elif op == "drop_frame" and frames:
            del frames[i]
        elif op == "dup_frame" and frames:
            frames.insert(i, bytearray(frames[i]))
        elif op == "add_frame":
            frames.append(bytearray(draw(st.binary(max_size=16))))
        elif op == "swap_frames" and len(frames) >= 2:
            j = draw(st.integers(0, len(frames) - 1))
            frames[i], frames[j] = frames[j], frames[i]
        elif op == "empty_frame" and frames:
            frames[i] = bytearray()
    return [bytes(f) for f in frames]


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated())
def test_mutated_messages_decode_or_raise_wire_error(frames):
    try:
        m = decode(frames)
    except WireError:
        return
    assert isinstance(m, Message)
    assert len(m.tensors) == len(frames) - 1
    for t, f in zip(m.tensors.values(), frames[1:]):
        assert t.numel() * t.element_size() == len(f)
        bits(t)  # the tensor's memory is readable


def _fuzz_value():
    return msgpack_values | st.integers(-5, 70) | st.sampled_from(DTYPE_NAMES) \
        | st.lists(st.integers(-3, 2 ** 64 - 1), max_size=18)


@st.composite
def fuzzed_headers(draw):
    """Headers with the right shape but arbitrary values in any field."""
    header = {"v": 1, "src": 0, "kind": "k", "key": [], "meta": None, "tensors": []}
    specs = []
    for _ in range(draw(st.integers(0, 3))):
        spec = [draw(st.text(max_size=3)), draw(st.sampled_from(DTYPE_NAMES)),
                draw(st.lists(st.integers(0, 3), max_size=3)), draw(st.integers(0, 64))]
        for j in draw(st.sets(st.integers(0, 3), max_size=4)):
            spec[j] = draw(_fuzz_value())
        if draw(st.booleans()):
            spec = spec[: draw(st.integers(0, 4))] + draw(st.lists(_fuzz_value(), max_size=1))
        specs.append(spec)
    header["tensors"] = specs
    for k in draw(st.sets(st.sampled_from(sorted(header)), max_size=3)):
        header[k] = draw(_fuzz_value())
    if draw(st.booleans()):
        header[draw(st.text(max_size=3) | st.binary(max_size=3))] = draw(_fuzz_value())
    frames = [msgpack.packb(header, use_bin_type=True)]
    frames += draw(st.lists(st.binary(max_size=64), min_size=max(0, len(specs) - 1),
                            max_size=len(specs) + 1))
    return frames


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(fuzzed_headers())
def test_fuzzed_headers_decode_or_raise_wire_error(frames):
    try:
        m = decode(frames)
    except WireError:
        return
    assert isinstance(m, Message)
    assert m.src >= 0 and isinstance(m.kind, str) and isinstance(m.key, tuple)


def test_decode_never_unpickles(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("pickle used on the wire")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    monkeypatch.setattr(torch, "load", boom)
    m = decode(valid_frames())
    assert m.tensors["b"].tolist() == [1, 2, 3, 4]
    assert decode([bytes(f) for f in encode(m)]).tensors["b"].tolist() == [1, 2, 3, 4]
