"""Entry bodies, chain hashes and strict decoding (pure, no I/O)."""

from __future__ import annotations

from typing import Any

import blake3
import pytest

from ledger.encoding import canonical_encode
from ledger.entry import (
    CHAIN_DOMAIN,
    GENESIS_PREV,
    Entry,
    chain_hash,
    encode_body,
    header_prefix,
    make_entry,
)
from ledger.errors import EntryError, LedgerError

TS = 1_700_000_000_123_456_789


def test_body_is_the_canonical_six_element_array() -> None:
    body = encode_body(3, TS, "model.registered", "hub", "model:kws/3", {"b": 1, "a": b"\x00"})
    assert body == canonical_encode([3, TS, "model.registered", "hub", "model:kws/3",
                                     {"a": b"\x00", "b": 1}])  # fmt: skip
    assert body[0] == 0x96


def test_body_bytes_are_pinned() -> None:
    # A second implementation must reproduce these exact bytes (docs/PROTOCOL.md).
    body = encode_body(0, 1, "a.b", "hub", "s", {"k": True})
    assert body.hex() == "96" "00" "01" "a3612e62" "a3687562" "a173" "81a16bc3"


def test_header_prefix_is_the_start_of_the_body() -> None:
    body = encode_body(70000, TS, "rollout.wave_started", "op-1", "rollout:r-17", {"x": [1, 2]})
    prefix = header_prefix(70000, TS, "rollout.wave_started", "op-1", "rollout:r-17")
    assert body.startswith(prefix)
    assert body[len(prefix):] == canonical_encode({"x": [1, 2]})


def test_chain_hash_is_domain_separated_blake3() -> None:
    body = encode_body(0, TS, "a.b", "hub", "s", {})
    assert chain_hash(GENESIS_PREV, body) == blake3.blake3(CHAIN_DOMAIN + bytes(32) + body).digest()
    assert CHAIN_DOMAIN == b"fleetledger/entry/v1\x00"
    assert len(chain_hash(GENESIS_PREV, body)) == 32


def test_make_entry_chains_from_genesis() -> None:
    first = make_entry(None, TS, "model.registered", "hub", "model:a/1", {"n": 1})
    second = make_entry(first, TS + 1, "model.approved", "op", "model:a/1", {})
    assert (first.seq, first.prev) == (0, GENESIS_PREV)
    assert (second.seq, second.prev) == (1, first.hash)
    assert first.hash == chain_hash(first.prev, first.body)
    assert second.hash_matches()


def test_make_entry_keeps_its_own_copy_of_the_payload() -> None:
    payload: dict[str, Any] = {"tags": ("a", "b"), "raw": bytearray(b"xy")}
    entry = make_entry(None, TS, "a.b", "hub", "s", payload)
    payload["tags"] = "changed"
    assert entry.payload == {"tags": ["a", "b"], "raw": b"xy"}


def test_from_body_round_trip() -> None:
    entry = make_entry(None, TS, "device.status", "dev-1", "device:dev-1", {"v": 1.5, "k": None})
    back = Entry.from_body(entry.body, entry.prev, entry.hash)
    assert back == entry
    assert back.body == entry.body


def test_entry_is_hashable_despite_its_dict_payload() -> None:
    entry = make_entry(None, TS, "a.b", "hub", "s", {"k": 1})
    assert hash(entry) == hash(Entry.from_body(entry.body, entry.prev, entry.hash))


BAD_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"seq": -1}, "seq"),
    ({"seq": True}, "seq"),
    ({"seq": 2**63}, "seq"),
    ({"ts": 1.5}, "ts"),
    ({"ts": -5}, "ts"),
    ({"kind": "registered"}, "kind"),
    ({"kind": "Model.registered"}, "kind"),
    ({"kind": "model.registered\n"}, "kind"),
    ({"kind": "model..x"}, "kind"),
    ({"actor": ""}, "actor"),
    ({"actor": "x" * 257}, "actor"),
    ({"subject": 5}, "subject"),
    ({"payload": [1, 2]}, "payload"),
    ({"payload": {"x": float("nan")}}, "payload"),
    ({"payload": {1: "int key"}}, "payload"),
]


@pytest.mark.parametrize(("change", "named"), BAD_FIELDS)
def test_invalid_fields_are_refused_with_the_field_named(
    change: dict[str, Any], named: str
) -> None:
    fields: dict[str, Any] = {
        "seq": 1, "ts": TS, "kind": "model.registered", "actor": "hub", "subject": "s",
        "payload": {},
    }  # fmt: skip
    fields.update(change)
    with pytest.raises(EntryError, match=named) as info:
        encode_body(**fields)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, LedgerError)


def test_actor_of_256_chars_is_allowed() -> None:
    encode_body(0, 0, "a.b", "x" * 256, "s", {})


def test_oversized_body_is_refused_before_it_could_be_stored() -> None:
    with pytest.raises(EntryError, match="limit"):
        encode_body(0, 0, "a.b", "hub", "s", {"blob": bytes(4 * 1024 * 1024)})


def test_entry_refuses_short_digests() -> None:
    with pytest.raises(EntryError, match="prev"):
        Entry(0, 0, "a.b", "hub", "s", {}, b"\x00" * 31, bytes(32))


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",
        canonical_encode([0, 0, "a.b", "hub", "s"]),
        canonical_encode({"seq": 0}),
        canonical_encode([0, 0, "a.b", "hub", "s", {}]) + b"\x00",
        canonical_encode([0, 0, "BAD", "hub", "s", {}]),
        canonical_encode([0, 0, "a.b", "hub", "s", []]),
        # seq 0 written as uint8: valid msgpack, not canonical.
        b"\x96\xcc\x00" + canonical_encode([0, "a.b", "hub", "s", {}])[1:],
    ],
)
def test_from_body_is_strict(body: bytes) -> None:
    with pytest.raises(EntryError):
        Entry.from_body(body, GENESIS_PREV, bytes(32))


def test_from_body_does_not_check_the_hash() -> None:
    entry = make_entry(None, TS, "a.b", "hub", "s", {})
    wrong = Entry.from_body(entry.body, entry.prev, b"\x01" * 32)
    assert not wrong.hash_matches()


def test_protocol_document_vectors() -> None:
    # The same vectors are printed in docs/PROTOCOL.md ("Test vectors").
    first = make_entry(None, 1_700_000_000_000_000_000, "model.registered", "hub", "model:kws/3",
                       {"name": "kws", "size": 1024, "digest": b"\xaa" * 4, "ratio": 0.5,
                        "tags": ["a", None, True], "Z": -1})  # fmt: skip
    second = make_entry(first, 1_700_000_000_000_000_001, "model.approved", "op-1",
                        "model:kws/3", {})  # fmt: skip
    assert first.body.hex() == (
        "9600cf17979cfe362a0000b06d6f64656c2e72656769737465726564a3687562ab6d6f64656c"
        "3a6b77732f3386a15affa6646967657374c404aaaaaaaaa46e616d65a36b7773a5726174696f"
        "cb3fe0000000000000a473697a65cd0400a47461677393a161c0c3"
    )
    assert first.hash.hex() == "ff6d3b47dc0936a85e5b35595baeffa7332d2f662525ab82461ee269a5f85430"
    assert second.body.hex() == (
        "9601cf17979cfe362a0001ae6d6f64656c2e617070726f766564a46f702d31ab6d6f64656c3a"
        "6b77732f3380"
    )
    assert second.hash.hex() == "202fa169dc4ffa625aff562417a1690cec2073859755b132bc2161e01780ee31"
