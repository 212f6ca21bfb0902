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
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

from ledger.errors import EncodingError

# Decoded documents larger than this are refused before parsing; nothing in the
# protocol comes close (model blobs never pass through this codec).
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 32




class _Packers(threading.local):
    """One reusable packer per thread (`msgpack.packb` builds a new one per call, which
    costs as much as packing a small map). Per thread, because a packer's buffer is
    only cleared when a call returns: `pack_map_pairs` even leaves it dirty when it
    raises, and another thread must never see that."""

    def __init__(self) -> None:
        self.packer = msgpack.Packer(use_bin_type=True, use_single_float=False)


_PACKERS = _Packers()


# Types msgpack-python already writes canonically, as they are (exact types only:
# subclasses take the general path below).
_PLAIN: frozenset[type] = frozenset((str, int, bytes, bool, type(None)))


def _normalise(value: Any, depth: int) -> Any:
    # Hot path (every ledger append): exact built-in types dispatch on `type()` first.
    kind = type(value)
    if kind in _PLAIN:
        if depth > MAX_DEPTH:
            raise EncodingError(f"value nests deeper than {MAX_DEPTH} levels")
        return value
    if kind is dict:
        return _normalise_dict(value, depth)
    if kind is list or kind is tuple:
        if depth > MAX_DEPTH or (value and depth == MAX_DEPTH):
            raise EncodingError(f"value nests deeper than {MAX_DEPTH} levels")
        plain = _PLAIN
        return [v if type(v) in plain else _normalise(v, depth + 1) for v in value]
    return _normalise_other(value, depth)


def _normalise_dict(value: dict[Any, Any], depth: int) -> Any:
    if depth > MAX_DEPTH or (value and depth == MAX_DEPTH):
        raise EncodingError(f"value nests deeper than {MAX_DEPTH} levels")
    keys = list(value)
    for key in keys:
        if type(key) is not str:
            return _normalise_other(value, depth)  # str subclasses, or an error
    # Code point order is UTF-8 byte order (the order the spec asks for); a key that
    # is not valid UTF-8 (a lone surrogate) is refused by the packer.
    ordered = sorted(keys)
    plain = _PLAIN
    if ordered == keys:
        for item in value.values():
            if type(item) not in plain:
                break
        else:
            return value  # already canonical: pack it as it is
    out = {}
    for key in ordered:
        item = value[key]
        out[key] = item if type(item) in plain else _normalise(item, depth + 1)
    return out


def _normalise_other(value: Any, depth: int) -> Any:
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
        packed: bytes = _PACKERS.packer.pack(normalised)
        return packed
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodingError(f"cannot encode value: {exc}") from exc


def canonical_encode_record(fields: tuple[Any, ...], payload: dict[str, Any]) -> bytes:
    """`canonical_encode([*fields, payload])`, the same bytes, faster for the common
    case of an entry body: a few plain fields and a flat map of plain values, packed
    from its sorted items without building a sorted copy of the map."""
    plain = _PLAIN
    simple = len(fields) < 15 and type(payload) is dict
    for field in fields:
        if type(field) not in plain:
            simple = False
    if simple:
        try:
            items = sorted(payload.items())  # str keys are unique: values never compared
        except TypeError:  # keys of several types: the general path says what is wrong
            items = None
        if items is not None:
            for key, item in items:
                if type(key) is not str or type(item) not in plain:
                    break
            else:
                packer = _PACKERS.packer
                try:
                    # An array is its header and then its elements: replace the header of
                    # `fields` (fixarray, < 16) with the one that counts the map too.
                    head: bytes = packer.pack(fields)
                    tail: bytes = packer.pack_map_pairs(items)
                except (TypeError, ValueError, OverflowError) as exc:
                    packer.reset()  # pack_map_pairs leaves its buffer dirty when it raises
                    raise EncodingError(f"cannot encode value: {exc}") from exc
                return bytes((0x90 | (len(fields) + 1),)) + head[1:] + tail
    return canonical_encode([*fields, payload])


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
