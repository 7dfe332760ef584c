"""Wire format of the data plane: one msgpack header frame + one raw frame per tensor.

Nothing that crosses the wire is pickled. The header is plain msgpack (maps, lists,
numbers, strings, bytes); tensors travel as their raw bytes, zero-copy on send (the
frame is a view of the tensor's memory) and on receive (the tensor is a view of the
frame). Every received message is validated against hard limits before any tensor is
built, so a malformed, truncated, oversized or hostile message raises ``WireError``.

Header layout (a msgpack map)::

    {"v": 1, "src": <int rank>, "kind": <str>, "key": [<str|int>...],
     "meta": <msgpack value>, "tensors": [[name, dtype, shape, nbytes], ...]}
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

WIRE_VERSION = 1

# Received frames are read-only buffers that the tensor keeps alive; torch warns about
# that on every call, and the tensors we hand out are owned by the receiver anyway.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
    "complex64": torch.complex64, "complex128": torch.complex128,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_HEADER_KEYS = {"v", "src", "kind", "key", "meta", "tensors"}


class WireError(ValueError):
    """A message that does not follow the wire format; it is dropped, never executed."""


@dataclass(frozen=True)
class Limits:
    """Hard bounds checked on every received message before anything is allocated."""

    max_message_bytes: int = 1 << 30
    max_header_bytes: int = 1 << 20
    max_tensors: int = 4096
    max_ndim: int = 16


@dataclass
class Message:
    src: int
    kind: str
    key: tuple
    meta: Any = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """A byte view of ``t`` (contiguous copy only when ``t`` is not contiguous)."""
    flat = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    if flat.stride(0) != 1:  # 0 or 1 elements keep any stride, which dtype views reject
        flat = flat.clone(memory_format=torch.contiguous_format)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def encode(msg: Message) -> list:
    """Frames for ``msg``: ``[header, raw_0, raw_1, ...]``; tensor frames are views."""
    specs, frames = [], []
    for name, t in msg.tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {name!r} is {type(t).__name__}, not torch.Tensor")
        if t.dtype not in DTYPE_NAMES:
            raise TypeError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        raw = _tensor_bytes(t)
        specs.append([name, DTYPE_NAMES[t.dtype], list(t.shape), raw.nbytes])
        frames.append(raw)
    header = {"v": WIRE_VERSION, "src": int(msg.src), "kind": msg.kind,
              "key": list(msg.key), "meta": msg.meta, "tensors": specs}
    return [msgpack.packb(header, use_bin_type=True), *frames]


def _no_ext(code: int, data: bytes):
    raise WireError(f"msgpack extension type {code} is not allowed on the wire")


def _unpack_header(raw, limits: Limits) -> dict:
    if len(raw) > limits.max_header_bytes:
        raise WireError(f"header of {len(raw)} bytes exceeds {limits.max_header_bytes}")
    try:
        # max_ext_len=0 also rejects the timestamp type, which bypasses ext_hook.
        header = msgpack.unpackb(bytes(raw), raw=False, strict_map_key=True,
                                 ext_hook=_no_ext, max_ext_len=0)
    except WireError:
        raise
    except Exception as e:  # msgpack raises several types for garbage
        raise WireError(f"header is not valid msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(header, dict) or set(header) != _HEADER_KEYS:
        got = sorted(map(repr, header)) if isinstance(header, dict) else type(header).__name__
        raise WireError(f"header must be a map with keys {sorted(_HEADER_KEYS)}, got {got}")
    if type(header["v"]) is not int or header["v"] != WIRE_VERSION:
        raise WireError(f"wire version {header['v']!r}, expected {WIRE_VERSION}")
    if not isinstance(header["src"], int) or isinstance(header["src"], bool) or header["src"] < 0:
        raise WireError(f"src must be a non-negative int, got {header['src']!r}")
    if not isinstance(header["kind"], str) or not isinstance(header["key"], list):
        raise WireError("kind must be a string and key a list")
    if not all(isinstance(k, (str, int)) for k in header["key"]):
        raise WireError("key items must be strings or ints")
    if not isinstance(header["tensors"], list) or len(header["tensors"]) > limits.max_tensors:
        raise WireError(f"tensors must be a list of at most {limits.max_tensors} specs")
    return header


def _check_spec(spec, limits: Limits) -> tuple[str, torch.dtype, list[int], int]:
    if not (isinstance(spec, list) and len(spec) == 4):
        raise WireError(f"tensor spec must be [name, dtype, shape, nbytes], got {spec!r:.80}")
    name, dtype, shape, nbytes = spec
    if not isinstance(name, str) or not isinstance(dtype, str) or dtype not in DTYPES:
        raise WireError(f"tensor {name!r:.40}: unknown dtype {dtype!r:.40}")
    if (not isinstance(shape, list) or len(shape) > limits.max_ndim
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise WireError(f"tensor {name!r}: shape must be <= {limits.max_ndim} non-negative ints")
    # Zero-size tensors carry no bytes, so bound the other dims too (torch overflows).
    if math.prod(max(d, 1) for d in shape) > limits.max_message_bytes:
        raise WireError(f"tensor {name!r}: shape {shape} exceeds the message limit")
    if type(nbytes) is not int:
        raise WireError(f"tensor {name!r}: nbytes must be an int, got {nbytes!r:.40}")
    itemsize = DTYPES[dtype].itemsize
    if math.prod(shape) * itemsize != nbytes:
        raise WireError(f"tensor {name!r}: shape {shape} x {itemsize} B != {nbytes} B declared")
    return name, DTYPES[dtype], shape, nbytes


def decode(frames: list, limits: Limits = Limits()) -> Message:
    """Validate and decode ``frames`` (bytes or zmq.Frame); tensors view the frames
    (a frame not aligned to its dtype's item size is copied)."""
    if not frames:
        raise WireError("empty message")
    bufs = [f.buffer if hasattr(f, "buffer") else memoryview(f) for f in frames]
    total = sum(b.nbytes for b in bufs)
    if total > limits.max_message_bytes:
        raise WireError(f"message of {total} bytes exceeds the limit of {limits.max_message_bytes}")
    header = _unpack_header(bufs[0], limits)
    specs = header["tensors"]
    if len(specs) != len(bufs) - 1:
        raise WireError(f"header declares {len(specs)} tensors but {len(bufs) - 1} frames "
                        "arrived (truncated or padded message)")
    tensors: dict[str, torch.Tensor] = {}
    for spec, buf in zip(specs, bufs[1:]):
        name, dtype, shape, nbytes = _check_spec(spec, limits)
        if buf.nbytes != nbytes:
            raise WireError(f"tensor {name!r}: frame has {buf.nbytes} B, header says {nbytes} B")
        if name in tensors:
            raise WireError(f"tensor {name!r} appears twice")
        if nbytes == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            raw = torch.frombuffer(buf, dtype=torch.uint8)
            if raw.data_ptr() % dtype.itemsize:  # torch kernels assume aligned elements
                raw = raw.clone()
            tensors[name] = raw.view(dtype).reshape(shape)
    return Message(header["src"], header["kind"], tuple(header["key"]), header["meta"], tensors)
