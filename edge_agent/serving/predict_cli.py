"""`edge-agent predict`: one call through the local inference API, for a person."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edge_agent.errors import AgentUnreachable, InferenceError
from edge_agent.serving.client import InferenceClient
from ledger.json_output import emit

EXIT_OK, EXIT_REFUSED, EXIT_BAD_FILE, EXIT_UNREACHABLE = 0, 1, 2, 3
_SHOWN_VALUES = 8
_POSITIONAL = re.compile(r"arr_(\d+)")


def load_inputs(path: Path) -> dict[str | int, NDArray[Any]]:
    """An .npy file is input 0; an .npz holds arrays by input name (`arr_N`: index N)."""
    loaded = np.load(path, allow_pickle=False)
    if isinstance(loaded, np.ndarray):
        return {0: loaded}
    with loaded:
        inputs: dict[str | int, NDArray[Any]] = {}
        for key in loaded.files:
            match = _POSITIONAL.fullmatch(key)
            inputs[int(match.group(1)) if match else key] = loaded[key]
        return inputs


def run_predict(path: Path, socket_path: Path, as_json: bool, timeout: float) -> int:
    err = Console(stderr=True)
    try:
        inputs = load_inputs(path)
    except (OSError, ValueError) as exc:
        err.print(f"[red]error:[/red] cannot read {escape(str(path))}: {escape(str(exc))}")
        return EXIT_BAD_FILE
    try:
        with InferenceClient(socket_path, timeout=timeout) as client:
            outputs = client.predict(inputs)
            model, version = client.served_by or ("", "")
    except AgentUnreachable as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        return EXIT_UNREACHABLE
    except InferenceError as exc:
        err.print(f"[red]refused:[/red] {escape(str(exc))}")
        return EXIT_REFUSED
    if as_json:
        # Checked against docs/schemas/edge-agent/predict.schema.json in tests.
        emit("edge-agent", {name: {"dtype": a.dtype.name, "shape": list(a.shape),
                                   "values": a.ravel().tolist()}
                            for name, a in outputs.items()})
        return EXIT_OK
    table = Table(title=f"{model}/{version}")
    table.add_column("output")
    table.add_column("dtype")
    table.add_column("shape")
    table.add_column(f"first {_SHOWN_VALUES} values")
    for name, a in outputs.items():
        values = a.ravel()[:_SHOWN_VALUES].tolist()
        more = " …" if a.size > _SHOWN_VALUES else ""
        table.add_row(name, a.dtype.name, str(list(a.shape)),
                      ", ".join(f"{v:.6g}" if isinstance(v, float) else str(v)
                                for v in values) + more)
    Console().print(table)
    return EXIT_OK
