"""Pseudo-gradient codecs (distflow.quantize): the documented sign, error and size
guarantees as hypothesis properties, plus hand-checked encodings."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distflow.quantize import FORMATS, LEVELS, get_codec, round_trip

FOUR_BIT = tuple(LEVELS)

# fp32 values with magnitudes in {0} U [2^-100, 2^100]: chunk scales and levels stay normal
_f32 = st.floats(min_value=-2.0 ** 100, max_value=2.0 ** 100, allow_nan=False, width=32)
values = st.lists(_f32.map(lambda x: 0.0 if abs(x) < 2.0 ** -100 else x), max_size=600)
chunks = st.sampled_from([1, 7, 256])
SLACK = 1e-6  # fp32 rounding of |x| / scale and of scale * level


def _tensor(xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


@settings(deadline=None, max_examples=150)
@given(xs=values, fmt=st.sampled_from(FORMATS), chunk=chunks)
def test_sign_never_flips_and_zero_stays_zero(xs, fmt, chunk):
    x = _tensor(xs)
    q = round_trip(x, fmt, chunk)
    assert (q * x >= 0).all()
    assert (q[x == 0] == 0).all()


@settings(deadline=None, max_examples=150)
@given(xs=values, fmt=st.sampled_from(FOUR_BIT), chunk=chunks)
def test_four_bit_error_bound(xs, fmt, chunk):
    """|x| >= m: |q - x| <= |x| / 3;  |x| < m: q in {0, sign(x) m} and |q - x| <= m / 2,
    with m = scale * LEVELS[1] and scale = max|x| over the chunk / LEVELS[-1]."""
    x = _tensor(xs)
    q = round_trip(x, fmt, chunk)
    levels = LEVELS[fmt]
    for start in range(0, len(xs), chunk):
        xc, qc = x[start:start + chunk], q[start:start + chunk]
        scale = xc.abs().max() / levels[-1]
        m = scale * levels[1]
        big = xc.abs() >= m
        err = (qc - xc).abs()
        assert (err[big] <= xc[big].abs() * (1 / 3 + SLACK)).all()
        small = ~big
        assert (err[small] <= m / 2 * (1 + SLACK)).all()
        assert ((qc[small] == 0) | (qc[small] == torch.sign(xc[small]) * m)).all()
        if fmt == "e3m0" and len(xc):
            i = xc.abs().argmax()
            assert qc[i] == xc[i]  # the chunk's largest element is exact


def test_documented_relative_error_is_one_third():
    for fmt in FOUR_BIT:
        assert get_codec(fmt).max_relative_error == pytest.approx(1 / 3)


@settings(deadline=None, max_examples=100)
@given(n=st.integers(0, 3000), fmt=st.sampled_from(FORMATS), chunk=chunks)
def test_payload_size_formula(n, fmt, chunk):
    codec = get_codec(fmt, chunk)
    expected = {"fp32": 4 * n, "bf16": 2 * n}.get(fmt, 4 * math.ceil(n / chunk) + math.ceil(n / 2))
    payload = codec.encode(torch.randn(n))
    assert payload.dtype == torch.uint8 and payload.numel() == codec.payload_bytes(n) == expected


def test_four_bit_is_eight_times_smaller_up_to_scales():
    n = 1 << 20
    fp32, e3m0 = get_codec("fp32").payload_bytes(n), get_codec("e3m0").payload_bytes(n)
    assert (fp32, e3m0) == (4 * n, n // 2 + 4 * (n // 256))  # 4194304 vs 524288 + 16384
    assert fp32 / e3m0 == pytest.approx(8 / (1 + 8 / 256))


@settings(deadline=None, max_examples=100)
@given(xs=st.lists(st.floats(width=32), max_size=300))
def test_fp32_round_trip_is_bit_exact(xs):
    x = _tensor(xs)
    assert torch.equal(round_trip(x, "fp32").view(torch.int32), x.view(torch.int32))


@settings(deadline=None, max_examples=100)
@given(xs=st.lists(st.floats(allow_nan=False, width=32), max_size=300))
def test_bf16_is_torch_rounding(xs):
    x = _tensor(xs)
    assert torch.equal(round_trip(x, "bf16"), x.to(torch.bfloat16).float())


def test_e3m0_by_hand():
    # scale = 1.0; levels 0, 2^-6 .. 2^0, nearest level with ties toward zero
    x = _tensor([1.0, 0.75, 0.76, -0.3, 2 ** -7, 0.009, 0.0, -0.0, -1e-9])
    expected = _tensor([1.0, 0.5, 1.0, -0.25, 0.0, 2 ** -6, 0.0, 0.0, 0.0])
    assert torch.equal(round_trip(x, "e3m0"), expected)
    shaped = torch.tensor([[4.0, -2.0], [0.5, 3.0]])  # shape kept; 3 -> 2 or 4: tie toward 2
    assert torch.equal(round_trip(shaped, "e3m0"), torch.tensor([[4.0, -2.0], [0.5, 2.0]]))


def test_four_bit_layout():
    payload = get_codec("e3m0").encode(torch.tensor([1.0, -1.0, 0.5]))
    assert payload[:4].clone().view(torch.float32).item() == 1.0  # the chunk's scale
    # nibble = sign << 3 | code; 1.0 is code 7, 0.5 code 6; element 2i in the low nibble
    assert payload[4:].tolist() == [0x7 | (0xF << 4), 0x6]


def test_bad_inputs():
    with pytest.raises(ValueError, match="non-finite"):
        get_codec("e3m0").encode(torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match="12 bytes"):
        get_codec("fp32").decode(torch.zeros(8, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="'fp8'"):
        get_codec("fp8")
