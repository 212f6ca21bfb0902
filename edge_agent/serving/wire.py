"""The local inference API's wire format (pure): frames, tensors, error codes.

A frame is a 4-byte big-endian unsigned length, then that many bytes holding one
msgpack map. A tensor is a map `{"dtype": "float32", "shape": [1, 8], "data": bytes}`
with the values in C order, little-endian. docs/PROTOCOL.md, "Local inference API",
is the specification; the server (edge_agent.serving.server) and the client
(edge_agent.serving.client) share this module.
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np
from numpy.typing import NDArray

from edge_agent.runtime import TensorSpec

HEADER = struct.Struct(">I")
_LITTLE_ENDIAN = sys.byteorder == "little"
# The hard limit on one frame's body, both ways; a larger one is refused before it is read.
MAX_FRAME_BYTES = 16 * 1024 * 1024
MAX_RANK = 8

OP_PREDICT = "predict"
OP_INFO = "info"
OP_HEALTH = "health"
OPS = (OP_PREDICT, OP_INFO, OP_HEALTH)

# Error codes (the `code` of a reply with ok = false).
BAD_FRAME = "bad_frame"  # the body is not a msgpack map, or `id` is not an integer
FRAME_TOO_LARGE = "frame_too_large"  # over MAX_FRAME_BYTES; the agent then closes
UNKNOWN_OP = "unknown_op"
BAD_INPUT = "bad_input"  # wrong dtype or shape, missing/unknown input, non-finite values
NO_MODEL = "no_model"  # nothing installed yet
MODEL_ERROR = "model_error"  # the runtime failed on valid inputs
INTERNAL = "internal"  # a bug in the agent; the message says what
BUSY = "busy"  # the agent serves as many connections as it will; it then closes

# numpy dtype names a tensor may carry (what TFLite models take and give).
DTYPES = frozenset({
    "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "float32", "float64",
})


class WireError(ValueError):
    """A frame or a tensor breaks the protocol; `code` is the reply's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def encode_frame(message: dict[Any, Any], max_bytes: int = MAX_FRAME_BYTES) -> bytes:
    body: bytes = msgpack.packb(message, use_bin_type=True)
    if len(body) > max_bytes:
        raise WireError(FRAME_TOO_LARGE,
                        f"frame of {len(body)} bytes is over the limit of {max_bytes}")
    return HEADER.pack(len(body)) + body


def frame_length(header: bytes, max_bytes: int = MAX_FRAME_BYTES) -> int:
    """The body length a 4-byte header announces; WireError if over the limit."""
    (length,) = HEADER.unpack(header)
    if length > max_bytes:
        raise WireError(FRAME_TOO_LARGE,
                        f"frame of {length} bytes is over the limit of {max_bytes}")
    return int(length)


def decode_body(body: bytes) -> dict[Any, Any]:
    """The msgpack map in a frame's body (integer keys allowed: inputs by index)."""
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise WireError(BAD_FRAME, f"frame body is not msgpack: {exc}") from exc
    if not isinstance(message, dict):
        raise WireError(BAD_FRAME,
                        f"frame body must be a msgpack map, got {type(message).__name__}")
    return message


def encode_tensor(array: NDArray[Any]) -> dict[str, Any]:
    a = np.asarray(array)
    if a.dtype.name not in DTYPES:
        raise WireError(BAD_INPUT, f"dtype {a.dtype.name} cannot be sent; one of "
                        f"{', '.join(sorted(DTYPES))}")
    order = a.dtype.byteorder
    if order == ">" or (order == "=" and not _LITTLE_ENDIAN):
        a = a.astype(a.dtype.newbyteorder("<"))
    # tobytes() writes C order whatever the array's layout: no separate copy first.
    return {"dtype": a.dtype.name, "shape": [int(d) for d in a.shape], "data": a.tobytes()}


def decode_tensor(value: Any, what: str) -> NDArray[Any]:
    """The array a tensor map holds; WireError (BAD_INPUT) naming `what` if malformed."""
    if not isinstance(value, dict):
        raise WireError(BAD_INPUT, f"{what} must be a map with dtype, shape and data")
    dtype, shape, data = value.get("dtype"), value.get("shape"), value.get("data")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise WireError(BAD_INPUT, f"{what}: dtype {dtype!r} is not one of "
                        f"{', '.join(sorted(DTYPES))}")
    if (not isinstance(shape, list) or len(shape) > MAX_RANK
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                       for d in shape)):
        raise WireError(BAD_INPUT, f"{what}: shape must be a list of at most {MAX_RANK} "
                        f"non-negative integers, got {shape!r}")
    if not isinstance(data, bytes):
        raise WireError(BAD_INPUT, f"{what}: data must be bytes (msgpack bin)")
    wire_dtype = np.dtype(dtype).newbyteorder("<")
    expected = math.prod(shape) * wire_dtype.itemsize  # exact: Python integers
    if len(data) != expected:
        raise WireError(BAD_INPUT, f"{what}: shape {shape} of {dtype} needs {expected} bytes "
                        f"of data, got {len(data)}")
    array = np.frombuffer(data, dtype=wire_dtype).reshape(shape)
    return array.astype(np.dtype(dtype), copy=False)


def match_inputs(specs: Sequence[TensorSpec], inputs: Any) -> list[NDArray[Any]]:
    """The request's tensors in the model's input order, each checked against its spec.

    `inputs` is a map keyed by input name or index, or a list in the model's order.
    The dtype and shape must be the model's exactly (nothing is converted); float
    inputs must be finite. Any mismatch is a WireError (BAD_INPUT) naming the input.
    """
    if isinstance(inputs, list):
        keyed: dict[Any, Any] = dict(enumerate(inputs))
    elif isinstance(inputs, dict):
        keyed = inputs
    else:
        raise WireError(BAD_INPUT, "inputs must be a map (input name or index -> tensor) "
                        "or a list of tensors")
    by_name = {spec.name: i for i, spec in enumerate(specs)}
    given: dict[int, Any] = {}
    for key, value in keyed.items():
        if isinstance(key, int) and not isinstance(key, bool):
            if not 0 <= key < len(specs):
                raise WireError(BAD_INPUT, f"input index {key} out of range: the model has "
                                f"{len(specs)} input(s)")
            index = key
        elif isinstance(key, str) and key in by_name:
            index = by_name[key]
        else:
            raise WireError(BAD_INPUT, f"unknown input {key!r}; the model's inputs are "
                            f"{[s.name for s in specs]}")
        if index in given:
            raise WireError(BAD_INPUT, f"input {specs[index].name!r} given twice")
        given[index] = value
    arrays = []
    for index, spec in enumerate(specs):
        if index not in given:
            raise WireError(BAD_INPUT, f"missing input {spec.name!r} (index {index}): "
                            f"{spec.dtype} {list(spec.shape)}")
        what = f"input {spec.name!r}"
        array = decode_tensor(given[index], what)
        if array.dtype != spec.numpy_dtype:
            raise WireError(BAD_INPUT, f"{what} expects dtype {spec.dtype}, got "
                            f"{array.dtype.name} (values are not converted)")
        if tuple(array.shape) != spec.shape:
            raise WireError(BAD_INPUT, f"{what} expects shape {list(spec.shape)}, got "
                            f"{list(array.shape)}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise WireError(BAD_INPUT, f"{what} holds NaN or infinite values")
        arrays.append(array)
    return arrays


def output_names(specs: Sequence[TensorSpec]) -> list[str]:
    """The keys of a reply's `outputs`: each output's name, its index where names repeat."""
    names: list[str] = []
    for index, spec in enumerate(specs):
        names.append(spec.name if spec.name and spec.name not in names else str(index))
    return names


def describe_specs(specs: Sequence[TensorSpec]) -> list[dict[str, Any]]:
    """The `info` reply's description of a model's inputs or outputs."""
    return [
        {"index": i, "name": s.name, "dtype": s.dtype, "shape": list(s.shape),
         "quantization": {"scale": s.quantization[0], "zero_point": s.quantization[1]}}
        for i, s in enumerate(specs)
    ]
