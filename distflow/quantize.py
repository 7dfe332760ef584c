"""Codecs for the pseudo-gradients that DiLoCo islands exchange.

A codec turns a float tensor into a flat ``uint8`` payload (the bytes on the wire) and a
payload back into fp32. Islands all-gather payloads and sum the decoded values in fp32,
so a 4-bit exchange never reduces in 4 bits.

Formats and payload size for a tensor of ``n`` elements (chunk ``c``, default 256):

    fp32                  4 * n
    bf16                  2 * n          (torch's round-to-nearest-even bf16)
    e3m0 | e2m1 | int4    4 * ceil(n / c) + ceil(n / 2)

4-bit layout: the fp32 scales of the ``ceil(n / c)`` chunks of the flattened tensor, then
``n`` nibbles, two per byte (element ``2i`` in the low nibble). A nibble is a sign bit
(bit 3) and a 3-bit magnitude code; it decodes to ``sign * scale * LEVELS[code]``:

    e3m0   LEVELS = 0, 2^-6, 2^-5, ..., 2^0   (sign + 3-bit exponent, no mantissa, plus zero)
    e2m1   LEVELS = 0, 0.5, 1, 1.5, 2, 3, 4, 6 (OCP FP4)
    int4   LEVELS = 0, 1, ..., 7               (sign-magnitude)

Rounding: ``scale = max|x| / LEVELS[-1]`` over the chunk, and ``|x| / scale`` goes to the
nearest level, ties toward zero. So, with ``s`` the scale of an element's chunk and
``m = s * LEVELS[1]`` the smallest nonzero magnitude, each element satisfies (while ``s``
and ``m`` are normal fp32 numbers, i.e. not for chunks whose largest value is ~1e-36):

- zero decodes to (+)zero and the sign never flips (a small value may become zero);
- ``|x| >= m``: ``|q - x| <= |x| / 3`` (the worst case sits halfway between two levels
  whose ratio is 2; every consecutive pair of nonzero levels above has ratio <= 2), up to
  the fp32 rounding of ``|x| / s``;
- ``|x| < m``: ``q`` is ``0`` or ``sign(x) * m``, so ``|q - x| <= m / 2``.

For e3m0 ``m = max|x| / 64`` and the largest element of each chunk is exact. The 4-bit
codecs refuse non-finite inputs (no code for them); fp32 and bf16 pass them through.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch

DEFAULT_CHUNK = 256
"""Elements per fp32 scale in the 4-bit formats (scale overhead: 4 bytes per 128 bytes)."""


class Codec(Protocol):
    name: str

    def payload_bytes(self, numel: int) -> int:
        """Size of the payload of a tensor with ``numel`` elements."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (any shape, float) -> ``uint8 [payload_bytes(x.numel())]``."""

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        """``uint8 [payload_bytes(numel)]`` -> ``float32 [numel]`` (flat)."""


def _flat_f32(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1).to(torch.float32)


class Float32Codec:
    name = "fp32"

    def payload_bytes(self, numel: int) -> int:
        return 4 * numel

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return _flat_f32(x).clone().view(torch.uint8)

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        _check_size(self, payload, numel)
        return payload.clone().view(torch.float32)


class BFloat16Codec:
    name = "bf16"

    def payload_bytes(self, numel: int) -> int:
        return 2 * numel

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return _flat_f32(x).to(torch.bfloat16).view(torch.uint8)

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        _check_size(self, payload, numel)
        return payload.clone().view(torch.bfloat16).to(torch.float32)


class FourBitCodec:
    """Sign + 3-bit magnitude code into ``levels``, one fp32 scale per ``chunk_size`` elements."""

    def __init__(self, name: str, levels: list[float], chunk_size: int = DEFAULT_CHUNK):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if len(levels) != 8 or levels[0] != 0 or sorted(set(levels)) != list(levels):
            raise ValueError(f"a 4-bit codec needs 8 increasing levels starting at 0, got {levels}")
        self.name, self.chunk_size = name, chunk_size
        self.levels = torch.tensor(levels, dtype=torch.float32)
        self.midpoints = (self.levels[1:] + self.levels[:-1]) / 2  # exact for the level sets here
        self.top = float(levels[-1])

    @property
    def max_relative_error(self) -> float:
        """Bound on ``|q - x| / |x|`` for ``|x| >= scale * levels[1]``."""
        lo, hi = self.levels[1:-1], self.levels[2:]
        return float(((hi - lo) / (hi + lo)).max())

    def num_chunks(self, numel: int) -> int:
        return math.ceil(numel / self.chunk_size)

    def payload_bytes(self, numel: int) -> int:
        return 4 * self.num_chunks(numel) + math.ceil(numel / 2)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        flat = _flat_f32(x)
        if not torch.isfinite(flat).all():
            raise ValueError(f"{self.name} cannot encode non-finite values (inf/nan in a pseudo-gradient)")
        n, c = flat.numel(), self.chunk_size
        chunks = torch.nn.functional.pad(flat, (0, self.num_chunks(n) * c - n)).view(-1, c)
        scale = chunks.abs().amax(dim=1) / self.top
        ratio = chunks.abs() / torch.where(scale > 0, scale, 1.0)[:, None]
        code = torch.bucketize(ratio, self.midpoints.to(flat.device))  # ties go to the lower level
        sign = (chunks < 0) & (code > 0)  # a zero code carries no sign: zero decodes to +0
        nibbles = (code | (sign.long() << 3)).to(torch.uint8).reshape(-1)[:n]
        if n % 2:
            nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
        packed = nibbles[0::2] | (nibbles[1::2] << 4)
        return torch.cat([scale.view(torch.uint8), packed])

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        _check_size(self, payload, numel)
        k = 4 * self.num_chunks(numel)
        scale = payload[:k].clone().view(torch.float32)
        packed = payload[k:]
        nibbles = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)[:numel].long()
        magnitude = self.levels.to(payload.device)[nibbles & 7]
        chunk_scale = scale.repeat_interleave(self.chunk_size)[:numel]
        value = magnitude * chunk_scale
        return torch.where(nibbles >= 8, -value, value)


def _check_size(codec, payload: torch.Tensor, numel: int) -> None:
    if payload.dtype != torch.uint8 or payload.numel() != codec.payload_bytes(numel):
        raise ValueError(f"{codec.name} payload for {numel} elements must be uint8 of "
                         f"{codec.payload_bytes(numel)} bytes, got {payload.dtype} of {payload.numel()}")


LEVELS = {
    "e3m0": [0.0] + [2.0 ** e for e in range(-6, 1)],
    "e2m1": [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0],
    "int4": [float(k) for k in range(8)],
}
FORMATS = ("fp32", "bf16", *LEVELS)


def get_codec(name: str, chunk_size: int = DEFAULT_CHUNK) -> Codec:
    """The codec of format ``name`` (one of ``FORMATS``)."""
    if name == "fp32":
        return Float32Codec()
    if name == "bf16":
        return BFloat16Codec()
    if name in LEVELS:
        return FourBitCodec(name, LEVELS[name], chunk_size)
    raise ValueError(f"unknown quantization format {name!r}; choose one of {FORMATS}")


def round_trip(x: torch.Tensor, name: str, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """``decode(encode(x))`` in ``x``'s shape, fp32: what a receiver sees of ``x``."""
    codec = get_codec(name, chunk_size)
    return codec.decode(codec.encode(x), x.numel()).view(x.shape)
