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
        object.__setattr__(self, "input_dtype", inputs.dtype.name)
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
    """Read an .npz with `inputs` and optional `labels` and `groups`.

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
            unknown = sorted(set(npz.files) - set(_DATASET_ARRAYS))
            if unknown:
                raise DatasetError(
                    f"{path}: unexpected arrays {unknown}; a validation set holds only "
                    f"'inputs' and optionally 'labels', 'groups' and 'sequences'"
                )
            if "inputs" not in npz.files:
                raise DatasetError(f"{path}: missing the 'inputs' array (N x features)")
            for name in npz.files:
                arrays[name] = npz[name]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        # allow_pickle=False makes object arrays a ValueError.
        raise DatasetError(f"{path}: cannot read the arrays: {exc}") from exc
    rows = int(arrays["inputs"].shape[0]) if arrays["inputs"].ndim else 0
    if rows > max_rows:
        raise DatasetError(f"{path}: {rows:,} rows, more than the limit of {max_rows:,}")
    try:
        return Dataset(arrays["inputs"], arrays.get("labels"), arrays.get("groups"),
                       arrays.get("sequences"))
    except DatasetError as exc:
        raise DatasetError(f"{path}: {exc}") from exc
