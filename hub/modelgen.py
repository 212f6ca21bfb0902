"""Small, real .tflite models built without TensorFlow.

The models are genuine TFLite flatbuffers (schema version 3) that the TFLite runtime
loads and runs, so tests and benchmarks exercise the real install path on the edge.
"""

from __future__ import annotations

from typing import Any

import flatbuffers
import numpy as np
import tflite
from numpy.typing import NDArray

# Shared with the agent so hub-side expectations and device smoke tests use one probe.
from edge_agent.runtime import probe_input

__all__ = ["dense_params_for_version", "make_dense_model", "model_for_version", "probe_input"]

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
