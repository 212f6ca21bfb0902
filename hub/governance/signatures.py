"""Signatures between versions: a version whose input/output tensors (names, dtypes,
shapes, quantization) differ from the released version's would break the applications
built for it, so its release is refused unless the operator says so explicitly
(hub.governance.models.release, recorded as `signature_change` in `model.released`).

Pure: registered signatures in, differences as sentences out.
"""

from __future__ import annotations

from typing import Any

SIDES = ("inputs", "outputs")


def _tensor(t: Any) -> dict[str, Any]:
    """The parts of a tensor that a caller of the model depends on."""
    if not isinstance(t, dict):
        return {"name": str(t)}
    q = t.get("quantization")
    quant = ({"scale": float(q.get("scale", 0.0)), "zero_point": int(q.get("zero_point", 0))}
             if isinstance(q, dict) else None)
    return {"name": t.get("name"), "dtype": t.get("dtype"), "shape": list(t.get("shape") or []),
            "quantization": quant}


def signature(row: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The signature of a registered version (a release row or model.registered payload)."""
    return {side: [_tensor(t) for t in row.get(side) or []] for side in SIDES}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What changed from `old` to `new` (both `signature(...)`), one sentence each; a
    quantization not recorded on either side (an older registration) is not compared."""
    out: list[str] = []
    for side in SIDES:
        a, b = old.get(side, []), new.get(side, [])
        if len(a) != len(b):
            out.append(f"{len(a)} {side} -> {len(b)} {side}")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            for part in ("name", "dtype", "shape", "quantization"):
                if part == "quantization" and (x[part] is None or y[part] is None):
                    continue
                if x[part] != y[part]:
                    out.append(f"{side[:-1]} {i} ({x['name']}) {part} {x[part]} -> {y[part]}")
    return out
