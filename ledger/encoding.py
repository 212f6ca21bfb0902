"""Canonical msgpack encoding: one exact byte string for one value.

Everything that is hashed or signed in this project goes through `canonical_encode`,
so that two implementations (or two runs) produce the same bytes. The rules are
specified in docs/PROTOCOL.md ("Canonical encoding"); in short:

* integers in the shortest msgpack form (msgpack-python already does this);
* floats always as float64, NaN and infinities refused;
* text as UTF-8 `str`, binary as `bin`;
* maps with `str` keys only, sorted by the UTF-8 bytes of the key, no duplicates;
* lists/tuples as arrays; no extension types, no timestamps.

`canonical_decode` is the strict inverse: it refuses anything that
`canonical_encode` would not have produced (so a signature can never cover two
different readings of the same bytes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

# Decoded documents larger than this are refused before parsing; nothing in the
# protocol comes close (model blobs never pass through this codec).
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 32


class EncodingError(ValueError):
    """The value cannot be encoded canonically, or the bytes are not canonical."""


def _normalise(value: Any, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise EncodingError(f"value nests deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool | int | str | bytes):
        return value
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise EncodingError("NaN and infinite floats have no canonical encoding")
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, Mapping):
        items: list[tuple[bytes, str, Any]] = []
        for key, item in value.items():
            if not isinstance(key, str):
                raise EncodingError(f"map keys must be text, got {type(key).__name__}")
            items.append((key.encode("utf-8"), key, _normalise(item, depth + 1)))
        items.sort(key=lambda kv: kv[0])
        return dict((k, v) for _, k, v in items)
    if isinstance(value, Sequence):
        return [_normalise(v, depth + 1) for v in value]
    raise EncodingError(f"cannot encode values of type {type(value).__name__}")


def canonical_encode(value: Any) -> bytes:
    """Return the canonical msgpack bytes of `value`."""
    normalised = _normalise(value, 0)
    try:
        packed: bytes = msgpack.packb(normalised, use_bin_type=True, use_single_float=False)
        return packed
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodingError(f"cannot encode value: {exc}") from exc


def _check_maps(value: Any, depth: int) -> None:
    """Reject decoded data whose maps were not written in canonical key order."""
    if depth > MAX_DEPTH:
        raise EncodingError(f"document nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        keys = list(value.keys())
        for key in keys:
            if not isinstance(key, str):
                raise EncodingError("map keys must be text")
        raw = [k.encode("utf-8") for k in keys]
        if raw != sorted(raw):
            raise EncodingError("map keys are not in canonical (sorted) order")
        for item in value.values():
            _check_maps(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_maps(item, depth + 1)


def canonical_decode(data: bytes, max_bytes: int = MAX_DOCUMENT_BYTES) -> Any:
    """Decode canonical msgpack bytes, refusing anything non-canonical.

    The re-encode check catches every remaining ambiguity (non-shortest integers,
    float32, str8 where fixstr fits, ...) with one comparison.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EncodingError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise EncodingError(f"document is {len(data)} bytes; the limit is {max_bytes}")
    if not data:
        raise EncodingError("document is empty")
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
        )
    except msgpack.ExtraData as exc:
        raise EncodingError("trailing bytes after the document") from exc
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        # Some (e.g. a truncated document) carry no message; say what kind it was.
        detail = str(exc) or {
            "OutOfData": "the document is truncated",
            "FormatError": "not a valid msgpack type byte",
            "StackError": "nested too deeply",
        }.get(type(exc).__name__, type(exc).__name__)
        if "exceeds max_" in detail:  # msgpack caps lengths by the buffer size
            detail = "a container declares more items than the document holds (truncated?)"
        raise EncodingError(f"malformed msgpack: {detail}") from exc
    _check_maps(value, 0)
    if canonical_encode(value) != data:
        raise EncodingError("bytes are valid msgpack but not in canonical form")
    return value
