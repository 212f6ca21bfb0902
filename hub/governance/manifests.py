"""The release manifest of a model version: built and size-checked before anything is
recorded (hub.governance.models.release).

A device refuses a manifest over `MAX_ENVELOPE_BYTES` (edge_agent.protocol), so the hub
refuses to release one: the message names the part that makes it too big, so the
operator knows what to change (fewer outputs, fewer histogram bins).
"""

from __future__ import annotations

from typing import Any

from edge_agent import protocol as proto
from hub.commands.outcome import CommandError
from ledger.encoding import canonical_encode


def manifest_quantization(inputs: list[Any], outputs: list[Any]) -> dict[str, Any]:
    """The manifest's `quantization` from the registered signature: per tensor its
    dtype, scale and zero_point (scale 0.0: not quantized). Empty when the signature
    does not carry them (a model registered before they were recorded): devices then
    read them from the model itself."""
    out: dict[str, Any] = {}
    for side, tensors in (("inputs", inputs), ("outputs", outputs)):
        entries = []
        for t in tensors:
            q = t.get("quantization") if isinstance(t, dict) else None
            if not isinstance(q, dict) or "scale" not in q or "zero_point" not in q:
                return {}
            entries.append({"dtype": str(t.get("dtype", "")), "scale": float(q["scale"]),
                            "zero_point": int(q["zero_point"])})
        out[side] = entries
    return out


def drift_tensors(reference: list[dict[str, Any]]) -> list[int]:
    """How many reference histograms each output tensor has, in tensor order (the
    manifest's `drift_tensors`), from a validation payload's histograms; [] when they
    are all of the first tensor (so a manifest reads as before)."""
    tensors = [int(h.get("tensor", 0)) if isinstance(h, dict) else 0 for h in reference]
    if not any(tensors):
        return []
    if tensors != sorted(tensors):
        raise ValueError("reference histograms must be in output tensor order")
    return [tensors.count(t) for t in range(max(tensors) + 1)]


def human_size(n: int) -> str:
    """Bytes as a person reads them: 5.2 MB, 300.1 KB, 900 bytes."""
    if n >= 1_000_000:
        return f"{n / 1_000_000:.1f} MB"
    if n >= 1_000:
        return f"{n / 1_000:.1f} KB"
    return f"{n} bytes"


def _part_text(field: str, value: Any) -> str:
    count = len(value) if isinstance(value, list | dict) else 0
    if field == "drift_bins":
        return f"drift bins for {count:,} outputs"
    if field in ("inputs", "outputs"):
        return f"the {field[:-1]} signature ({count:,} tensors)"
    if field == "quantization":
        tensors = sum(len(v) for v in value.values() if isinstance(v, list))
        return f"quantization parameters of {tensors:,} tensors"
    return f"the manifest's {field}"


def check_manifest_size(manifest: proto.ReleaseManifest, envelope: bytes) -> None:
    """Refuse (CommandError) a signed manifest a device would refuse for its size,
    naming its biggest part."""
    if len(envelope) <= proto.MAX_ENVELOPE_BYTES:
        return
    doc = manifest.to_map()
    field, value = max(doc.items(), key=lambda kv: len(canonical_encode(kv[1])))
    raise CommandError(
        f"cannot release {manifest.name}/{manifest.version}: {_part_text(field, value)} "
        f"make the manifest {human_size(len(envelope))}; the limit is "
        f"{proto.MAX_ENVELOPE_BYTES // 1024} KiB (devices refuse a bigger one). Nothing "
        "was released"
    )
