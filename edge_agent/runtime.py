"""The one place the edge agent touches the TFLite runtime.

Everything the interpreter can throw becomes `ModelRuntimeError`, so callers (install
pipeline, health window) handle one exception type whose message says what to fix.

The runtime does NOT verify the flatbuffer structure: a truncated or malformed file can
crash the process (SIGSEGV) instead of raising. So a model from outside is first loaded
by `preflight`, in a child process, and only then with `LoadedModel.load` in-process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_agent.errors import ModelRuntimeError

try:
    from tflite_runtime.interpreter import Interpreter
except ImportError:  # pragma: no cover - depends on what the device has installed
    try:
        # ai-edge-litert is the successor package; same Interpreter API.
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        # Importing this module must not fail on a box without a runtime (the CLI
        # still has to print a clear error), so the failure is deferred to load time.
        Interpreter = None

__all__ = [
    "LoadedModel",
    "ModelRuntimeError",
    "PreflightResult",
    "TensorSpec",
    "describe",
    "preflight",
    "probe_input",
]

# A fixed seed keeps the smoke input of non-float models reproducible across runs.
_SMOKE_SEED = 20240229


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name, e.g. "float32"
    quantization: tuple[float, int]  # (scale, zero_point); (0.0, 0) when not quantized
    # The shape the model declares, -1 for a dynamic dimension (None: not known).
    shape_signature: tuple[int, ...] | None = None

    @property
    def dynamic(self) -> bool:
        """Whether the model leaves a dimension of this tensor open (-1)."""
        return self.shape_signature is not None and -1 in self.shape_signature

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        return np.dtype(self.dtype)


def probe_input(n: int) -> NDArray[np.float32]:
    """The fixed float32 [1, n] input everyone uses to tell model versions apart.

    Values are multiples of 1/4 in [-1, 1], exact in float32, so the probe is
    bit-identical on every platform (no libm involved).
    """
    if n < 1:
        raise ValueError(f"probe input needs at least one element, got n={n}")
    values = (np.arange(n, dtype=np.float64) % 9 - 4) / 4
    return values.astype(np.float32).reshape(1, n)


def _quantization(detail: dict[str, Any]) -> tuple[float, int]:
    """(scale, zero_point) of a tensor: from `quantization_parameters` when it holds one
    scale (per-tensor quantization), else the legacy `quantization` pair ((0.0, 0) for a
    tensor that is not quantized, and for per-channel quantization, which outputs and
    inputs of TFLite models do not use)."""
    params = detail.get("quantization_parameters") or {}
    scales, zero_points = params.get("scales"), params.get("zero_points")
    if scales is not None and zero_points is not None and len(scales) == 1 == len(zero_points):
        return float(scales[0]), int(zero_points[0])
    scale, zero_point = detail.get("quantization", (0.0, 0))
    return float(scale), int(zero_point)


def _spec(detail: dict[str, Any]) -> TensorSpec:
    scale, zero_point = _quantization(detail)
    signature = detail.get("shape_signature")
    return TensorSpec(
        name=str(detail["name"]),
        shape=tuple(int(d) for d in detail["shape"]),
        dtype=np.dtype(detail["dtype"]).name,
        quantization=(float(scale), int(zero_point)),
        shape_signature=None if signature is None else tuple(int(d) for d in signature),
    )


InputShapes = Mapping[str, Sequence[int]]


def _resize(interpreter: Any, source: str, input_shapes: InputShapes) -> None:
    """Give dynamic inputs the declared run shapes (before `allocate_tensors`): only the
    dimensions the model leaves open (-1) may differ from the model's own shape."""
    by_name = {str(d["name"]): d for d in interpreter.get_input_details()}
    for name, shape in input_shapes.items():
        detail = by_name.get(name)
        if detail is None:
            raise ModelRuntimeError(
                f"{source}: a run shape is declared for {name!r}, but the model's inputs "
                f"are {sorted(by_name)}")
        dims = [int(d) for d in shape]
        if list(detail["shape"]) == dims:
            continue
        try:
            interpreter.resize_tensor_input(int(detail["index"]), dims, strict=True)
        except (ValueError, RuntimeError) as exc:
            raise ModelRuntimeError(
                f"{source}: cannot run input {name!r} (declared shape "
                f"{[int(d) for d in detail.get('shape_signature', detail['shape'])]}) with "
                f"the run shape {dims}: {exc}") from exc


def _refuse_open_shapes(interpreter: Any, source: str, declared: Any,
                        exc: Exception) -> None:
    """When a model with dynamic inputs (an open, -1, dimension) that were given no run
    shape fails to allocate or run, say that, not the runtime's "elements overflowed"."""
    open_ = [d for d in interpreter.get_input_details()
             if -1 in list(d.get("shape_signature", [])) and str(d["name"]) not in declared]
    if not open_:
        return
    which = ", ".join(f"{d['name']!r} {[int(v) for v in d['shape_signature']]}" for d in open_)
    raise ModelRuntimeError(
        f"{source}: the model has dynamic input shape(s) ({which}; -1 = open) and cannot "
        f"run at its placeholder shape {[int(v) for v in open_[0]['shape']]}: declare a run "
        f"shape for each (input_shapes at registration, e.g. {{{str(open_[0]['name'])!r}: "
        f"[1, 1280]}}). The runtime said: {' '.join(str(exc).split())}") from exc


class LoadedModel:
    """A TFLite model with its tensors allocated, ready to run on the first input."""

    def __init__(self, interpreter: Any, source: str,
                 declared: frozenset[str] = frozenset()) -> None:
        # Use `load` / `from_bytes`; this takes an interpreter that is already allocated.
        self._interpreter = interpreter
        self._source = source
        self._declared = declared  # inputs given a run shape
        # The interpreter keeps per-call state in its tensors; one caller at a time.
        self._lock = threading.Lock()
        try:
            self._inputs = [_spec(d) for d in interpreter.get_input_details()]
            self._outputs = [_spec(d) for d in interpreter.get_output_details()]
            self._input_indexes = [int(d["index"]) for d in interpreter.get_input_details()]
            self._output_indexes = [int(d["index"]) for d in interpreter.get_output_details()]
            self._input_index = self._input_indexes[0]
            self._output_index = self._output_indexes[0]
        except (ValueError, RuntimeError, IndexError, KeyError, TypeError) as exc:
            raise ModelRuntimeError(
                f"{source}: cannot read the model's input/output tensors: {exc}"
            ) from exc

    @classmethod
    def load(cls, path: Path, *, mapped: bool = False,
             input_shapes: InputShapes | None = None) -> LoadedModel:
        """Load a model file.

        By default the bytes are read and handed over (the runtime then checks the
        flatbuffer). `mapped=True` lets the runtime memory-map the file instead, so the
        model is not held twice in memory; use it only for files that already passed
        `preflight` and a digest check (the agent's installed slots).
        """
        if mapped:
            return cls._build_mapped(Path(path), input_shapes or {})
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ModelRuntimeError(f"cannot read model file {path}: {exc}") from exc
        return cls._build(data, source=str(path), input_shapes=input_shapes or {})

    @classmethod
    def _build_mapped(cls, path: Path, input_shapes: InputShapes) -> LoadedModel:
        if Interpreter is None:
            raise ModelRuntimeError(
                "no TFLite runtime is installed: pip install tflite-runtime (or ai-edge-litert)"
            )
        try:
            if path.stat().st_size == 0:
                raise ModelRuntimeError(f"{path}: model file is empty")
            interpreter = Interpreter(model_path=str(path), num_threads=1)
            _resize(interpreter, str(path), input_shapes)
            try:
                interpreter.allocate_tensors()
            except (ValueError, RuntimeError) as exc:
                _refuse_open_shapes(interpreter, str(path), input_shapes, exc)
                raise
        except OSError as exc:
            raise ModelRuntimeError(f"cannot read model file {path}: {exc}") from exc
        except (ValueError, RuntimeError) as exc:
            raise ModelRuntimeError(
                f"{path}: the TFLite runtime rejected the model: {exc}"
            ) from exc
        model = cls(interpreter, str(path), frozenset(input_shapes))
        if not model._inputs or not model._outputs:
            raise ModelRuntimeError(f"{path}: model has no inputs or no outputs")
        return model

    @classmethod
    def from_bytes(cls, data: bytes, input_shapes: InputShapes | None = None) -> LoadedModel:
        return cls._build(bytes(data), source="model bytes", input_shapes=input_shapes or {})

    @classmethod
    def _build(cls, data: bytes, source: str, input_shapes: InputShapes) -> LoadedModel:
        if Interpreter is None:
            raise ModelRuntimeError(
                "no TFLite runtime is installed: pip install tflite-runtime (or ai-edge-litert)"
            )
        if not data:
            raise ModelRuntimeError(f"{source}: model file is empty")
        try:
            interpreter = Interpreter(model_content=data, num_threads=1)
        except (ValueError, RuntimeError) as exc:
            raise ModelRuntimeError(
                f"{source}: model file is not a valid TFLite flatbuffer: {exc}"
            ) from exc
        _resize(interpreter, source, input_shapes)
        try:
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            _refuse_open_shapes(interpreter, source, input_shapes, exc)
            raise ModelRuntimeError(
                f"{source}: the TFLite runtime rejected the model graph "
                f"(unsupported op or inconsistent tensors): {exc}"
            ) from exc
        model = cls(interpreter, source, frozenset(input_shapes))
        if not model._inputs or not model._outputs:
            raise ModelRuntimeError(f"{source}: model has no inputs or no outputs")
        return model

    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self._outputs)

    def undeclared_dynamic_inputs(self) -> list[TensorSpec]:
        """Inputs with an open (-1) dimension that were given no run shape: the model
        runs them at a placeholder shape (often 1), which is rarely what it was made for."""
        return [s for s in self._inputs if s.dynamic and s.name not in self._declared]

    def reset_state(self) -> None:
        """Reset the model's resource variables (the state of a streaming model) to their
        initial values; nothing happens for a stateless model."""
        with self._lock:
            try:
                self._interpreter.reset_all_variables()
            except (ValueError, RuntimeError) as exc:
                raise ModelRuntimeError(f"{self._source}: cannot reset its state: {exc}") from exc

    def run(self, x: NDArray[Any]) -> NDArray[Any]:
        """Run one inference on the first input; return a copy of the first output."""
        spec = self._inputs[0]
        if not isinstance(x, np.ndarray):
            raise ModelRuntimeError(f"input must be a numpy array, got {type(x).__name__}")
        if tuple(x.shape) != spec.shape or x.dtype != spec.numpy_dtype:
            raise ModelRuntimeError(
                f"input {spec.name!r} expects shape {list(spec.shape)} dtype {spec.dtype}, "
                f"got shape {list(x.shape)} dtype {x.dtype.name}"
            )
        with self._lock:
            try:
                self._interpreter.set_tensor(self._input_index, x)
                self._interpreter.invoke()
                out = self._interpreter.get_tensor(self._output_index)
            except (ValueError, RuntimeError) as exc:
                raise ModelRuntimeError(f"{self._source}: inference failed: {exc}") from exc
        return np.array(out, copy=True)

    def run_all(self, inputs: Sequence[NDArray[Any]]) -> list[NDArray[Any]]:
        """Run one inference on every input (in the model's order); copies of every output.

        The caller has checked shapes and dtypes (edge_agent.serving validates requests);
        the interpreter is used by one caller at a time.
        """
        if len(inputs) != len(self._input_indexes):
            raise ModelRuntimeError(
                f"{self._source}: model takes {len(self._input_indexes)} inputs, "
                f"got {len(inputs)}"
            )
        with self._lock:
            try:
                for index, x in zip(self._input_indexes, inputs, strict=True):
                    self._interpreter.set_tensor(index, x)
                self._interpreter.invoke()
                return [np.array(self._interpreter.get_tensor(i), copy=True)
                        for i in self._output_indexes]
            except (ValueError, RuntimeError) as exc:
                raise ModelRuntimeError(f"{self._source}: inference failed: {exc}") from exc

    def generated_input(self, rng: np.random.Generator) -> NDArray[Any]:
        """Random data fitting the first input: floats in [-1, 1], integers over their range."""
        spec = self._inputs[0]
        dtype = spec.numpy_dtype
        if dtype.kind == "f":
            return rng.uniform(-1.0, 1.0, size=spec.shape).astype(dtype)
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            return rng.integers(
                int(info.min), int(info.max), size=spec.shape, dtype=dtype, endpoint=True
            )
        if dtype.kind == "b":
            return rng.integers(0, 2, size=spec.shape).astype(dtype)
        raise ModelRuntimeError(
            f"cannot generate input data for {spec.name!r} of dtype {spec.dtype}"
        )

    def smoke_test(self) -> NDArray[Any]:
        """Run the probe input once; the result identifies the model version.

        Float models get `probe_input` (reshaped to the input's shape); other dtypes a
        fixed-seed generated input. Non-finite float output fails the test: a model
        that answers NaN to a plain input is broken, whatever the runtime says.
        """
        spec = self._inputs[0]
        dtype = spec.numpy_dtype
        size = int(np.prod(spec.shape, dtype=np.int64))
        if dtype.kind == "f" and size >= 1:
            x = probe_input(size).reshape(spec.shape).astype(dtype)
        else:
            x = self.generated_input(np.random.default_rng(_SMOKE_SEED))
        try:
            out = self.run(x)
        except ModelRuntimeError as exc:
            _refuse_open_shapes(self._interpreter, self._source, self._declared, exc)
            raise
        if out.dtype.kind == "f" and not np.all(np.isfinite(out)):
            raise ModelRuntimeError(
                f"{self._source}: smoke inference produced non-finite output values"
            )
        return out


def _signature(specs: list[TensorSpec]) -> list[dict[str, Any]]:
    """Name, shape, dtype and quantization (scale 0.0: not quantized) of each tensor."""
    return [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype,
             "quantization": {"scale": s.quantization[0], "zero_point": s.quantization[1]}}
            for s in specs]


def describe(path: Path) -> dict[str, list[dict[str, Any]]]:
    """JSON-able input/output signature of the model at `path`."""
    model = LoadedModel.load(path)
    return {"inputs": _signature(model.inputs), "outputs": _signature(model.outputs)}


@dataclass(frozen=True)
class PreflightResult:
    signature: dict[str, list[dict[str, Any]]]  # as returned by `describe`
    smoke_output: NDArray[Any]


# Exit status the child uses for "ModelRuntimeError, message on the last stderr line".
_PREFLIGHT_REJECTED = 3


def preflight(path: Path, timeout: float = 120.0,
              input_shapes: InputShapes | None = None) -> PreflightResult:
    """Load and smoke-test `path` in a child process.

    A native crash then kills the child, not the agent, and comes back as a
    ModelRuntimeError like any other bad model.
    """
    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "edge_agent.runtime", str(path)]
    if input_shapes:
        cmd.append(json.dumps({k: [int(d) for d in v] for k, v in input_shapes.items()}))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        raise ModelRuntimeError(
            f"{path}: loading and smoke-testing the model took longer than {timeout:.0f}s"
        ) from exc
    if proc.returncode < 0:
        try:
            how = signal.Signals(-proc.returncode).name
        except ValueError:
            how = f"signal {-proc.returncode}"
        raise ModelRuntimeError(
            f"{path}: the TFLite runtime crashed ({how}) loading the model; the file is "
            "truncated, corrupt, or not a model this runtime supports"
        )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        detail = lines[-1] if lines else f"exit status {proc.returncode}"
        if proc.returncode != _PREFLIGHT_REJECTED:
            detail = f"model check process failed: {detail}"
        raise ModelRuntimeError(detail)
    try:
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        out = report["smoke_output"]
        smoke = np.asarray(out["values"], dtype=out["dtype"]).reshape(out["shape"])
        signature = {"inputs": report["inputs"], "outputs": report["outputs"]}
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise ModelRuntimeError(f"{path}: unreadable report from model check: {exc}") from exc
    return PreflightResult(signature=signature, smoke_output=smoke)


def _preflight_child(path: str, shapes: str = "") -> int:
    try:
        model = LoadedModel.load(Path(path), input_shapes=json.loads(shapes) if shapes else None)
        out = model.smoke_test()
    except ModelRuntimeError as exc:
        print(exc, file=sys.stderr)
        return _PREFLIGHT_REJECTED
    report = {
        "inputs": _signature(model.inputs),
        "outputs": _signature(model.outputs),
        "smoke_output": {
            "dtype": out.dtype.name,
            "shape": list(out.shape),
            "values": out.ravel().tolist(),
        },
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        print("usage: python -m edge_agent.runtime MODEL.tflite [INPUT_SHAPES_JSON]",
              file=sys.stderr)
        sys.exit(2)
    sys.exit(_preflight_child(*sys.argv[1:]))
