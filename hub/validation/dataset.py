"""The validation data: `Dataset` (checked, normalised arrays with a content digest) and
`load_dataset`, which reads an .npz within size limits and never unpickles."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import blake3
import numpy as np
from numpy.typing import NDArray

from hub.validation.errors import DatasetError
from ledger.encoding import canonical_encode

DEFAULT_MAX_DATASET_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_ROWS = 100_000
_DATASET_ARRAYS = ("inputs", "labels", "groups", "sequences")
_DATASET_DOMAIN = b"fleetledger/validation-dataset\x00"


def _require_finite(name: str, values: NDArray[Any]) -> None:
    if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
        bad = int(np.count_nonzero(~np.isfinite(values)))
        raise DatasetError(f"{name} contain {bad} NaN or infinite values")


# A multi-input data set names each array `inputs/<tensor name>` (np.savez(path,
# **{"inputs/in_a": a, "inputs/in_b": b})); a one-input set may keep the plain `inputs`.
INPUT_PREFIX = "inputs/"
MAX_NAMED_INPUTS = 16


@dataclass(frozen=True)
class InputPart:
    """One named input of a multi-input data set: its columns in the flattened
    `Dataset.inputs` are [start, start + prod(row_shape)); `dtype` is the dtype it was
    given in (integers of the tensor's own dtype are fed as they are)."""

    name: str
    row_shape: tuple[int, ...]
    dtype: str
    start: int

    @property
    def size(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64))


@dataclass(frozen=True, eq=False)
class Dataset:
    """Validation rows: `inputs` (N, *features) float64, optional `labels` (N,) numeric,
    `groups` (N,) as text and `sequences` (N,) as text. The constructor checks and
    normalises its arguments.

    `sequences` declares a streaming model's sequences: rows with the same id form one
    sequence, run in their order in the file with the model's state reset before it
    (without it, every row is a sequence of its own). `input_dtype` is the dtype the
    inputs were given in: integer inputs of the model's own integer dtype are fed as
    they are, never re-quantized."""

    inputs: NDArray[Any]  # stored as float64
    labels: NDArray[Any] | None = None
    groups: NDArray[np.str_] | None = None
    sequences: NDArray[np.str_] | None = None
    input_dtype: str = field(init=False, default="")  # set by the constructor
    # Multi-input sets (`from_named`): `inputs` is then (N, total features), every named
    # input flattened and concatenated in name order; () for a one-input set.
    parts: tuple[InputPart, ...] = ()

    @classmethod
    def from_named(cls, named: dict[str, NDArray[Any]], labels: NDArray[Any] | None = None,
                   groups: NDArray[Any] | None = None,
                   sequences: NDArray[Any] | None = None) -> Dataset:
        """A data set of several named inputs, each (N, *features) of its own dtype."""
        if not named:
            raise DatasetError("no inputs")
        if len(named) > MAX_NAMED_INPUTS:
            raise DatasetError(f"{len(named)} named inputs, more than {MAX_NAMED_INPUTS}")
        parts: list[InputPart] = []
        columns: list[NDArray[np.float64]] = []
        start, rows = 0, None
        for name in sorted(named):
            if not name:
                raise DatasetError(f"an input array is named {INPUT_PREFIX!r} without a "
                                   "tensor name after it")
            one = cls(named[name])  # the same checks as a one-input set's
            if rows is not None and len(one) != rows:
                raise DatasetError(f"input {name!r} has {len(one)} rows, the other inputs "
                                   f"have {rows}; every input needs one row per example")
            rows = len(one)
            part = InputPart(name, tuple(int(d) for d in one.inputs.shape[1:]),
                             one.input_dtype, start)
            parts.append(part)
            columns.append(one.inputs.reshape(rows, -1))
            start += part.size
        return cls(np.concatenate(columns, axis=1), labels, groups, sequences,
                   tuple(parts))

    def __post_init__(self) -> None:
        inputs = np.asarray(self.inputs)
        if inputs.dtype.kind not in "biuf":
            raise DatasetError(f"inputs must be numeric, got dtype {inputs.dtype}")
        if inputs.ndim < 2 or inputs.shape[0] == 0:
            raise DatasetError(
                f"inputs must have shape (N, features...) with N >= 1, got {list(inputs.shape)}"
            )
        _require_finite("inputs", inputs)
        n = int(inputs.shape[0])
        object.__setattr__(self, "input_dtype", inputs.dtype.name if not self.parts else "")
        object.__setattr__(self, "inputs", inputs.astype(np.float64))
        if self.labels is not None:
            labels = np.asarray(self.labels)
            if labels.dtype.kind not in "biuf":
                raise DatasetError(
                    f"labels must be integer class ids or float targets, got dtype {labels.dtype}"
                )
            if labels.shape != (n,):
                raise DatasetError(
                    f"labels must have shape ({n},) to match {n} input rows, "
                    f"got {list(labels.shape)}"
                )
            _require_finite("labels", labels)
            object.__setattr__(self, "labels", labels)
        if self.groups is not None:
            groups = np.asarray(self.groups)
            if groups.dtype.kind not in "biuUS":
                raise DatasetError(f"groups must be integers or strings, got dtype {groups.dtype}")
            if groups.shape != (n,):
                raise DatasetError(
                    f"groups must have shape ({n},) to match {n} input rows, "
                    f"got {list(groups.shape)}"
                )
            object.__setattr__(self, "groups", groups.astype(np.str_))
        if self.sequences is not None:
            sequences = np.asarray(self.sequences)
            if sequences.dtype.kind not in "iuUS" or sequences.shape != (n,):
                raise DatasetError(
                    f"sequences must be integer or string ids of shape ({n},), one per input "
                    f"row, got dtype {sequences.dtype} shape {list(sequences.shape)}")
            object.__setattr__(self, "sequences", sequences.astype(np.str_))

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @cached_property
    def digest(self) -> str:
        """BLAKE3 hex over the normalised arrays (dtype, shape, bytes), not the file:
        the same data gives the same digest however the .npz was compressed."""
        doc: dict[str, Any] = {}
        if self.input_dtype and np.dtype(self.input_dtype).kind in "iu":
            doc["input_dtype"] = self.input_dtype  # fed natively: part of the data
        if self.parts:  # which columns are which input, and in what dtype it came
            doc["parts"] = [[p.name, list(p.row_shape), p.dtype] for p in self.parts]
        for name in _DATASET_ARRAYS:
            arr = getattr(self, name)
            if arr is not None:
                arr = np.ascontiguousarray(arr)
                doc[name] = {
                    "dtype": arr.dtype.str,
                    "shape": list(arr.shape),
                    "data": arr.tobytes(),
                }
        return blake3.blake3(_DATASET_DOMAIN + canonical_encode(doc)).hexdigest()


def load_dataset(
    path: Path, *, max_bytes: int = DEFAULT_MAX_DATASET_BYTES, max_rows: int = DEFAULT_MAX_ROWS
) -> Dataset:
    """Read an .npz with `inputs` (or, for a model with several inputs, one array
    `inputs/<tensor name>` per input) and optional `labels`, `groups` and `sequences`.

    `max_bytes` bounds the file and the unpacked size of every array in it (an .npz is
    a zip, so a small file can unpack to a huge array). Pickled (object) arrays are
    refused, never unpickled.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DatasetError(f"cannot read validation data {path}: {exc}") from exc
    if size > max_bytes:
        raise DatasetError(
            f"{path}: validation data is {size:,} bytes, more than the limit of {max_bytes:,}"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"{path}: not an .npz file (numpy.savez): {exc}") from exc
    for info in members:
        if info.file_size > max_bytes:
            raise DatasetError(
                f"{path}: array {info.filename!r} unpacks to {info.file_size:,} bytes, "
                f"more than the limit of {max_bytes:,}"
            )
    arrays: dict[str, NDArray[Any]] = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            named = [f for f in npz.files if f.startswith(INPUT_PREFIX)]
            unknown = sorted(set(npz.files) - set(_DATASET_ARRAYS) - set(named))
            if unknown:
                raise DatasetError(
                    f"{path}: unexpected arrays {unknown}; a validation set holds only "
                    f"'inputs' (or 'inputs/<tensor name>' per input) and optionally "
                    f"'labels', 'groups' and 'sequences'"
                )
            if named and "inputs" in npz.files:
                raise DatasetError(f"{path}: both 'inputs' and {named[:3]}: give one "
                                   "'inputs' array or one 'inputs/<tensor name>' per input")
            if not named and "inputs" not in npz.files:
                raise DatasetError(f"{path}: missing the 'inputs' array (N x features), or "
                                   "'inputs/<tensor name>' arrays for a multi-input model")
            for name in npz.files:
                arrays[name] = npz[name]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        # allow_pickle=False makes object arrays a ValueError.
        raise DatasetError(f"{path}: cannot read the arrays: {exc}") from exc
    named_arrays = {k[len(INPUT_PREFIX):]: v for k, v in arrays.items()
                    if k.startswith(INPUT_PREFIX)}
    for a in named_arrays.values() or [arrays["inputs"]]:
        rows = int(a.shape[0]) if a.ndim else 0
        if rows > max_rows:
            raise DatasetError(f"{path}: {rows:,} rows, more than the limit of {max_rows:,}")
    extra = (arrays.get("labels"), arrays.get("groups"), arrays.get("sequences"))
    try:
        if named_arrays:
            return Dataset.from_named(named_arrays, *extra)
        return Dataset(arrays["inputs"], *extra)
    except DatasetError as exc:
        raise DatasetError(f"{path}: {exc}") from exc
