"""The TFLite side of validation: load the model safely and run it one row at a time,
sequence by sequence (the model's state reset before each)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_agent.protocol import bins
from edge_agent.runtime import LoadedModel, ModelRuntimeError, TensorSpec, preflight
from hub.validation.dataset import InputPart
from hub.validation.errors import DatasetError, ModelError

# Outputs a model may have for validation (each is run and checked finite).
MAX_MODEL_OUTPUTS = 16


class Runner:
    """Feeds rows to a batch-1 model and returns the dequantized outputs.

    Float rows are cast (float inputs) or quantized with the input tensor's (scale,
    zero_point); rows given in the input tensor's own integer dtype (`native`) are fed
    as they are. Every output is dequantized with its own parameters. Before each row
    where `resets` is True the model's state (resource variables) is reset, so a
    streaming model sees each declared sequence from its initial state, and results do
    not depend on the order of the sequences."""

    def __init__(self, model: LoadedModel, row_shape: tuple[int, ...], *,
                 native: bool = False, output: str | None = None,
                 parts: Sequence[InputPart] = ()) -> None:
        """`row_shape`: the shape of one row of a one-input data set (`native`: given in
        the input tensor's dtype). `parts`: a multi-input set's named inputs (each
        with its own row shape and dtype); rows are then the flattened concatenation
        the data set holds, split here into one tensor per model input."""
        self.model = model
        names = [s.name for s in model.inputs]
        if not parts:
            if len(model.inputs) != 1:
                raise ModelError(
                    f"the model has {len(model.inputs)} inputs ({names}); give one array "
                    f"per input in the .npz, named 'inputs/<tensor name>', instead of "
                    f"'inputs'")
            parts = [InputPart(names[0], row_shape,
                               model.inputs[0].dtype if native else "float64", 0)]
        else:
            given = [p.name for p in parts]
            missing = sorted(set(names) - set(given))
            unknown = sorted(set(given) - set(names))
            if missing or unknown:
                raise DatasetError(
                    "the validation inputs do not match the model's inputs "
                    f"{names}: " + "; ".join(
                        ([f"missing inputs/{n}" for n in missing]) +
                        ([f"inputs/{n} is not an input of the model" for n in unknown])))
        by_name = {p.name: p for p in parts}
        self.input = model.inputs[0]
        # One feed per model input, in the model's order: (tensor, part, fed natively).
        self.feeds: list[tuple[TensorSpec, InputPart, bool]] = []
        for spec in model.inputs:
            part = by_name[spec.name]
            if not spec.shape or spec.shape[0] != 1:
                raise ModelError(
                    f"validation runs one row at a time and needs a batch size of 1; input "
                    f"{spec.name!r} has shape {list(spec.shape)}")
            if part.row_shape != spec.shape[1:]:
                which = "each input row" if len(parts) == 1 else f"inputs/{spec.name}'s rows"
                raise DatasetError(
                    f"{which} has shape {list(part.row_shape)}, but the model's input "
                    f"{spec.name!r} expects {list(spec.shape[1:])} per row "
                    f"(tensor shape {list(spec.shape)})")
            fed_native = part.dtype == spec.dtype and spec.numpy_dtype.kind in "iu"
            self.feeds.append((spec, part, fed_native))
        outputs = model.outputs
        if len(outputs) > MAX_MODEL_OUTPUTS:
            raise ModelError(f"the model has {len(outputs)} output tensors; validation takes "
                             f"at most {MAX_MODEL_OUTPUTS}")
        out_names = [o.name for o in outputs]
        if output is not None and output not in out_names:
            raise ModelError(f"the policy's output {output!r} is not an output of the model; "
                             f"its outputs are {out_names}")
        self.scored = out_names.index(output) if output is not None else 0
        bad = [f"{t.name!r} {t.dtype}" for t in [*model.inputs, *outputs]
               if t.numpy_dtype.kind not in "iuf"]
        if bad:
            raise ModelError(f"unsupported tensor types: {', '.join(bad)}")
        self.native = all(native for _, _, native in self.feeds) and \
            self.input.numpy_dtype.kind in "iu"

    def encodings(self) -> dict[str, str]:
        """Per input: "float", "quantized" (float rows quantized with its parameters) or
        "native" (given in its own integer dtype, fed as is)."""
        return {spec.name: "native" if fed_native else
                "quantized" if spec.numpy_dtype.kind in "iu" else "float"
                for spec, _, fed_native in self.feeds}

    @staticmethod
    def _encode(spec: TensorSpec, rows: NDArray[np.float64], native: bool) -> NDArray[Any]:
        dtype = spec.numpy_dtype
        if dtype.kind == "f":
            return rows.astype(dtype)
        info = np.iinfo(dtype)
        if native:  # already the tensor's integers: not re-quantized
            return np.clip(np.round(rows), info.min, info.max).astype(dtype)
        scale, zero_point = spec.quantization
        values = np.round(rows / scale) + zero_point if scale > 0 else np.round(rows)
        return np.clip(values, info.min, info.max).astype(dtype)

    def encode(self, rows: NDArray[np.float64]) -> list[NDArray[Any]]:
        """Per model input, its (N, *tensor shape[1:]) rows in the tensor's dtype."""
        flat = rows.reshape(rows.shape[0], -1)
        return [self._encode(spec, flat[:, part.start:part.start + part.size], fed_native)
                .reshape(rows.shape[0], *spec.shape)
                for spec, part, fed_native in self.feeds]

    def decode(self, out: NDArray[Any], k: int = 0) -> NDArray[np.float64]:
        """The real values of output `k`: dequantized by the rule devices apply before
        they bin their outputs (edge_agent.protocol.bins.dequantize), so the reference
        histogram and a device's histogram count the same values."""
        return bins.dequantize(out, *self.model.outputs[k].quantization)

    def run_all_rows(self, rows: NDArray[np.float64], resets: NDArray[np.bool_] | None = None,
                     latencies: list[float] | None = None) -> list[NDArray[np.float64]]:
        """Every output, one (N, values) array per output tensor."""
        encoded = self.encode(rows)
        per_output: list[list[NDArray[np.float64]]] = [[] for _ in self.model.outputs]
        try:
            for i in range(rows.shape[0]):
                if resets is None or resets[i]:
                    self.model.reset_state()
                xs = [tensor[i] for tensor in encoded]
                start = time.perf_counter_ns()
                outs = self.model.run_all(xs)
                if latencies is not None:
                    latencies.append((time.perf_counter_ns() - start) / 1e6)
                for k, out in enumerate(outs):
                    per_output[k].append(self.decode(out, k))
        except ModelRuntimeError as exc:
            raise ModelError(str(exc)) from exc
        result = [np.stack(values) for values in per_output]
        for k, values in enumerate(result):
            if not np.all(np.isfinite(values)):
                raise ModelError(f"the model produced NaN or infinite values in output "
                                 f"{self.model.outputs[k].name!r} on the validation data")
        return result

    def run_rows(self, rows: NDArray[np.float64],
                 resets: NDArray[np.bool_] | None = None) -> NDArray[np.float64]:
        """The scored output only."""
        return self.run_all_rows(rows, resets)[self.scored]


def load_model(model_bytes: bytes, model_path: Path,
               input_shapes: Mapping[str, Sequence[int]] | None = None) -> LoadedModel:
    # Preflight the exact bytes we run, in a child process: a malformed flatbuffer can
    # crash the runtime, and that must not take the hub down with it.
    with tempfile.TemporaryDirectory(prefix="fleetledger-validate-") as tmp:
        copy = Path(tmp) / "model.tflite"
        copy.write_bytes(model_bytes)
        try:
            preflight(copy, input_shapes=input_shapes)
        except ModelRuntimeError as exc:
            raise ModelError(f"{model_path}: {exc}") from exc
    try:
        return LoadedModel.from_bytes(model_bytes, input_shapes)
    except ModelRuntimeError as exc:
        raise ModelError(f"{model_path}: {exc}") from exc
