"""The device wire protocol: message types and their encode/decode, no I/O.

Every message is canonical msgpack (ledger.encoding). Signed documents travel as an
envelope `{"signatures": [{"keyid", "sig"}], "signed": <canonical bytes>}` whose
signatures cover the `signed` bytes under a domain tag per document type, so a
signature for one type can never be replayed as another. Decoders are strict: a
wrong type, a missing field or an oversized message is a `ProtocolError` whose
message says which field is wrong. See docs/PROTOCOL.md ("Wire protocol").
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from edge_agent.errors import ProtocolError
from ledger.encoding import canonical_decode, canonical_encode
from ledger.errors import EncodingError
from ledger.signing import PublicKey, SigningKey

MAX_ENVELOPE_BYTES = 256 * 1024
MAX_SIGNATURES = 16
MAX_INT64 = 2**63 - 1
MAX_TENSORS = 1024  # per side in a manifest's quantization
MAX_RUN_DIMS = 8  # dimensions of an input's run shape in a manifest

# Bounds on what a device sends (docs/PROTOCOL.md "Bounds"), checked at decode.
# A telemetry window counts at most MAX_INFERENCES_PER_SECOND per second of its length
# (a window shorter than a second, or whose clock stepped back, is allowed one second's
# worth), and a window is at most MAX_WINDOW_NS long, so one window's count is at most
# 8.64e9: the hub's sums stay in int64 for ~1e9 windows (and the hub checks the sums).
MAX_INFERENCES_PER_SECOND = 100_000
MAX_WINDOW_NS = 24 * 3600 * 10**9
# A latency histogram has exactly LATENCY_BUCKET_COUNT counts (bins.LATENCY_BUCKETS_MS
# plus the open last bucket), or none (older senders).
LATENCY_BUCKET_COUNT = 15  # bins.py checks it against its bounds (no numpy here)
MAX_OUTPUTS = 64  # output histograms per window
MAX_DRIFT_BINS = 256  # bins per output histogram (the hub also checks the manifest's)
MAX_HIST_CELLS = 4096  # bins over all output histograms of one window
MAX_REPORT_BYTES = 64 * 1024  # any report as published
# A status report's bytes are kept in the ledger for good (the signed report): at most
# this many, with at most MAX_PROBE_VALUES probe outputs and MAX_REASON_CHARS of reason.
MAX_STATUS_REPORT_BYTES = 16 * 1024
MAX_PROBE_VALUES = 1024
MAX_REASON_CHARS = 1024
MAX_TOKEN_CHARS = 128  # boot, model, version, digest

DOMAIN_ROOT = "root"
DOMAIN_MANIFEST = "release-manifest"
DOMAIN_ASSIGNMENT = "assignment"
DOMAIN_DEVICE_REPORT = "device-report"  # a device's own key over its status report
DOMAIN_TIMESTAMP = "timestamp"  # the timestamp role over the freshness document
DOMAIN_ENROLMENT = "device-enrolment"  # a device's new key over its enrolment request
MAX_ENROLMENT_REQUEST_BYTES = 4096

# Device ids become NATS subject tokens and KV keys, so keep them to a safe alphabet.
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MODEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")


def check_device_id(device_id: str) -> str:
    if not isinstance(device_id, str) or not DEVICE_ID_RE.fullmatch(device_id):
        raise ProtocolError(
            f"invalid device id {device_id!r}: use 1-64 letters, digits, '-' or '_'"
        )
    return device_id


def check_model_ref(name: str, version: str) -> None:
    if not MODEL_NAME_RE.fullmatch(name):
        raise ProtocolError(
            f"invalid model name {name!r}: use 1-64 lowercase letters, digits, '-' or '_'"
        )
    if not VERSION_RE.fullmatch(version):
        raise ProtocolError(
            f"invalid model version {version!r}: use 1-32 letters, digits, '-' or '_'"
        )


def _field(doc: Mapping[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    if name not in doc:
        raise ProtocolError(f"{what}: missing field {name!r}")
    value = doc[name]
    # bool is an int in Python; never accept it where a number is meant.
    if isinstance(value, bool) and kind is not bool:
        raise ProtocolError(f"{what}: field {name!r} must be {_kind_name(kind)}, got bool")
    if not isinstance(value, kind):
        raise ProtocolError(
            f"{what}: field {name!r} must be {_kind_name(kind)}, got {type(value).__name__}"
        )
    # Numbers end up in SQL columns and sums: keep them in signed 64-bit range.
    if isinstance(value, int) and not 0 <= value <= MAX_INT64:
        raise ProtocolError(f"{what}: field {name!r} must be between 0 and 2**63-1")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


def decode_map(data: bytes, what: str, max_bytes: int = MAX_ENVELOPE_BYTES) -> dict[str, Any]:
    if len(data) > max_bytes:
        raise ProtocolError(f"{what}: {len(data)} bytes is over the {max_bytes}-byte limit")
    try:
        value = canonical_decode(data, max_bytes=max_bytes)
    except EncodingError as exc:
        raise ProtocolError(f"{what}: {exc}") from exc
    if not isinstance(value, dict):
        raise ProtocolError(f"{what}: expected a map, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------- signed envelopes


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes


@dataclass(frozen=True)
class SignedEnvelope:
    """Canonical bytes of a document plus the signatures over them."""

    signed: bytes
    signatures: tuple[Signature, ...]

    @classmethod
    def sign(
        cls, document: Mapping[str, Any], domain: str, keys: list[SigningKey]
    ) -> SignedEnvelope:
        signed = canonical_encode(document)
        return cls(signed, tuple(Signature(k.keyid, k.sign(domain, signed)) for k in keys))

    def encode(self) -> bytes:
        return canonical_encode(
            {
                "signatures": [{"keyid": s.keyid, "sig": s.sig} for s in self.signatures],
                "signed": self.signed,
            }
        )

    @classmethod
    def decode(cls, data: bytes, what: str = "signed envelope") -> SignedEnvelope:
        doc = decode_map(data, what)
        signed = _field(doc, "signed", bytes, what)
        raw_sigs = _field(doc, "signatures", list, what)
        if len(raw_sigs) > MAX_SIGNATURES:
            raise ProtocolError(f"{what}: more than {MAX_SIGNATURES} signatures")
        sigs = []
        for raw in raw_sigs:
            if not isinstance(raw, dict):
                raise ProtocolError(f"{what}: each signature must be a map")
            sigs.append(
                Signature(_field(raw, "keyid", str, what), _field(raw, "sig", bytes, what))
            )
        return cls(signed, tuple(sigs))

    def document(self, what: str) -> dict[str, Any]:
        return decode_map(self.signed, what)


# ---------------------------------------------------------------- documents

D = TypeVar("D", bound="_Document")
FieldSpec = dict[str, type | tuple[type, ...]]


def _plain(value: Any) -> Any:
    """A copy of lists, tuples and maps (the leaves, numbers and text, are immutable)."""
    if isinstance(value, list | tuple):
        items = [_plain(v) if isinstance(v, list | tuple | dict) else v for v in value]
        return items if isinstance(value, list) else type(value)(items)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class _Document:
    TYPE: ClassVar[str] = ""
    _FIELDS: ClassVar[FieldSpec] = {}
    _OPTIONAL: ClassVar[frozenset[str]] = frozenset()  # may be absent from the map

    def to_map(self) -> dict[str, Any]:
        # What dataclasses.asdict gives, without its deepcopy of every number: a device
        # encodes a telemetry window (two histograms) every few seconds, and asdict was
        # the largest single cost of that (profile of 500 simulated agents).
        out = {f.name: _plain(getattr(self, f.name)) for f in fields(self)}
        out["type"] = self.TYPE
        return out

    @classmethod
    def from_map(cls: type[D], doc: Mapping[str, Any]) -> D:
        what = cls.TYPE
        if doc.get("type") != cls.TYPE:
            raise ProtocolError(f"expected a {cls.TYPE!r} document, got type {doc.get('type')!r}")
        values: dict[str, Any] = {}
        for name, kind in cls._FIELDS.items():
            if name in cls._OPTIONAL and name not in doc:
                continue  # absent: the dataclass default (older senders)
            values[name] = _field(doc, name, kind, what)
        return cls(**values)


@dataclass(frozen=True)
class ReleaseManifest(_Document):
    """What the release key vouches for: this exact blob is model name/version."""

    TYPE: ClassVar[str] = "release-manifest"
    name: str
    version: str
    digest: str  # BLAKE3 hex of the .tflite blob
    size: int
    format: str
    inputs: list[Any]
    outputs: list[Any]
    created: int  # ns
    expires: int  # ns
    # Per output: the reference histogram's bin edges from validation, so devices
    # bin their outputs the same way and the hub can compute drift (PSI).
    drift_bins: list[Any] = field(default_factory=list)
    # Optional (manifests before it have none): each tensor's quantization,
    # {"inputs": [q, ...], "outputs": [q, ...]} in the model's tensor order, q =
    # {"dtype": "int8", "scale": 0.0425, "zero_point": -27}; scale 0.0: not quantized.
    # Devices dequantize an output with it before binning it on drift_bins
    # (edge_agent.protocol.bins: the values binned are real outputs on both sides).
    quantization: dict[str, Any] = field(default_factory=dict)
    # Optional (manifests before it have none): the shape each input runs at, by input
    # name, as registered and validated ({"audio": [1, 1280]}). A dynamic input (a -1
    # dimension in the model) needs it: devices resize it to this shape before they
    # allocate the interpreter; a static input's run shape is its own shape.
    input_shapes: dict[str, Any] = field(default_factory=dict)
    # Optional (absent or empty: every drift_bins entry is of the first output tensor):
    # how many drift_bins entries each output tensor has, in tensor order; the entries
    # are the first N values of tensor 0, then of tensor 1, ... (sums to len(drift_bins)).
    drift_tensors: list[Any] = field(default_factory=list)

    _FIELDS: ClassVar[FieldSpec] = {
        "name": str, "version": str, "digest": str, "size": int, "format": str,
        "inputs": list, "outputs": list, "created": int, "expires": int, "drift_bins": list,
        "quantization": dict, "input_shapes": dict, "drift_tensors": list,
    }
    _OPTIONAL: ClassVar[frozenset[str]] = frozenset(
        {"quantization", "input_shapes", "drift_tensors"})

    @classmethod
    def from_map(cls, doc: Mapping[str, Any]) -> ReleaseManifest:
        manifest = super().from_map(doc)
        for side in ("inputs", "outputs"):
            manifest.tensor_quantization(side)  # ProtocolError unless well formed
        manifest.run_shapes()
        manifest.drift_layout()
        return manifest

    def drift_layout(self) -> list[int]:
        """Values watched per output tensor (`drift_tensors`, checked: non-negative,
        at most MAX_TENSORS, summing to the drift_bins); [len(drift_bins)] (all of the
        first tensor) when the manifest does not say."""
        what = f"{self.TYPE}: drift_tensors"
        if not self.drift_tensors:
            return [len(self.drift_bins)] if self.drift_bins else []
        if (len(self.drift_tensors) > MAX_TENSORS
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                           for n in self.drift_tensors)):
            raise ProtocolError(f"{what} must be at most {MAX_TENSORS} non-negative integers")
        if sum(self.drift_tensors) != len(self.drift_bins):
            raise ProtocolError(f"{what} adds up to {sum(self.drift_tensors)}, but there are "
                                f"{len(self.drift_bins)} drift_bins")
        return [int(n) for n in self.drift_tensors]

    def run_shapes(self) -> dict[str, list[int]]:
        """`input_shapes`, checked: at most MAX_TENSORS inputs, each shape 1 to
        MAX_RUN_DIMS positive integers; empty when the manifest does not say."""
        what = f"{self.TYPE}: input_shapes"
        if len(self.input_shapes) > MAX_TENSORS:
            raise ProtocolError(f"{what} names more than {MAX_TENSORS} inputs")
        out = {}
        for name, shape in self.input_shapes.items():
            if (not isinstance(name, str) or not isinstance(shape, list)
                    or not 1 <= len(shape) <= MAX_RUN_DIMS
                    or not all(isinstance(d, int) and not isinstance(d, bool)
                               and 1 <= d <= 2**31 for d in shape)):
                raise ProtocolError(
                    f"{what} must map input names to shapes of 1 to {MAX_RUN_DIMS} "
                    f"positive integers, got {name!r}: {shape!r}")
            out[name] = [int(d) for d in shape]
        return out

    def tensor_quantization(self, side: str = "outputs") -> list[tuple[str, float, int]]:
        """(dtype, scale, zero_point) of each input or output tensor, in order; empty
        when the manifest does not say (an older hub)."""
        what = f"{self.TYPE}: quantization.{side}"
        raw = self.quantization.get(side, [])
        if not isinstance(raw, list) or len(raw) > MAX_TENSORS:
            raise ProtocolError(f"{what} must be a list of at most {MAX_TENSORS} maps")
        out = []
        for q in raw:
            if not isinstance(q, dict):
                raise ProtocolError(f"{what} must be a list of maps")
            dtype, scale, zero_point = q.get("dtype"), q.get("scale"), q.get("zero_point")
            if (not isinstance(dtype, str) or isinstance(scale, bool)
                    or not isinstance(scale, float | int) or not math.isfinite(scale)
                    or scale < 0 or isinstance(zero_point, bool)
                    or not isinstance(zero_point, int) or abs(zero_point) > 2**31):
                raise ProtocolError(
                    f"{what}: each entry needs dtype (text), scale (a finite number >= 0) "
                    "and zero_point (an integer)")
            out.append((dtype, float(scale), zero_point))
        return out


@dataclass(frozen=True)
class Assignment(_Document):
    """What the director key tells one device to run; `counter` only grows."""

    TYPE: ClassVar[str] = "assignment"
    device: str
    model: str
    version: str
    digest: str
    manifest_hash: str  # BLAKE3 hex of the signed manifest envelope bytes
    counter: int
    rollout: str
    issued_at: int
    expires: int

    _FIELDS: ClassVar[FieldSpec] = {
        "device": str, "model": str, "version": str, "digest": str, "manifest_hash": str,
        "counter": int, "rollout": str, "issued_at": int, "expires": int,
    }


@dataclass(frozen=True)
class Timestamp(_Document):
    """The hub's short-lived word that `root_version` (whose envelope hashes to
    `root_digest`, BLAKE3 hex) is the newest trust root, signed by the timestamp role
    (TUF's timestamp role). `version` grows with every timestamp the hub signs; a device
    never goes back to a lower one."""

    TYPE: ClassVar[str] = "timestamp"
    version: int
    root_version: int
    root_digest: str
    issued: int  # ns
    expires: int  # ns

    _FIELDS: ClassVar[FieldSpec] = {
        "version": int, "root_version": int, "root_digest": str, "issued": int,
        "expires": int,
    }


@dataclass(frozen=True)
class EnrolmentRequest(_Document):
    """A device that made its own key asks to be enrolled with it: signed by that key
    (domain `device-enrolment`), carrying the one-time enrolment token the operator
    gave it (`hub device token create`)."""

    TYPE: ClassVar[str] = "enrolment"
    device: str
    public: bytes  # the device's new Ed25519 public key (32 bytes)
    token: str
    ts: int  # ns, when the device signed it

    _FIELDS: ClassVar[FieldSpec] = {"device": str, "public": bytes, "token": str, "ts": int}


# Status events a device reports.
STATUS_APPLIED = "applied"
STATUS_FAILED = "failed"
STATUS_STARTED = "started"
STATUS_REVERTED = "reverted"  # the agent went back to the previous slot by itself
STATUS_EVENTS = (STATUS_APPLIED, STATUS_FAILED, STATUS_STARTED, STATUS_REVERTED)


@dataclass(frozen=True)
class StatusReport(_Document):
    """A device's word about an update outcome or its running model."""

    TYPE: ClassVar[str] = "status"
    device: str
    boot: str
    seq: int
    ts: int
    event: str
    model: str
    version: str
    digest: str
    counter: int
    reason: str
    probe_output: list[float] = field(default_factory=list)

    _FIELDS: ClassVar[FieldSpec] = {
        "device": str, "boot": str, "seq": int, "ts": int, "event": str, "model": str,
        "version": str, "digest": str, "counter": int, "reason": str, "probe_output": list,
    }


@dataclass(frozen=True)
class TelemetryWindow(_Document):
    """Inference counters over one fixed window on one device."""

    TYPE: ClassVar[str] = "telemetry"
    device: str
    boot: str
    seq: int
    model: str
    version: str
    digest: str
    start: int
    end: int
    count: int
    errors: int
    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_max: float
    # Rollouts and drift (optional on the wire; see docs/PROTOCOL.md "Telemetry"):
    counter: int = 0  # assignment counter of the model that ran
    latency_buckets: list[int] = field(default_factory=list)  # edge_agent.bins buckets
    output_hist: list[list[int]] = field(default_factory=list)  # per output, drift_bins
    dropped: int = 0  # reports this device's spool has dropped so far (never silent)

    _FIELDS: ClassVar[FieldSpec] = {
        "device": str, "boot": str, "seq": int, "model": str, "version": str, "digest": str,
        "start": int, "end": int, "count": int, "errors": int,
        "latency_ms_p50": (float, int), "latency_ms_p95": (float, int),
        "latency_ms_max": (float, int),
        "counter": int, "latency_buckets": list, "output_hist": list, "dropped": int,
    }
    _OPTIONAL: ClassVar[frozenset[str]] = frozenset(
        {"counter", "latency_buckets", "output_hist", "dropped"})


def boot_id(counter: int, random_part: str) -> str:
    """A report's `boot`: "<boot counter>-<random hex>". The counter rises with every
    start of the agent on its state directory (edge_agent.boots), so reports order
    across boots by (boot counter, seq); the hub refuses one not above the last."""
    return f"{counter}-{random_part}"


def boot_counter(boot: str) -> int | None:
    """The boot counter of a report's `boot` (None: an agent older than boot counters,
    whose boot id is random hex only)."""
    counter, sep, rest = boot.partition("-")
    if not sep or not rest or not counter.isascii() or not counter.isdigit() \
            or len(counter) > 18:
        return None
    return int(counter)


def encode_report(report: StatusReport | TelemetryWindow) -> bytes:
    return canonical_encode(report.to_map())


def decode_report(data: bytes) -> StatusReport | TelemetryWindow:
    return report_from_map(decode_map(data, "report"))


def report_from_map(doc: dict[str, Any]) -> StatusReport | TelemetryWindow:
    """A report from its decoded map, with decode_report's checks (every bound of
    docs/PROTOCOL.md "Bounds"; a field past one is a ProtocolError, reason "bounds")."""
    kind = doc.get("type")
    if kind == StatusReport.TYPE:
        status = StatusReport.from_map(doc)
        check_device_id(status.device)
        _check_tokens("status", status.boot, status.model, status.version, status.digest)
        if status.event not in STATUS_EVENTS:
            raise ProtocolError(f"status: unknown event {status.event!r}")
        if not all(isinstance(v, float | int) and not isinstance(v, bool)
                   for v in status.probe_output):
            raise ProtocolError("status: probe_output must be a list of numbers")
        if len(status.probe_output) > MAX_PROBE_VALUES:
            raise _bounds(f"status: probe_output has more than {MAX_PROBE_VALUES} values")
        if len(status.reason) > MAX_REASON_CHARS:
            raise _bounds(f"status: reason is longer than {MAX_REASON_CHARS} characters")
        return status
    if kind == TelemetryWindow.TYPE:
        window = TelemetryWindow.from_map(doc)
        check_device_id(window.device)
        check_window(window)
        return window
    raise ProtocolError(f"report: unknown type {kind!r}")


def _bounds(message: str) -> ProtocolError:
    return ProtocolError(message, reason="bounds")


def _check_tokens(what: str, *values: str) -> None:
    if any(len(v) > MAX_TOKEN_CHARS for v in values):
        raise _bounds(f"{what}: boot, model, version and digest are at most "
                      f"{MAX_TOKEN_CHARS} characters")


def max_window_count(start: int, end: int) -> int:
    """The most inferences a window from `start` to `end` (ns) may count."""
    seconds = max(1, -(-(end - start) // 10**9))  # whole seconds, rounded up, at least 1
    return seconds * MAX_INFERENCES_PER_SECOND


def check_window(w: TelemetryWindow) -> None:
    """Every bound of a telemetry window (docs/PROTOCOL.md "Bounds"), or ProtocolError."""
    _check_tokens("telemetry", w.boot, w.model, w.version, w.digest)
    if w.end - w.start > MAX_WINDOW_NS:
        raise _bounds(f"telemetry: a window is at most {MAX_WINDOW_NS // 10**9} s long")
    if w.count > max_window_count(w.start, w.end):
        raise _bounds(f"telemetry: count {w.count} is over {MAX_INFERENCES_PER_SECOND} "
                      "inferences per second of the window")
    if w.errors > w.count:
        raise _bounds("telemetry: counts must satisfy 0 <= errors <= count")
    for name in ("latency_ms_p50", "latency_ms_p95", "latency_ms_max"):
        value = getattr(w, name)
        if not (math.isfinite(value) and 0 <= value <= 1e12):
            raise _bounds(f"telemetry: {name} must be a finite number >= 0")
    if w.latency_buckets:
        if len(w.latency_buckets) != LATENCY_BUCKET_COUNT:
            raise _bounds(f"telemetry: latency_buckets has {len(w.latency_buckets)} counts, "
                          f"not {LATENCY_BUCKET_COUNT}")
        _check_counts(w.latency_buckets, "latency_buckets", w.count)
    if len(w.output_hist) > MAX_OUTPUTS:
        raise _bounds(f"telemetry: output_hist has more than {MAX_OUTPUTS} outputs")
    cells = 0
    for hist in w.output_hist:
        if not isinstance(hist, list):
            raise ProtocolError("telemetry: output_hist must be a list of count lists")
        if len(hist) > MAX_DRIFT_BINS:
            raise _bounds(f"telemetry: an output histogram has more than {MAX_DRIFT_BINS} bins")
        cells += len(hist)
        _check_counts(hist, "output_hist", w.count)
    if cells > MAX_HIST_CELLS:
        raise _bounds(f"telemetry: output_hist has more than {MAX_HIST_CELLS} bins in all")


def _check_counts(values: list[Any], what: str, total: int) -> None:
    """Counts >= 0 that sum to at most `total` (each inference lands in one bin)."""
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ProtocolError(f"telemetry: {what} must be counts >= 0")
    if sum(values) > total:
        raise _bounds(f"telemetry: {what} counts more than the window's {total} inferences")


# ---------------------------------------------------------------- signed device reports


def encode_signed_report(report: StatusReport, key: SigningKey) -> bytes:
    """A status report in a SignedEnvelope signed by the device key (`device-report`)."""
    return SignedEnvelope.sign(report.to_map(), DOMAIN_DEVICE_REPORT, [key]).encode()


def decode_signed_report(data: bytes) -> tuple[StatusReport, SignedEnvelope]:
    """Structure only: the envelope and the status inside; the signature is not checked
    here (the reader holds the device's public key: see `report_signed_by`)."""
    envelope = SignedEnvelope.decode(data, "signed status report")
    report = decode_report(envelope.signed)
    if not isinstance(report, StatusReport):
        raise ProtocolError("signed report: only status reports are signed")
    return report, envelope


def read_report(data: bytes) -> tuple[StatusReport | TelemetryWindow, SignedEnvelope | None]:
    """A report as it arrives: a signed status envelope, or a bare (unsigned) map; at
    most MAX_REPORT_BYTES, a status report at most MAX_STATUS_REPORT_BYTES."""
    if len(data) > MAX_REPORT_BYTES:
        raise ProtocolError(f"report: {len(data)} bytes is over the {MAX_REPORT_BYTES}-byte "
                            "limit", reason="oversized")
    doc = decode_map(data, "report")
    report: StatusReport | TelemetryWindow
    envelope: SignedEnvelope | None
    if "type" not in doc and "signed" in doc and "signatures" in doc:
        report, envelope = decode_signed_report(data)
    else:
        report, envelope = report_from_map(doc), None  # decoded once: the hub reads every window
    if isinstance(report, StatusReport) and len(data) > MAX_STATUS_REPORT_BYTES:
        raise ProtocolError(f"status report: {len(data)} bytes is over the "
                            f"{MAX_STATUS_REPORT_BYTES}-byte limit", reason="oversized")
    return report, envelope


def report_signed_by(envelope: SignedEnvelope, public: bytes) -> bool:
    """True if the device key `public` signed this report envelope."""
    key = PublicKey(public)
    return any(s.keyid == key.keyid and key.verify(DOMAIN_DEVICE_REPORT, envelope.signed, s.sig)
               for s in envelope.signatures)
