"""The agent's local inference API: a Unix-domain-socket server (asyncio).

Applications on the device send `predict`, `info` and `health` requests (the wire
format is edge_agent.serving.wire, specified in docs/PROTOCOL.md). The socket file is
made mode 0660 before the server listens, so who may call is who may open the file:
the agent's user and its group.

A call asks the agent for the model that serves *now* (`current()`: one reference to a
loaded model and its metadata, swapped by the agent in one assignment) and keeps that
reference until it is done, so a model switch never splits a call between versions.
The TFLite interpreter runs in a small thread pool (never on the event loop, where the
agent's NATS work runs); each interpreter takes one call at a time (its own lock).
Each call that ran the model is handed to `on_call` on the event loop, which counts it
in the telemetry window. A refused request (bad frame, op or input) is answered with an
error code, counted in `stats.refused`, and never reaches the model or the telemetry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from numpy.typing import NDArray

from edge_agent.errors import InferenceError, ModelRuntimeError
from edge_agent.runtime import LoadedModel
from edge_agent.serving import wire

log = logging.getLogger("edge_agent.serving")

SOCKET_MODE = 0o660
# sockaddr_un.sun_path holds 108 bytes on Linux, with the terminating NUL.
MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class Serving:
    """The model that answers calls, with the agent's metadata for it (model, version,
    digest, counter, drift_bins)."""

    model: LoadedModel
    meta: Mapping[str, Any]


@dataclass
class ServerStats:
    connections: int = 0  # open now
    calls: int = 0  # predict calls that ran the model (ok or not)
    model_errors: int = 0  # of those, the ones the runtime failed
    refused: Counter[str] = field(default_factory=Counter)  # by error code

    def to_map(self) -> dict[str, Any]:
        return {"connections": self.connections, "calls": self.calls,
                "model_errors": self.model_errors, "refused": dict(self.refused)}


OnCall = Callable[[Serving, float, bool, list[NDArray[Any]] | None], None]


class InferenceServer:
    def __init__(
        self,
        path: Path,
        current: Callable[[], Serving | None],
        on_call: OnCall,
        before_call: Callable[[Serving], None] | None = None,
        max_frame: int = wire.MAX_FRAME_BYTES,
        workers: int = 2,
    ) -> None:
        """`current` gives the serving model (None: nothing installed); `on_call` gets
        each call that ran (serving, model latency in ms, ok, outputs); `before_call`
        may raise ModelRuntimeError to fail a call (the agent's fault injection)."""
        self.path = Path(path)
        self._current = current
        self._on_call = on_call
        self._before_call = before_call
        self.max_frame = max_frame
        self.stats = ServerStats()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="inference")
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._inode: int | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind the socket (mode 0660), then listen. InferenceError if the path is
        unusable or another live process serves on it."""
        path = self.path
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise InferenceError(f"socket path {path} is {len(os.fsencode(path))} bytes, over "
                                 f"the system's {MAX_SOCKET_PATH}; choose a shorter one")
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            # Before listen(): until then nobody can connect, whatever the umask made.
            os.chmod(path, SOCKET_MODE)
            self._inode = os.stat(path).st_ino
            self._server = await asyncio.start_unix_server(
                self._serve, sock=sock, limit=64 * 1024)
        except OSError as exc:
            sock.close()
            raise InferenceError(f"cannot serve on {path}: {exc}") from exc
        log.info("local inference API on %s", path)

    async def stop(self) -> None:
        """Stop listening, close every connection, remove the socket file."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
        with contextlib.suppress(OSError):
            if self._inode is not None and os.stat(self.path).st_ino == self._inode:
                self.path.unlink()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ connections

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self.stats.connections += 1
        try:
            while True:
                try:
                    header = await reader.readexactly(wire.HEADER.size)
                except asyncio.IncompleteReadError:
                    return  # the caller hung up (between frames, or mid-header)
                try:
                    length = wire.frame_length(header, self.max_frame)
                except wire.WireError as exc:
                    # The body is not read: the framing is lost, so the connection closes.
                    writer.write(self._refuse(None, exc.code, str(exc)))
                    await writer.drain()
                    return
                body = await reader.readexactly(length)
                writer.write(await self._handle(body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the caller went away mid-frame
        except Exception:  # a bug here must not take the agent down
            log.exception("inference API connection failed")
        finally:
            self.stats.connections -= 1
            self._writers.discard(writer)
            writer.close()

    def _refuse(self, rid: Any, code: str, message: str,
                serving: Serving | None = None) -> bytes:
        self.stats.refused[code] += 1
        return self._error(rid, code, message, serving)

    def _error(self, rid: Any, code: str, message: str, serving: Serving | None) -> bytes:
        reply: dict[str, Any] = {"id": rid, "ok": False, "code": code, "error": message}
        if serving is not None:
            reply.update(_model_fields(serving))
        return wire.encode_frame(reply, self.max_frame)

    async def _handle(self, body: bytes) -> bytes:
        try:
            request = wire.decode_body(body)
        except wire.WireError as exc:
            return self._refuse(None, exc.code, str(exc))
        rid = request.get("id", 0)
        if not isinstance(rid, int) or isinstance(rid, bool):
            return self._refuse(None, wire.BAD_FRAME, f"id must be an integer, got {rid!r}")
        op = request.get("op")
        if op not in wire.OPS:
            return self._refuse(rid, wire.UNKNOWN_OP,
                                f"unknown op {op!r}; one of {', '.join(wire.OPS)}")
        serving = self._current()
        if op == wire.OP_HEALTH:
            reply = {"id": rid, "ok": True, "serving": serving is not None,
                     "stats": self.stats.to_map(),
                     **(_model_fields(serving) if serving is not None else {})}
            return wire.encode_frame(reply, self.max_frame)
        if serving is None:
            return self._refuse(rid, wire.NO_MODEL, "no model is installed on this device yet")
        if op == wire.OP_INFO:
            model = serving.model
            return wire.encode_frame(
                {"id": rid, "ok": True, **_model_fields(serving),
                 "digest": str(serving.meta.get("digest", "")),
                 "inputs": wire.describe_specs(model.inputs),
                 "outputs": wire.describe_specs(model.outputs)},
                self.max_frame)
        return await self._predict(rid, serving, request.get("inputs"))

    async def _predict(self, rid: int, serving: Serving, inputs: Any) -> bytes:
        model = serving.model
        try:
            arrays = wire.match_inputs(model.inputs, inputs)
        except wire.WireError as exc:
            return self._refuse(rid, exc.code, str(exc), serving)
        self.stats.calls += 1
        try:
            if self._before_call is not None:
                self._before_call(serving)
            loop = asyncio.get_running_loop()
            outputs, latency_ms = await loop.run_in_executor(self._pool, _timed_run,
                                                             model, arrays)
        except ModelRuntimeError as exc:
            self.stats.model_errors += 1
            self._on_call(serving, 0.0, False, None)
            return self._error(rid, wire.MODEL_ERROR, str(exc), serving)
        self._on_call(serving, latency_ms, True, outputs)
        reply = {"id": rid, "ok": True, **_model_fields(serving),
                 "outputs": {name: wire.encode_tensor(out) for name, out
                             in zip(wire.output_names(model.outputs), outputs, strict=True)},
                 "latency_ms": latency_ms}
        try:
            return wire.encode_frame(reply, self.max_frame)
        except wire.WireError as exc:
            return self._error(rid, wire.MODEL_ERROR, f"reply too large: {exc}", serving)


def _timed_run(model: LoadedModel, arrays: list[NDArray[Any]]) -> tuple[
        list[NDArray[Any]], float]:
    started = time.perf_counter()
    outputs = model.run_all(arrays)
    return outputs, (time.perf_counter() - started) * 1000.0


def _model_fields(serving: Serving) -> dict[str, str]:
    return {"model": str(serving.meta.get("model", "")),
            "version": str(serving.meta.get("version", ""))}


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by a process that is gone; refuse to touch a live one
    or anything that is not a socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise InferenceError(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:  # refused: nobody listens there any more
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise InferenceError(f"another process already serves on {path}")
