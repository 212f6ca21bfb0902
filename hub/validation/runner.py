"""The TFLite side of validation: load the model safely and run it one row at a time."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_agent.protocol import bins
from edge_agent.runtime import LoadedModel, ModelRuntimeError, preflight
from hub.validation.errors import DatasetError, ModelError


class Runner:
    """Feeds float rows to a batch-1 model: casts or quantizes inputs with the input
    tensor's (scale, zero_point), dequantizes outputs with the output tensor's."""

    def __init__(self, model: LoadedModel, row_shape: tuple[int, ...]) -> None:
        self.model = model
        self.input = model.inputs[0]
        self.output = model.outputs[0]
        if len(model.inputs) != 1:
            raise ModelError(
                f"validation supports one input tensor, the model has {len(model.inputs)}"
            )
        if not self.input.shape or self.input.shape[0] != 1:
            raise ModelError(
                f"validation runs one row at a time and needs a batch size of 1; input "
                f"{self.input.name!r} has shape {list(self.input.shape)}"
            )
        if row_shape != self.input.shape[1:]:
            raise DatasetError(
                f"each input row has shape {list(row_shape)}, but the model's input "
                f"{self.input.name!r} expects {list(self.input.shape[1:])} per row "
                f"(tensor shape {list(self.input.shape)})"
            )
        if self.input.numpy_dtype.kind not in "iuf" or self.output.numpy_dtype.kind not in "iuf":
            raise ModelError(
                f"unsupported tensor types: input {self.input.dtype}, output {self.output.dtype}"
            )

    def encode(self, rows: NDArray[np.float64]) -> NDArray[Any]:
        dtype = self.input.numpy_dtype
        if dtype.kind == "f":
            return rows.astype(dtype)
        scale, zero_point = self.input.quantization
        values = np.round(rows / scale) + zero_point if scale > 0 else np.round(rows)
        info = np.iinfo(dtype)
        return np.clip(values, info.min, info.max).astype(dtype)

    def decode(self, out: NDArray[Any]) -> NDArray[np.float64]:
        """The real output values: dequantized by the rule devices apply before they bin
        their outputs (edge_agent.protocol.bins.dequantize), so the reference histogram
        and a device's histogram count the same values."""
        return bins.dequantize(out, *self.output.quantization)

    def run_rows(
        self, rows: NDArray[np.float64], latencies: list[float] | None = None
    ) -> NDArray[np.float64]:
        encoded = self.encode(rows)
        batch_shape = self.input.shape
        outputs = []
        try:
            for row in encoded:
                x = row.reshape(batch_shape)
                start = time.perf_counter_ns()
                out = self.model.run(x)
                if latencies is not None:
                    latencies.append((time.perf_counter_ns() - start) / 1e6)
                outputs.append(self.decode(out))
        except ModelRuntimeError as exc:
            raise ModelError(str(exc)) from exc
        result = np.stack(outputs)
        if not np.all(np.isfinite(result)):
            raise ModelError("the model produced NaN or infinite outputs on the validation data")
        return result


def load_model(model_bytes: bytes, model_path: Path) -> LoadedModel:
    # Preflight the exact bytes we run, in a child process: a malformed flatbuffer can
    # crash the runtime, and that must not take the hub down with it.
    with tempfile.TemporaryDirectory(prefix="fleetledger-validate-") as tmp:
        copy = Path(tmp) / "model.tflite"
        copy.write_bytes(model_bytes)
        try:
            preflight(copy)
        except ModelRuntimeError as exc:
            raise ModelError(f"{model_path}: {exc}") from exc
    try:
        return LoadedModel.from_bytes(model_bytes)
    except ModelRuntimeError as exc:
        raise ModelError(f"{model_path}: {exc}") from exc
