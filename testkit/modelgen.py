"""Small, real .tflite models built without TensorFlow.

The models are genuine TFLite flatbuffers (schema version 3) that the TFLite runtime
loads and runs, so tests and benchmarks exercise the real install path on the edge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flatbuffers
import numpy as np
import tflite
from numpy.typing import NDArray

# Shared with the agent so hub-side expectations and device smoke tests use one probe.
from edge_agent.runtime import LoadedModel, probe_input

__all__ = [
    "dense_params_for_version",
    "make_dense_model",
    "make_int8_dense_model",
    "model_for_version",
    "probe_input",
]

_SCHEMA_VERSION = 3
_FILE_IDENTIFIER = b"TFL3"
# TFLite aligns constant buffers to 16 bytes so kernels may read them in place.
_BUFFER_ALIGNMENT = 16
_PADDING_METADATA_NAME = "fleetledger.padding"

_ACTIVATIONS = {
    "none": tflite.ActivationFunctionType.NONE,
    "relu": tflite.ActivationFunctionType.RELU,
}


def _byte_vector(builder: flatbuffers.Builder, data: bytes) -> int:
    builder.StartVector(1, len(data), _BUFFER_ALIGNMENT)
    builder.head = builder.head - len(data)
    builder.Bytes[builder.head : builder.head + len(data)] = data
    return int(builder.EndVector())


def _int32_vector(builder: flatbuffers.Builder, values: list[int]) -> int:
    return int(builder.CreateNumpyVector(np.asarray(values, dtype=np.int32)))


def _table_vector(builder: flatbuffers.Builder, offsets: list[int]) -> int:
    # Flatbuffers are built back to front, hence the reversed prepend.
    builder.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        builder.PrependUOffsetTRelative(off)
    return int(builder.EndVector())


def _buffer(builder: flatbuffers.Builder, data: bytes | None) -> int:
    data_off = _byte_vector(builder, data) if data else None
    tflite.BufferStart(builder)
    if data_off is not None:
        tflite.BufferAddData(builder, data_off)
    return int(tflite.BufferEnd(builder))


def _tensor(builder: flatbuffers.Builder, name: str, shape: list[int], buffer: int) -> int:
    name_off = builder.CreateString(name)
    shape_off = _int32_vector(builder, shape)
    tflite.TensorStart(builder)
    tflite.TensorAddShape(builder, shape_off)
    tflite.TensorAddType(builder, tflite.TensorType.FLOAT32)
    tflite.TensorAddBuffer(builder, buffer)
    tflite.TensorAddName(builder, name_off)
    return int(tflite.TensorEnd(builder))


def _fully_connected_opcode(builder: flatbuffers.Builder) -> int:
    code = tflite.BuiltinOperator.FULLY_CONNECTED
    tflite.OperatorCodeStart(builder)
    # Runtimes before 2.4 (and 2.14 for codes < 127) read the deprecated int8 field.
    tflite.OperatorCodeAddDeprecatedBuiltinCode(builder, code)
    tflite.OperatorCodeAddBuiltinCode(builder, code)
    tflite.OperatorCodeAddVersion(builder, 1)
    return int(tflite.OperatorCodeEnd(builder))


def _fully_connected_op(builder: flatbuffers.Builder, activation: int) -> int:
    tflite.FullyConnectedOptionsStart(builder)
    tflite.FullyConnectedOptionsAddFusedActivationFunction(builder, activation)
    options = tflite.FullyConnectedOptionsEnd(builder)
    inputs = _int32_vector(builder, [0, 1, 2])  # input, weights, bias
    outputs = _int32_vector(builder, [3])
    tflite.OperatorStart(builder)
    tflite.OperatorAddOpcodeIndex(builder, 0)
    tflite.OperatorAddInputs(builder, inputs)
    tflite.OperatorAddOutputs(builder, outputs)
    tflite.OperatorAddBuiltinOptionsType(builder, tflite.BuiltinOptions.FullyConnectedOptions)
    tflite.OperatorAddBuiltinOptions(builder, options)
    return int(tflite.OperatorEnd(builder))


def _fc_op_at(builder: flatbuffers.Builder, x: int, w: int, b: int, out: int) -> int:
    """A FULLY_CONNECTED op (no activation) on the tensors at these indexes."""
    tflite.FullyConnectedOptionsStart(builder)
    tflite.FullyConnectedOptionsAddFusedActivationFunction(builder, _ACTIVATIONS["none"])
    options = tflite.FullyConnectedOptionsEnd(builder)
    inputs = _int32_vector(builder, [x, w, b])
    outputs = _int32_vector(builder, [out])
    tflite.OperatorStart(builder)
    tflite.OperatorAddOpcodeIndex(builder, 0)
    tflite.OperatorAddInputs(builder, inputs)
    tflite.OperatorAddOutputs(builder, outputs)
    tflite.OperatorAddBuiltinOptionsType(builder, tflite.BuiltinOptions.FullyConnectedOptions)
    tflite.OperatorAddBuiltinOptions(builder, options)
    return int(tflite.OperatorEnd(builder))


def make_two_head_model(heads: list[tuple[NDArray[Any], NDArray[Any]]], *,
                        shared_input: bool) -> bytes:
    """Two FULLY_CONNECTED heads, float32: "out_a" [1, a] and "out_b" [1, b] (two output
    tensors). `shared_input`: both read one "input" [1, n]; else head k reads its own
    input ("in_a" [1, n_a], "in_b" [1, n_b]): a two-input model."""
    if len(heads) != 2:
        raise ValueError("two heads: [(weights_a, bias_a), (weights_b, bias_b)]")
    ws = [np.ascontiguousarray(w, dtype=np.float32) for w, _ in heads]
    bs = [np.ascontiguousarray(b, dtype=np.float32) for _, b in heads]
    for w, b in zip(ws, bs, strict=True):
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise ValueError(f"weights must be (out, in) and bias (out,); got {w.shape}, "
                             f"{b.shape}")
    if shared_input and ws[0].shape[1] != ws[1].shape[1]:
        raise ValueError("a shared input needs both heads to take the same width")
    builder = flatbuffers.Builder(4096 + sum(w.nbytes for w in ws))
    blobs: list[bytes | None] = [None, ws[0].tobytes(), bs[0].tobytes(), ws[1].tobytes(),
                                 bs[1].tobytes()]
    buffers = _table_vector(builder, [_buffer(builder, blob) for blob in blobs])
    specs: list[tuple[str, list[int], int]] = [
        ("weights_a", list(ws[0].shape), 1), ("bias_a", list(bs[0].shape), 2),
        ("weights_b", list(ws[1].shape), 3), ("bias_b", list(bs[1].shape), 4),
        ("out_a", [1, int(ws[0].shape[0])], 0), ("out_b", [1, int(ws[1].shape[0])], 0)]
    if shared_input:
        specs.append(("input", [1, int(ws[0].shape[1])], 0))
        x_a = x_b = 6
        graph_inputs = [6]
    else:
        specs += [("in_a", [1, int(ws[0].shape[1])], 0), ("in_b", [1, int(ws[1].shape[1])], 0)]
        x_a, x_b = 6, 7
        graph_inputs = [6, 7]
    tensors = _table_vector(builder, [_tensor(builder, n, sh, buf) for n, sh, buf in specs])
    operators = _table_vector(builder, [_fc_op_at(builder, x_a, 0, 1, 4),
                                        _fc_op_at(builder, x_b, 2, 3, 5)])
    sg_inputs = _int32_vector(builder, graph_inputs)
    sg_outputs = _int32_vector(builder, [4, 5])
    sg_name = builder.CreateString("main")
    tflite.SubGraphStart(builder)
    tflite.SubGraphAddTensors(builder, tensors)
    tflite.SubGraphAddInputs(builder, sg_inputs)
    tflite.SubGraphAddOutputs(builder, sg_outputs)
    tflite.SubGraphAddOperators(builder, operators)
    tflite.SubGraphAddName(builder, sg_name)
    subgraphs = _table_vector(builder, [tflite.SubGraphEnd(builder)])
    opcodes = _table_vector(builder, [_fully_connected_opcode(builder)])
    desc = builder.CreateString("two heads")
    tflite.ModelStart(builder)
    tflite.ModelAddVersion(builder, _SCHEMA_VERSION)
    tflite.ModelAddOperatorCodes(builder, opcodes)
    tflite.ModelAddSubgraphs(builder, subgraphs)
    tflite.ModelAddDescription(builder, desc)
    tflite.ModelAddBuffers(builder, buffers)
    builder.Finish(tflite.ModelEnd(builder), file_identifier=_FILE_IDENTIFIER)
    return bytes(builder.Output())


def _padding_metadata(builder: flatbuffers.Builder, buffer: int) -> int:
    name = builder.CreateString(_PADDING_METADATA_NAME)
    tflite.MetadataStart(builder)
    tflite.MetadataAddName(builder, name)
    tflite.MetadataAddBuffer(builder, buffer)
    return int(tflite.MetadataEnd(builder))


def make_dense_model(
    weights: NDArray[Any],
    bias: NDArray[Any],
    activation: str = "none",
    description: str = "",
    *,
    padding: bytes = b"",
) -> bytes:
    """One FULLY_CONNECTED op: float32 "input" [1, in] -> float32 "output" [1, out].

    `padding` is stored in a metadata buffer the runtime never reads; it only makes
    the file bigger (for transfer tests and benchmarks).
    """
    w = np.ascontiguousarray(weights, dtype=np.float32)
    b = np.ascontiguousarray(bias, dtype=np.float32)
    if w.ndim != 2 or b.shape != (w.shape[0],):
        raise ValueError(f"weights must be (out, in) and bias (out,); got {w.shape} and {b.shape}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    n_out, n_in = (int(d) for d in w.shape)

    builder = flatbuffers.Builder(1024 + w.nbytes + b.nbytes + len(padding))
    # Buffer 0 is the empty sentinel that non-constant tensors point at.
    blobs: list[bytes | None] = [None, w.tobytes(), b.tobytes()]
    if padding:
        blobs.append(padding)
    buffers = _table_vector(builder, [_buffer(builder, blob) for blob in blobs])

    tensors = _table_vector(
        builder,
        [
            _tensor(builder, "input", [1, n_in], 0),
            _tensor(builder, "weights", [n_out, n_in], 1),
            _tensor(builder, "bias", [n_out], 2),
            _tensor(builder, "output", [1, n_out], 0),
        ],
    )
    operators = _table_vector(builder, [_fully_connected_op(builder, _ACTIVATIONS[activation])])
    sg_inputs = _int32_vector(builder, [0])
    sg_outputs = _int32_vector(builder, [3])
    sg_name = builder.CreateString("main")
    tflite.SubGraphStart(builder)
    tflite.SubGraphAddTensors(builder, tensors)
    tflite.SubGraphAddInputs(builder, sg_inputs)
    tflite.SubGraphAddOutputs(builder, sg_outputs)
    tflite.SubGraphAddOperators(builder, operators)
    tflite.SubGraphAddName(builder, sg_name)
    subgraphs = _table_vector(builder, [tflite.SubGraphEnd(builder)])

    opcodes = _table_vector(builder, [_fully_connected_opcode(builder)])
    metadata = _table_vector(builder, [_padding_metadata(builder, 3)]) if padding else None
    desc = builder.CreateString(description)

    tflite.ModelStart(builder)
    tflite.ModelAddVersion(builder, _SCHEMA_VERSION)
    tflite.ModelAddOperatorCodes(builder, opcodes)
    tflite.ModelAddSubgraphs(builder, subgraphs)
    tflite.ModelAddDescription(builder, desc)
    tflite.ModelAddBuffers(builder, buffers)
    if metadata is not None:
        tflite.ModelAddMetadata(builder, metadata)
    builder.Finish(tflite.ModelEnd(builder), file_identifier=_FILE_IDENTIFIER)
    return bytes(builder.Output())


def dense_params_for_version(
    version: int, n_in: int = 8, n_out: int = 4
) -> tuple[NDArray[Any], NDArray[Any]]:
    """The weights and bias `model_for_version` uses, for computing expected outputs."""
    rng = np.random.default_rng(version)
    weights = rng.standard_normal((n_out, n_in)).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32)
    return weights, bias


def model_for_version(version: int, n_in: int = 8, n_out: int = 4, extra_bytes: int = 0) -> bytes:
    """A deterministic dense model whose probe output differs from version to version.

    `extra_bytes` adds that many (incompressible, deterministic) bytes of metadata, so
    1 MiB or 50 MiB models still load and run like small ones.
    """
    if version < 0:
        raise ValueError(f"version must be >= 0, got {version}")
    if extra_bytes < 0:
        raise ValueError(f"extra_bytes must be >= 0, got {extra_bytes}")
    weights, bias = dense_params_for_version(version, n_in, n_out)
    # A separate stream, so padding never changes the weights of a version.
    padding = np.random.default_rng([version, 1]).bytes(extra_bytes) if extra_bytes else b""
    return make_dense_model(
        weights, bias, description=f"fleetledger test model v{version}", padding=padding
    )


# --- Fully int8-quantized models -------------------------------------------------------
#
# The layout follows TFLite's int8 quantization spec: activations are asymmetric int8
# (scale, zero_point), weights symmetric int8 (zero_point 0), the bias int32 with
# scale = input_scale * weight_scale and zero_point 0. A real value is
# `(q - zero_point) * scale`.

_INT8_MIN, _INT8_MAX = -128, 127
# op_version.cc gives FULLY_CONNECTED with int8 tensors version 4.
_FULLY_CONNECTED_INT8_VERSION = 4


def _quantization(builder: flatbuffers.Builder, scale: float, zero_point: int) -> int:
    scale_off = builder.CreateNumpyVector(np.asarray([scale], dtype=np.float32))
    zero_off = builder.CreateNumpyVector(np.asarray([zero_point], dtype=np.int64))
    tflite.QuantizationParametersStart(builder)
    tflite.QuantizationParametersAddScale(builder, scale_off)
    tflite.QuantizationParametersAddZeroPoint(builder, zero_off)
    tflite.QuantizationParametersAddQuantizedDimension(builder, 0)
    return int(tflite.QuantizationParametersEnd(builder))


def _quantized_tensor(
    builder: flatbuffers.Builder,
    name: str,
    shape: list[int],
    buffer: int,
    tensor_type: int,
    quantization: tuple[float, int],
) -> int:
    quant_off = _quantization(builder, *quantization)
    name_off = builder.CreateString(name)
    shape_off = _int32_vector(builder, shape)
    tflite.TensorStart(builder)
    tflite.TensorAddShape(builder, shape_off)
    tflite.TensorAddType(builder, tensor_type)
    tflite.TensorAddBuffer(builder, buffer)
    tflite.TensorAddName(builder, name_off)
    tflite.TensorAddQuantization(builder, quant_off)
    return int(tflite.TensorEnd(builder))


def _asymmetric_int8(low: float, high: float) -> tuple[float, int]:
    """(scale, zero_point) mapping [low, high] (widened to contain 0) onto int8."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if high - low <= 0.0:
        high = low + 1.0  # an all-zero range still needs a usable, positive scale
    scale = (high - low) / (_INT8_MAX - _INT8_MIN)
    zero_point = int(np.clip(round(_INT8_MIN - low / scale), _INT8_MIN, _INT8_MAX))
    return float(np.float32(scale)), zero_point


def make_int8_dense_model(
    weights: NDArray[Any],
    bias: NDArray[Any],
    calibration_inputs: NDArray[Any],
    activation: str = "none",
    description: str = "",
) -> bytes:
    """The int8 twin of `make_dense_model`: int8 "input" [1, in] -> int8 "output" [1, out].

    Fully quantized, as TFLite post-training quantization would produce it: int8 input
    and weights, int32 bias, int8 output, each with its (scale, zero_point) in the
    tensor. The input range comes from `calibration_inputs` (rows of float features,
    shape (N, in)) and the output range from the float model's outputs on those rows.
    Callers quantize inputs with the input tensor's parameters and dequantize outputs
    with the output tensor's (`LoadedModel.inputs[0].quantization`).
    """
    w = np.asarray(weights, dtype=np.float64)
    b = np.asarray(bias, dtype=np.float64)
    calib = np.asarray(calibration_inputs, dtype=np.float64)
    if w.ndim != 2 or b.shape != (w.shape[0],):
        raise ValueError(f"weights must be (out, in) and bias (out,); got {w.shape} and {b.shape}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    n_out, n_in = (int(d) for d in w.shape)
    if calib.ndim != 2 or calib.shape[1] != n_in or calib.shape[0] < 1:
        raise ValueError(f"calibration_inputs must be (N >= 1, {n_in}); got {calib.shape}")
    if not np.all(np.isfinite(calib)):
        raise ValueError("calibration_inputs contain NaN or infinite values")

    in_scale, in_zero = _asymmetric_int8(float(calib.min()), float(calib.max()))
    float_out = calib @ w.T + b
    if activation == "relu":
        float_out = np.maximum(float_out, 0.0)
    out_scale, out_zero = _asymmetric_int8(float(float_out.min()), float(float_out.max()))
    max_abs_w = float(np.abs(w).max())
    w_scale = float(np.float32(max_abs_w / _INT8_MAX if max_abs_w > 0 else 1.0))
    q_w = np.clip(np.round(w / w_scale), -_INT8_MAX, _INT8_MAX).astype(np.int8)
    # The runtime checks bias_scale == input_scale * weight_scale (to 1e-6 relative).
    bias_scale = float(np.float32(np.float64(in_scale) * np.float64(w_scale)))
    q_b = np.round(b / bias_scale).astype(np.int32)

    builder = flatbuffers.Builder(1024 + q_w.nbytes + q_b.nbytes)
    blobs: list[bytes | None] = [None, q_w.tobytes(), q_b.tobytes()]
    buffers = _table_vector(builder, [_buffer(builder, blob) for blob in blobs])
    int8, int32 = tflite.TensorType.INT8, tflite.TensorType.INT32
    tensors = _table_vector(
        builder,
        [
            _quantized_tensor(builder, "input", [1, n_in], 0, int8, (in_scale, in_zero)),
            _quantized_tensor(builder, "weights", [n_out, n_in], 1, int8, (w_scale, 0)),
            _quantized_tensor(builder, "bias", [n_out], 2, int32, (bias_scale, 0)),
            _quantized_tensor(builder, "output", [1, n_out], 0, int8, (out_scale, out_zero)),
        ],
    )
    operators = _table_vector(builder, [_fully_connected_op(builder, _ACTIVATIONS[activation])])
    sg_inputs = _int32_vector(builder, [0])
    sg_outputs = _int32_vector(builder, [3])
    sg_name = builder.CreateString("main")
    tflite.SubGraphStart(builder)
    tflite.SubGraphAddTensors(builder, tensors)
    tflite.SubGraphAddInputs(builder, sg_inputs)
    tflite.SubGraphAddOutputs(builder, sg_outputs)
    tflite.SubGraphAddOperators(builder, operators)
    tflite.SubGraphAddName(builder, sg_name)
    subgraphs = _table_vector(builder, [tflite.SubGraphEnd(builder)])

    code = tflite.BuiltinOperator.FULLY_CONNECTED
    tflite.OperatorCodeStart(builder)
    tflite.OperatorCodeAddDeprecatedBuiltinCode(builder, code)
    tflite.OperatorCodeAddBuiltinCode(builder, code)
    tflite.OperatorCodeAddVersion(builder, _FULLY_CONNECTED_INT8_VERSION)
    opcodes = _table_vector(builder, [tflite.OperatorCodeEnd(builder)])
    desc = builder.CreateString(description)

    tflite.ModelStart(builder)
    tflite.ModelAddVersion(builder, _SCHEMA_VERSION)
    tflite.ModelAddOperatorCodes(builder, opcodes)
    tflite.ModelAddSubgraphs(builder, subgraphs)
    tflite.ModelAddDescription(builder, desc)
    tflite.ModelAddBuffers(builder, buffers)
    builder.Finish(tflite.ModelEnd(builder), file_identifier=_FILE_IDENTIFIER)
    return bytes(builder.Output())


def write_validation_set(model: Path, out: Path, rows: int = 64, seed: int = 7) -> Path:
    """A validation .npz a model passes: labels are its own predictions, two groups.

    For demos and tests of the lifecycle; real validation data comes from the user
    (see scripts/make_validation_data.py for a noisier set with a fairness gap).
    """
    loaded = LoadedModel.load(model)
    rng = np.random.default_rng(seed)
    shape = loaded.inputs[0].shape
    inputs = rng.uniform(-1, 1, size=(rows, *shape[1:])).astype(np.float32)
    labels = np.array([int(np.argmax(loaded.run(x[None, ...]))) for x in inputs])
    np.savez(out, inputs=inputs, labels=labels, groups=np.arange(rows) % 2)
    return out
