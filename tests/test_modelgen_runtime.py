"""Generated models against the real TFLite runtime (no TensorFlow involved)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

pytest.importorskip("tflite_runtime", reason="needs the TFLite runtime (tflite-runtime)")
pytest.importorskip("tflite", reason="model generation needs the hub extra (tflite schema)")

from edge_agent.runtime import (
    LoadedModel,
    ModelRuntimeError,
    describe,
    preflight,
    probe_input,
)
from testkit.modelgen import dense_params_for_version, make_dense_model, model_for_version


def test_probe_input_is_fixed_and_shared() -> None:
    x = probe_input(10)
    assert x.shape == (1, 10)
    assert x.dtype == np.float32
    assert x.ravel().tolist() == [-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, -1.0]
    import testkit.modelgen

    assert testkit.modelgen.probe_input is probe_input


@pytest.mark.parametrize("version", [1, 2, 7])
def test_model_output_matches_numpy(version: int) -> None:
    model = LoadedModel.from_bytes(model_for_version(version, n_in=8, n_out=4))
    weights, bias = dense_params_for_version(version, 8, 4)
    x = probe_input(8)
    np.testing.assert_allclose(model.run(x), x @ weights.T + bias, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(model.smoke_test(), model.run(x))


def test_relu_activation() -> None:
    weights = np.array([[1.0, 0.0], [0.0, -1.0]], dtype=np.float32)
    bias = np.zeros(2, dtype=np.float32)
    model = LoadedModel.from_bytes(make_dense_model(weights, bias, activation="relu"))
    out = model.run(np.array([[2.0, 3.0]], dtype=np.float32))
    np.testing.assert_allclose(out, [[2.0, 0.0]])


def test_signature() -> None:
    model = LoadedModel.from_bytes(model_for_version(1, n_in=5, n_out=3))
    [inp] = model.inputs
    [out] = model.outputs
    assert (inp.name, inp.shape, inp.dtype) == ("input", (1, 5), "float32")
    assert (out.name, out.shape, out.dtype) == ("output", (1, 3), "float32")
    assert inp.quantization == (0.0, 0)


def test_versions_differ_and_generation_is_deterministic() -> None:
    assert model_for_version(1) == model_for_version(1)
    assert model_for_version(1) != model_for_version(2)
    out1 = LoadedModel.from_bytes(model_for_version(1)).smoke_test()
    out2 = LoadedModel.from_bytes(model_for_version(2)).smoke_test()
    assert np.max(np.abs(out1 - out2)) > 0.1


def test_padded_model_loads_and_runs(tmp_path: Path) -> None:
    data = model_for_version(3, extra_bytes=1_000_000)
    assert len(data) > 1_000_000
    path = tmp_path / "big.tflite"
    path.write_bytes(data)
    model = LoadedModel.load(path)
    # Padding must not change what the version computes.
    np.testing.assert_array_equal(
        model.smoke_test(), LoadedModel.from_bytes(model_for_version(3)).smoke_test()
    )


def test_describe_is_json_able(tmp_path: Path) -> None:
    path = tmp_path / "m.tflite"
    path.write_bytes(model_for_version(1, n_in=6, n_out=2))
    none = {"scale": 0.0, "zero_point": 0}  # float tensors: not quantized
    assert describe(path) == {
        "inputs": [{"name": "input", "shape": [1, 6], "dtype": "float32",
                    "quantization": none}],
        "outputs": [{"name": "output", "shape": [1, 2], "dtype": "float32",
                     "quantization": none}],
    }


def test_generated_input_fits_first_input() -> None:
    model = LoadedModel.from_bytes(model_for_version(1, n_in=16))
    x = model.generated_input(np.random.default_rng(0))
    assert x.shape == (1, 16)
    assert x.dtype == np.float32
    assert np.all((x >= -1) & (x <= 1))
    assert model.run(x).shape == (1, 4)


# Only inputs whose rejection needs no out-of-bounds read run in-process: the runtime
# does not verify flatbuffers, so a truncated model is undefined behaviour there.
@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "model file is empty"),
        (b"this is not a flatbuffer at all, just text" * 4, "not a valid TFLite flatbuffer"),
        (b"\x00" * 4096, "not a valid TFLite flatbuffer"),
    ],
)
def test_bad_bytes_raise(data: bytes, message: str) -> None:
    with pytest.raises(ModelRuntimeError, match=message):
        LoadedModel.from_bytes(data)


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(ModelRuntimeError, match="cannot read model file"):
        LoadedModel.load(tmp_path / "nope.tflite")


@pytest.mark.parametrize(
    "x",
    [
        np.zeros((1, 7), dtype=np.float32),
        np.zeros((8,), dtype=np.float32),
        np.zeros((1, 8), dtype=np.float64),
        np.zeros((1, 8), dtype=np.int8),
    ],
)
def test_wrong_input_raises(x: NDArray[Any]) -> None:
    model = LoadedModel.from_bytes(model_for_version(1))
    with pytest.raises(ModelRuntimeError, match=r"expects shape \[1, 8\] dtype float32"):
        model.run(x)


def test_preflight_accepts_good_model(tmp_path: Path) -> None:
    path = tmp_path / "m.tflite"
    path.write_bytes(model_for_version(2))
    result = preflight(path)
    assert result.signature == describe(path)
    np.testing.assert_array_equal(result.smoke_output, LoadedModel.load(path).smoke_test())


def test_preflight_rejects_truncated_model(tmp_path: Path) -> None:
    path = tmp_path / "truncated.tflite"
    path.write_bytes(model_for_version(1)[:64])
    with pytest.raises(ModelRuntimeError, match=r"truncated\.tflite"):
        preflight(path)


@pytest.mark.parametrize("keep", [120, 216, 408, 536, 648])
def test_preflight_survives_runtime_crash(tmp_path: Path, keep: int) -> None:
    # These cuts made the runtime segfault or read garbage in-process. Which one happens
    # is undefined, so the contract checked is only: an error or a result, never a
    # dead caller. Catching truncation reliably is the manifest digest's job.
    path = tmp_path / "truncated.tflite"
    path.write_bytes(model_for_version(1)[:keep])
    try:
        preflight(path)
    except ModelRuntimeError as exc:
        assert str(path) in str(exc)
