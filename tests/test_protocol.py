"""The device wire protocol (edge_agent/protocol/documents.py) and canonical msgpack, no server.

Round trips of every message type, strict refusal of every malformed input with a
`ProtocolError` that names the problem, and property tests: arbitrary bytes never
raise anything but `ProtocolError`, and canonical encode/decode is an exact inverse.
"""

from __future__ import annotations

import contextlib
import math
import struct
from dataclasses import replace
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from edge_agent import protocol as proto
from edge_agent.protocol import (
    MAX_ENVELOPE_BYTES,
    Assignment,
    ProtocolError,
    ReleaseManifest,
    Signature,
    SignedEnvelope,
    StatusReport,
    TelemetryWindow,
    decode_map,
    decode_report,
    encode_report,
    read_report,
)
from ledger.encoding import canonical_decode, canonical_encode
from ledger.errors import EncodingError
from ledger.signing import SigningKey

NOW = 1_700_000_000_000_000_000
PROPERTY = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def manifest() -> ReleaseManifest:
    return ReleaseManifest(
        name="kws", version="3", digest="ab" * 32, size=656, format="tflite",
        inputs=[{"name": "x", "shape": [1, 8], "dtype": "float32"}],
        outputs=[{"name": "y", "shape": [1, 4], "dtype": "float32"}],
        created=NOW, expires=NOW + 10**15,
    )


def assignment() -> Assignment:
    return Assignment(
        device="dev-1", model="kws", version="3", digest="ab" * 32, manifest_hash="cd" * 32,
        counter=7, rollout="dep-4", issued_at=NOW, expires=NOW + 10**15,
    )


def status() -> StatusReport:
    return StatusReport(
        device="dev-1", boot="b0", seq=3, ts=NOW, event=proto.STATUS_APPLIED, model="kws",
        version="3", digest="ab" * 32, counter=7, reason="", probe_output=[0.25, -1.5, 2.0],
    )


def telemetry() -> TelemetryWindow:
    return TelemetryWindow(
        device="dev-1", boot="b0", seq=9, model="kws", version="3", digest="ab" * 32,
        start=NOW, end=NOW + 5 * 10**9, count=100, errors=2, latency_ms_p50=1.5,
        latency_ms_p95=3.25, latency_ms_max=9.0,
    )


def report_map(**changes: Any) -> dict[str, Any]:
    doc = status().to_map()
    doc.update(changes)
    return doc


def telemetry_map(**changes: Any) -> dict[str, Any]:
    doc = telemetry().to_map()
    doc.update(changes)
    return doc


def refused(data: bytes, *words: str) -> str:
    """decode_report must refuse `data` with a message containing every one of `words`."""
    with pytest.raises(ProtocolError) as info:
        decode_report(data)
    message = str(info.value)
    for word in words:
        assert word in message, message
    return message


# ---------------------------------------------------------------- round trips


def test_release_manifest_round_trips_through_its_map_and_bytes() -> None:
    m = manifest()
    again = ReleaseManifest.from_map(canonical_decode(canonical_encode(m.to_map())))
    assert again == m
    assert m.to_map()["type"] == "release-manifest"


def test_assignment_round_trips_through_its_map_and_bytes() -> None:
    a = assignment()
    assert Assignment.from_map(canonical_decode(canonical_encode(a.to_map()))) == a


def test_status_report_round_trips_through_encode_and_decode_report() -> None:
    s = status()
    data = encode_report(s)
    assert decode_report(data) == s
    assert canonical_encode(canonical_decode(data)) == data


def test_telemetry_window_round_trips_through_encode_and_decode_report() -> None:
    w = telemetry()
    assert decode_report(encode_report(w)) == w


def test_telemetry_accepts_integer_latencies() -> None:
    data = canonical_encode(telemetry_map(latency_ms_p50=1, latency_ms_p95=2, latency_ms_max=3))
    window = decode_report(data)
    assert isinstance(window, TelemetryWindow)
    assert (window.latency_ms_p50, window.latency_ms_max) == (1, 3)


def test_signed_envelope_round_trips_and_its_signature_verifies() -> None:
    key = SigningKey.generate()
    env = SignedEnvelope.sign(manifest().to_map(), proto.DOMAIN_MANIFEST, [key])
    again = SignedEnvelope.decode(env.encode())
    assert again == env
    assert again.signatures == (Signature(key.keyid, again.signatures[0].sig),)
    assert key.public.verify(proto.DOMAIN_MANIFEST, again.signed, again.signatures[0].sig)
    assert ReleaseManifest.from_map(again.document("manifest")) == manifest()


def test_signed_envelope_with_no_signatures_round_trips() -> None:
    env = SignedEnvelope(canonical_encode({"a": 1}), ())
    assert SignedEnvelope.decode(env.encode()) == env


# ---------------------------------------------------------------- refusals: bytes


@pytest.mark.parametrize(
    ("data", "word"),
    [
        (b"\xc1garbage", "malformed msgpack"),
        (b"", "empty"),
        (b"\xff\xfe\xfd", "trailing bytes"),
        (b"\x91" * 40 + b"\xc0", "deeper than 32"),
    ],
    ids=["garbage", "empty", "trailing", "too-deep"],
)
def test_report_decoder_refuses_bytes_that_are_not_a_document(data: bytes, word: str) -> None:
    refused(data, "report", word)


@pytest.mark.parametrize("cut", [1, 5, 20, -1])
def test_report_decoder_refuses_a_truncated_encoding(cut: int) -> None:
    data = encode_report(status())
    refused(data[:cut], "report", "malformed msgpack")


@pytest.mark.parametrize("cut", [1, 10, -1])
def test_envelope_decoder_refuses_a_truncated_encoding(cut: int) -> None:
    data = SignedEnvelope.sign({"a": 1}, "x", [SigningKey.generate()]).encode()
    with pytest.raises(ProtocolError, match="signed envelope: malformed msgpack"):
        SignedEnvelope.decode(data[:cut])


def test_report_decoder_refuses_a_list_instead_of_a_map() -> None:
    refused(canonical_encode(list(report_map().items())), "expected a map", "got list")


def test_envelope_decoder_refuses_a_list_instead_of_a_map() -> None:
    with pytest.raises(ProtocolError, match="expected a map, got list"):
        SignedEnvelope.decode(canonical_encode([b"signed", []]))


def test_oversized_report_is_refused_before_parsing() -> None:
    data = canonical_encode(report_map(reason="x" * MAX_ENVELOPE_BYTES))
    assert len(data) > MAX_ENVELOPE_BYTES
    refused(data, "over the", str(MAX_ENVELOPE_BYTES))


def test_oversized_envelope_is_refused() -> None:
    env = SignedEnvelope(b"\x00" * (MAX_ENVELOPE_BYTES + 1), ())
    with pytest.raises(ProtocolError, match="limit"):
        SignedEnvelope.decode(env.encode())


def test_a_map_of_exactly_the_limit_is_read() -> None:
    base = len(canonical_encode(report_map(reason="")))
    # str32 header for long text: 5 bytes instead of 1 for the empty fixstr.
    data = canonical_encode(report_map(reason="x" * (MAX_ENVELOPE_BYTES - base - 4)))
    assert len(data) == MAX_ENVELOPE_BYTES
    assert decode_map(data, "report")["type"] == "status"
    # As a report it breaks the bound on reasons (and on a status report's bytes).
    with pytest.raises(ProtocolError, match="reason is longer") as info:
        decode_report(data)
    assert info.value.reason == "bounds"
    with pytest.raises(ProtocolError, match="65536-byte limit") as info:
        read_report(data)
    assert info.value.reason == "oversized"


# ---------------------------------------------------------------- refusals: non-canonical


def test_unsorted_map_keys_are_refused() -> None:
    doc = report_map()
    unsorted = dict(sorted(doc.items(), reverse=True))
    data = msgpack.packb(unsorted, use_bin_type=True)
    assert canonical_decode(canonical_encode(doc)) == canonical_decode(
        canonical_encode(unsorted)
    )
    refused(data, "sorted")


def test_non_shortest_integer_is_refused() -> None:
    good = canonical_encode({"n": 1})
    assert good == b"\x81\xa1n\x01"
    with pytest.raises(EncodingError, match="canonical"):
        canonical_decode(b"\x81\xa1n\xcd\x00\x01")  # uint16 for 1
    # The same inside a report: seq 3 written as uint32.
    bad = canonical_encode(report_map(seq=3))
    assert b"\xa3seq\x03" in bad
    bad = bad.replace(b"\xa3seq\x03", b"\xa3seq\xce\x00\x00\x00\x03")
    refused(bad, "canonical")


def test_float32_and_long_string_headers_are_refused() -> None:
    with pytest.raises(EncodingError, match="canonical"):
        canonical_decode(b"\xca" + struct.pack(">f", 1.5))
    with pytest.raises(EncodingError, match="canonical"):
        canonical_decode(b"\xd9\x01a")  # str8 where a fixstr fits


def test_duplicate_map_keys_are_refused() -> None:
    with pytest.raises(EncodingError):
        canonical_decode(b"\x82\xa1a\x01\xa1a\x02")


def test_nan_and_infinities_are_refused_both_ways() -> None:
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(EncodingError, match="NaN"):
            canonical_encode({"x": [bad]})
        with pytest.raises(EncodingError):
            canonical_decode(b"\xcb" + struct.pack(">d", bad))
    refused(
        msgpack.packb(dict(sorted(telemetry_map(latency_ms_p95=math.nan).items()))),
        "NaN",
    )


# ---------------------------------------------------------------- refusals: fields


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"seq": "3"}, ("'seq'", "must be int", "got str")),
        ({"seq": True}, ("'seq'", "must be int", "got bool")),
        ({"counter": False}, ("'counter'", "got bool")),
        ({"seq": 3.0}, ("'seq'", "got float")),
        ({"device": 7}, ("'device'", "must be str")),
        ({"digest": b"\xab" * 32}, ("'digest'", "got bytes")),
        ({"probe_output": "0.1"}, ("'probe_output'", "must be list")),
        ({"probe_output": [0.1, "x"]}, ("probe_output", "numbers")),
        ({"event": "exploded"}, ("unknown event", "exploded")),
    ],
    ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(v),
)
def test_status_report_with_a_wrong_field_type_is_refused(
    changes: dict[str, Any], words: tuple[str, ...]
) -> None:
    refused(canonical_encode(report_map(**changes)), *words)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"count": True}, ("'count'", "got bool")),
        ({"latency_ms_p95": True}, ("'latency_ms_p95'", "float or int", "got bool")),
        ({"latency_ms_p95": "3"}, ("'latency_ms_p95'", "got str")),
        ({"start": None}, ("'start'", "got NoneType")),
    ],
    ids=["count-bool", "latency-bool", "latency-str", "start-none"],
)
def test_telemetry_with_a_wrong_field_type_is_refused(
    changes: dict[str, Any], words: tuple[str, ...]
) -> None:
    refused(canonical_encode(telemetry_map(**changes)), *words)


@pytest.mark.parametrize("missing", sorted(StatusReport._FIELDS))
def test_status_report_missing_a_field_is_refused(missing: str) -> None:
    doc = report_map()
    del doc[missing]
    refused(canonical_encode(doc), "status", "missing field", repr(missing))


@pytest.mark.parametrize("missing", ["count", "errors", "end", "latency_ms_max"])
def test_telemetry_missing_a_field_is_refused(missing: str) -> None:
    doc = telemetry_map()
    del doc[missing]
    refused(canonical_encode(doc), "telemetry", "missing field", repr(missing))


@pytest.mark.parametrize("kind", ["heartbeat", "", None, 1, "Status"])
def test_unknown_report_type_is_refused(kind: Any) -> None:
    refused(canonical_encode(report_map(type=kind)), "unknown type", repr(kind))


def test_report_without_a_type_is_refused() -> None:
    doc = report_map()
    del doc["type"]
    refused(canonical_encode(doc), "unknown type None")


@pytest.mark.parametrize(
    ("count", "errors", "words"),
    [(5, 6, "errors <= count"), (0, 1, "errors <= count"), (-1, 0, "'count' must be between"),
     (3, -1, "'errors' must be between"), (2**63, 0, "'count' must be between")],
    ids=["over", "zero", "neg", "neg-e", "int64"],
)
def test_telemetry_with_impossible_counts_is_refused(count: int, errors: int, words: str) -> None:
    refused(canonical_encode(telemetry_map(count=count, errors=errors)), words)


def test_telemetry_with_errors_equal_to_count_is_read() -> None:
    window = decode_report(canonical_encode(telemetry_map(count=4, errors=4)))
    assert isinstance(window, TelemetryWindow) and window.errors == 4


@pytest.mark.parametrize(
    "device",
    ["dev.1", "dev-*", "dev>", "*", ">", "dev 1", " dev", "", "-dev", "x" * 65, "dév",
     "dev/1", "dev\t1"],
)
def test_invalid_device_ids_are_refused(device: str) -> None:
    with pytest.raises(ProtocolError, match="invalid device id"):
        proto.check_device_id(device)
    refused(canonical_encode(report_map(device=device)), "invalid device id")
    refused(canonical_encode(telemetry_map(device=device)), "invalid device id")
    with pytest.raises(ProtocolError):
        proto.report_subject(device, "status")


@pytest.mark.parametrize("device", ["d", "dev-1", "DEV_0042", "x" * 64, "0"])
def test_valid_device_ids_are_accepted(device: str) -> None:
    assert proto.check_device_id(device) == device
    assert proto.report_subject(device, "status") == f"fleet.report.{device}.status"


@pytest.mark.parametrize("device", ["dev-1\n"])
def test_device_id_with_a_trailing_newline_is_refused(device: str) -> None:
    with pytest.raises(ProtocolError, match="invalid device id"):
        proto.check_device_id(device)


def test_model_name_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(ProtocolError, match="invalid model name"):
        proto.check_model_ref("kws\n", "1")


@pytest.mark.parametrize(
    ("name", "version", "word"),
    [("KWS", "1", "model name"), ("kws.x", "1", "model name"), ("kws", "1.2", "model version"),
     ("kws", "*", "model version"), ("", "1", "model name"), ("kws", "", "model version")],
)
def test_invalid_model_refs_are_refused(name: str, version: str, word: str) -> None:
    with pytest.raises(ProtocolError, match=f"invalid {word}"):
        proto.manifest_key(name, version)


def test_manifest_key_joins_name_and_version() -> None:
    assert proto.manifest_key("kws", "3") == "kws.3"


# ---------------------------------------------------------------- documents and envelopes


def test_document_of_the_wrong_type_is_refused() -> None:
    with pytest.raises(ProtocolError, match="expected a 'assignment' document"):
        Assignment.from_map(manifest().to_map())
    with pytest.raises(ProtocolError, match="expected a 'release-manifest' document"):
        ReleaseManifest.from_map(assignment().to_map())


def test_manifest_with_a_bool_size_is_refused() -> None:
    doc = manifest().to_map() | {"size": True}
    with pytest.raises(ProtocolError, match="'size' must be int, got bool"):
        ReleaseManifest.from_map(doc)


def test_assignment_missing_its_counter_is_refused() -> None:
    doc = assignment().to_map()
    del doc["counter"]
    with pytest.raises(ProtocolError, match="assignment: missing field 'counter'"):
        Assignment.from_map(doc)


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        ({"signatures": []}, "missing field 'signed'"),
        ({"signed": b"x"}, "missing field 'signatures'"),
        ({"signatures": [], "signed": "text"}, "'signed' must be bytes"),
        ({"signatures": {}, "signed": b"x"}, "'signatures' must be list"),
        ({"signatures": [b"sig"], "signed": b"x"}, "each signature must be a map"),
        ({"signatures": [{"keyid": "k"}], "signed": b"x"}, "missing field 'sig'"),
        ({"signatures": [{"keyid": 1, "sig": b"s"}], "signed": b"x"}, "'keyid' must be str"),
        ({"signatures": [{"keyid": "k", "sig": "s"}], "signed": b"x"}, "'sig' must be bytes"),
        ({"signatures": [{"keyid": "k", "sig": b"s"}] * 17, "signed": b"x"}, "more than 16"),
    ],
    ids=["no-signed", "no-signatures", "signed-text", "sigs-map", "sig-bytes", "no-sig",
         "keyid-int", "sig-text", "too-many"],
)
def test_malformed_envelope_is_refused(doc: dict[str, Any], words: str) -> None:
    with pytest.raises(ProtocolError) as info:
        SignedEnvelope.decode(canonical_encode(doc))
    assert words in str(info.value)
    assert str(info.value).startswith("signed envelope")


def test_envelope_document_that_is_not_canonical_is_refused() -> None:
    env = SignedEnvelope(msgpack.packb({"b": 1, "a": 2}), ())
    with pytest.raises(ProtocolError, match="sorted"):
        env.document("manifest")


def test_encoded_envelope_is_canonical() -> None:
    env = SignedEnvelope.sign(assignment().to_map(), proto.DOMAIN_ASSIGNMENT,
                              [SigningKey.generate(), SigningKey.generate()])
    data = env.encode()
    assert canonical_encode(canonical_decode(data)) == data
    assert replace(env, signatures=env.signatures[::-1]).encode() != data


# ---------------------------------------------------------------- properties


@PROPERTY
@given(st.binary(max_size=2048))
def test_decode_report_on_arbitrary_bytes_only_raises_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):  # anything else fails the test
        decode_report(data)


@PROPERTY
@given(st.binary(max_size=2048))
def test_envelope_decode_on_arbitrary_bytes_only_raises_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):  # anything else fails the test
        SignedEnvelope.decode(data)


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
    | st.binary(max_size=40)
)
_texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
json_like = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(_texts, children,
                                                                       max_size=6),
    max_leaves=25,
)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down (True is not 1, 1.0 is not 1)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return struct.pack(">d", a) == struct.pack(">d", b)
    return bool(a == b)


@PROPERTY
@given(json_like)
def test_canonical_encode_and_decode_round_trip(value: Any) -> None:
    assume(_depth(value) <= 32)
    data = canonical_encode(value)
    decoded = canonical_decode(data)
    assert decoded == value
    assert _same(decoded, _sorted(value))
    assert canonical_encode(decoded) == data


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value, key=lambda k: k.encode())}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


@PROPERTY
@given(st.dictionaries(_texts, st.integers(-5, 5), min_size=2, max_size=8))
def test_map_key_order_does_not_change_the_bytes(value: dict[str, int]) -> None:
    reordered = dict(reversed(list(value.items())))
    assert canonical_encode(value) == canonical_encode(reordered)


@settings(max_examples=60, deadline=None)
@given(json_like)
def test_nan_anywhere_is_refused(value: Any) -> None:
    assume(_depth(value) <= 30)
    with pytest.raises(EncodingError, match="NaN"):
        canonical_encode({"v": value, "x": [math.nan]})


_field_values = (
    st.none() | st.booleans() | st.integers(-(2**64) + 1, 2**64 - 1) | st.floats()
    | st.text(max_size=8) | st.binary(max_size=8) | st.lists(st.integers(), max_size=3)
    | st.sampled_from(["dev-1", "applied", "failed", "started", "dev.1"])
)


@PROPERTY
@given(
    st.sampled_from(["status", "telemetry"]),
    st.dictionaries(
        st.sampled_from(sorted(set(StatusReport._FIELDS) | set(TelemetryWindow._FIELDS))),
        _field_values,
    ),
)
def test_report_maps_with_arbitrary_fields_decode_or_raise_protocol_error(
    kind: str, changes: dict[str, Any]
) -> None:
    base = report_map() if kind == "status" else telemetry_map()
    doc = base | changes
    try:
        data = canonical_encode(doc)
    except EncodingError:
        return  # NaN, infinity: no canonical bytes to send
    try:
        report = decode_report(data)
    except ProtocolError:
        return
    assert report.to_map() | {"type": kind} == {k: doc[k] for k in report.to_map()}


def test_ledger_feed_subjects_agree_with_the_ledger():
    # The ledger cannot import edge_agent, so the names are written twice; keep them equal.
    from edge_agent.protocol import names
    from ledger.net.remote import CHECKPOINT_SUBJECT, ENTRY_SUBJECT

    assert names.LEDGER_ENTRY_SUBJECT == ENTRY_SUBJECT
    assert names.LEDGER_CHECKPOINT_SUBJECT == CHECKPOINT_SUBJECT


# ---------------------------------------------------------------- bounds (PROTOCOL.md "Bounds")


def window_doc(**changes: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "type": "telemetry", "device": "dev-1", "boot": "b0", "seq": 1, "model": "kws",
        "version": "1", "digest": "ab" * 32, "start": NOW, "end": NOW + 2 * 10**9,
        "count": 10, "errors": 1, "latency_ms_p50": 0.1, "latency_ms_p95": 0.2,
        "latency_ms_max": 0.3, "counter": 1,
        "latency_buckets": [10] + [0] * (proto.LATENCY_BUCKET_COUNT - 1),
        "output_hist": [[3, 6], [9]],
    }
    doc.update(changes)
    return doc


def test_a_window_within_every_bound_is_read() -> None:
    most = 2 * proto.MAX_INFERENCES_PER_SECOND  # a 2 s window
    window = decode_report(canonical_encode(window_doc(
        count=most, latency_buckets=[most] + [0] * (proto.LATENCY_BUCKET_COUNT - 1))))
    assert isinstance(window, TelemetryWindow) and window.count == most
    assert isinstance(decode_report(canonical_encode(window_doc(latency_buckets=[]))),
                      TelemetryWindow)  # older senders: no histogram


@pytest.mark.parametrize(("changes", "words"), [
    ({"count": 2 * proto.MAX_INFERENCES_PER_SECOND + 1}, "per second"),
    ({"count": 2**62 + 1}, "per second"),
    ({"end": NOW + proto.MAX_WINDOW_NS + 1}, "s long"),
    ({"errors": 11}, "errors <= count"),
    ({"latency_buckets": [10] + [0] * 15}, "not 15"),
    ({"latency_buckets": [0] * 16 + [10]}, "not 15"),
    ({"latency_buckets": [11] + [0] * 14}, "more than the window"),
    ({"output_hist": [[11, 0]]}, "more than the window"),
    ({"output_hist": [[0] * (proto.MAX_DRIFT_BINS + 1)]}, "bins"),
    ({"output_hist": [[0]] * (proto.MAX_OUTPUTS + 1)}, "outputs"),
    ({"output_hist": [[0] * 200] * 21}, "in all"),
    ({"latency_ms_p95": -1.0}, "finite number >= 0"),
    ({"latency_ms_max": 1e300}, "finite number >= 0"),
    ({"boot": "b" * 129}, "at most 128"),
])
def test_a_window_past_a_bound_is_refused(changes: dict[str, object], words: str) -> None:
    with pytest.raises(ProtocolError, match=words) as info:
        decode_report(canonical_encode(window_doc(**changes)))
    assert info.value.reason == "bounds"


def test_a_status_report_past_a_bound_is_refused() -> None:
    for changes, words in (({"probe_output": [0.5] * (proto.MAX_PROBE_VALUES + 1)}, "probe"),
                           ({"reason": "x" * (proto.MAX_REASON_CHARS + 1)}, "reason")):
        with pytest.raises(ProtocolError, match=words) as info:
            decode_report(canonical_encode(report_map(**changes)))
        assert info.value.reason == "bounds"
    with pytest.raises(ProtocolError, match="byte limit") as info:
        read_report(b"\x00" * (proto.MAX_REPORT_BYTES + 1))
    assert info.value.reason == "oversized"
    with pytest.raises(ProtocolError) as info:
        read_report(b"\xff\x00 not msgpack")
    assert info.value.reason == "malformed"
