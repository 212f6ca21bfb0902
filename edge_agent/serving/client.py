"""A client for the agent's local inference API: plain sockets, no asyncio needed.

    from edge_agent.serving.client import InferenceClient

    with InferenceClient("/var/lib/fleetledger/state/agent.sock") as agent:
        print(agent.info()["inputs"])
        outputs = agent.predict({"input": np.zeros((1, 8), np.float32)})

Every failure is an `edge_agent.errors.InferenceError`: `InputRejected` (the request
was refused; the message says which input and why), `NoModelLoaded`, `ModelFailed`,
`AgentUnreachable` (no agent on the socket, or the connection broke; the next call
connects again). One client keeps one connection; it may be shared between threads
(calls take turns), or each thread may have its own for calls in parallel.
"""

from __future__ import annotations

import io
import itertools
import socket
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_agent.errors import (
    AgentUnreachable,
    InferenceError,
    InputRejected,
    ModelFailed,
    NoModelLoaded,
)
from edge_agent.serving import wire

__all__ = ["InferenceClient"]

_ERRORS: dict[str, type[InferenceError]] = {
    wire.NO_MODEL: NoModelLoaded,
    wire.MODEL_ERROR: ModelFailed,
    wire.INTERNAL: InferenceError,
    wire.BUSY: AgentUnreachable,  # no connection to be had now; a later call may get one
}

Inputs = Mapping[str | int, NDArray[Any]] | Sequence[NDArray[Any]]


class InferenceClient:
    def __init__(self, socket_path: str | Path, timeout: float = 30.0,
                 max_frame: int = wire.MAX_FRAME_BYTES) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self.max_frame = max_frame
        self._sock: socket.socket | None = None
        self._reader: io.BufferedReader | None = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        # (model, version) that answered the last predict call on this client.
        self.served_by: tuple[str, str] | None = None

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # ------------------------------------------------------------ the API

    def predict(self, inputs: Inputs) -> dict[str, NDArray[Any]]:
        """Run the installed model once. `inputs`: arrays by input name or index, or a
        list in the model's input order, each of the model's exact dtype and shape.
        Returns the outputs by name, in the model's output order."""
        if isinstance(inputs, Mapping):
            tensors: Any = {k: wire.encode_tensor(np.asarray(v)) for k, v in inputs.items()}
        else:
            tensors = [wire.encode_tensor(np.asarray(v)) for v in inputs]
        reply = self.call(wire.OP_PREDICT, inputs=tensors)
        self.served_by = (str(reply.get("model", "")), str(reply.get("version", "")))
        outputs = reply.get("outputs")
        if not isinstance(outputs, dict):
            raise InferenceError("the agent's reply has no outputs map", wire.BAD_FRAME)
        try:
            return {str(k): wire.decode_tensor(v, f"output {k!r}") for k, v in outputs.items()}
        except wire.WireError as exc:
            raise InferenceError(f"the agent's reply is malformed: {exc}", exc.code) from exc

    def info(self) -> dict[str, Any]:
        """Model name, version, digest, and the inputs and outputs (name, dtype, shape,
        quantization scale and zero point)."""
        return self.call(wire.OP_INFO)

    def health(self) -> dict[str, Any]:
        """Whether a model serves (`serving`), which one, and the server's counters."""
        return self.call(wire.OP_HEALTH)

    # ------------------------------------------------------------ transport

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """One request/reply; the reply map if ok, else the matching InferenceError."""
        with self._lock:
            rid = next(self._ids)
            request = wire.encode_frame({"op": op, "id": rid, **fields}, self.max_frame)
            try:
                sock, reader = self._connected()
                unsent: OSError | None = None
                try:
                    sock.sendall(request)
                except (BrokenPipeError, ConnectionResetError) as exc:
                    # An agent that turns a connection away (BUSY) answers and closes
                    # without reading: its answer can be waiting although the send failed.
                    unsent = exc
                try:
                    length = wire.frame_length(_read_exactly(reader, wire.HEADER.size),
                                               self.max_frame)
                    reply = wire.decode_body(_read_exactly(reader, length))
                except OSError:
                    if unsent is not None:
                        raise unsent from None  # nothing was waiting: the send's error
                    raise
            except wire.WireError as exc:
                self.close()
                raise InferenceError(f"the agent's reply is malformed: {exc}",
                                     exc.code) from exc
            except OSError as exc:
                self.close()
                raise AgentUnreachable(
                    f"no answer from the agent on {self.socket_path}: {exc}") from exc
        if reply.get("ok") is True:
            return reply
        code = str(reply.get("code", ""))
        message = str(reply.get("error", "the agent refused the request"))
        if code in (wire.FRAME_TOO_LARGE, wire.BUSY):
            self.close()  # the agent closes a connection whose framing it gave up on
        raise _ERRORS.get(code, InputRejected)(message, code)

    def _connected(self) -> tuple[socket.socket, io.BufferedReader]:
        if self._sock is None or self._reader is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.socket_path)
            except OSError:
                sock.close()
                raise
            self._sock = sock
            # Buffered: a reply's header and body usually come in one recv().
            self._reader = io.BufferedReader(socket.SocketIO(sock, "rb"), 64 * 1024)
        return self._sock, self._reader


def _read_exactly(reader: io.BufferedReader, n: int) -> bytes:
    data = reader.read(n)
    if len(data) < n:
        raise ConnectionResetError("the agent closed the connection")
    return data
