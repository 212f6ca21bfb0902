"""The agent's local inference API: a Unix-domain-socket server.

Applications on the device send `predict`, `info` and `health` requests (the wire
format is edge_agent.serving.wire, specified in docs/PROTOCOL.md). The socket file is
made mode 0660 before the server listens, so who may call is who may open the file:
the agent's user and its group.

Each connection is served by a thread of its own with blocking socket I/O: the request
is read, checked, run on the interpreter and answered in that thread, with no hop
through the agent's event loop (the hop to a worker thread and back cost ~70 us a call,
more than a small model's inference; docs/BENCHMARKS.md). Only accepting connections
happens on the event loop. At most `max_connections` are served at once; one more is
answered `busy` and closed.

A call asks the agent for the model that serves *now* (`current()`: one reference to a
loaded model and its metadata, swapped by the agent in one assignment) and keeps that
reference until it is done, so a model switch never splits a call between versions.
Each interpreter takes one call at a time (its own lock).

Each call that ran the model is queued for `on_call`, which runs on the event loop
(the agent's telemetry and health windows live there and are not thread-safe). The
queue is a deque (appends are atomic, no lock) drained on the loop at most COUNT_DELAY
after a call, or at once by `count_pending` (the agent calls it before closing a
telemetry window; stop calls it too). A call is queued before its reply is sent.

A refused request (bad frame, op or input) is answered with an error code, counted in
`stats.refused`, and never reaches the model or the telemetry.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import logging
import os
import socket
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
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
# Connections served at once (one thread each); more are answered `busy` and closed.
MAX_CONNECTIONS = 64
# Seconds between the first call after a drain and the drain that counts it (and the
# calls after it) in telemetry: small against any telemetry or health window.
COUNT_DELAY = 0.02
# Read buffer per connection: a small request arrives in one recv() with its header.
_READ_BUFFER = 64 * 1024


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


class _Connection:
    """One connection's socket and counters. Only its own thread writes the counters
    (no lock per call); `InferenceServer.stats` adds them up."""

    __slots__ = ("calls", "model_errors", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.calls = 0
        self.model_errors = 0


OnCall = Callable[[Serving, float, bool, list[NDArray[Any]] | None], None]
_Record = tuple[Serving, float, bool, list[NDArray[Any]] | None]


class InferenceServer:
    def __init__(
        self,
        path: Path,
        current: Callable[[], Serving | None],
        on_call: OnCall,
        before_call: Callable[[Serving], None] | None = None,
        max_frame: int = wire.MAX_FRAME_BYTES,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        """`current` gives the serving model (None: nothing installed), from any
        thread; `on_call` gets each call that ran (serving, model latency in ms, ok,
        outputs), on the event loop; `before_call` may raise ModelRuntimeError to fail
        a call (the agent's fault injection; it runs in the connection's thread)."""
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        self.path = Path(path)
        self._current = current
        self._on_call = on_call
        self._before_call = before_call
        self.max_frame = max_frame
        self.max_connections = max_connections
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._inode: int | None = None
        # Guards the connection registry, the closed connections' totals and `refused`
        # (taken per connection and per refusal, never per good call).
        self._lock = threading.Lock()
        self._connections: dict[_Connection, threading.Thread] = {}
        self._closed = ServerStats()
        self._pending: collections.deque[_Record] = collections.deque()
        self._drain_scheduled = False

    @property
    def stats(self) -> ServerStats:
        """The counters now: open connections, and calls of open and closed ones."""
        with self._lock:
            live = list(self._connections)
            return ServerStats(
                connections=len(live),
                calls=self._closed.calls + sum(c.calls for c in live),
                model_errors=self._closed.model_errors + sum(c.model_errors for c in live),
                refused=Counter(self._closed.refused))

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
            sock.listen(128)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise InferenceError(f"cannot serve on {path}: {exc}") from exc
        self._loop = asyncio.get_running_loop()
        self._listener = sock
        self._accepting = self._loop.create_task(self._accept(sock), name="inference-accept")
        log.info("local inference API on %s", path)

    async def stop(self) -> None:
        """Stop listening, close every connection (their threads end), count the calls
        still queued, remove the socket file."""
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
            self._accepting = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            connections = dict(self._connections)
        for conn in connections:
            # Wakes the thread blocked in recv() (it reads end of file) and ends it.
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        for thread in connections.values():
            await asyncio.to_thread(thread.join, 2.0)
        with contextlib.suppress(OSError):
            if self._inode is not None and os.stat(self.path).st_ino == self._inode:
                self.path.unlink()
        self.count_pending()  # calls answered just before the stop are counted too

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE and the like: log, breathe, go on
                log.warning("inference API cannot accept a connection: %s", exc)
                await asyncio.sleep(0.1)
                continue
            sock.setblocking(True)
            conn = _Connection(sock)
            with self._lock:
                full = len(self._connections) >= self.max_connections
                if not full:
                    thread = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                              name="inference-connection")
                    self._connections[conn] = thread
            if full:
                # Answered off the loop: a caller that does not read must not block it.
                await asyncio.to_thread(self._turn_away, sock)
                continue
            thread.start()

    def _turn_away(self, sock: socket.socket) -> None:
        try:
            sock.settimeout(1.0)
            sock.sendall(self._refuse(None, wire.BUSY,
                                      f"the agent serves at most {self.max_connections} "
                                      "connections at once; close one or try again later"))
        except OSError:
            pass
        finally:
            sock.close()

    # ------------------------------------------------------------ connections

    def _serve(self, conn: _Connection) -> None:
        sock = conn.sock
        reader = io.BufferedReader(socket.SocketIO(sock, "rb"), _READ_BUFFER)
        try:
            while True:
                header = reader.read(wire.HEADER.size)
                if len(header) < wire.HEADER.size:
                    return  # the caller hung up (between frames, or mid-header)
                try:
                    length = wire.frame_length(header, self.max_frame)
                except wire.WireError as exc:
                    # The body is not read: the framing is lost, so the connection closes.
                    sock.sendall(self._refuse(None, exc.code, str(exc)))
                    return
                body = reader.read(length)
                if len(body) < length:
                    return  # the caller went away mid-frame
                sock.sendall(self._handle(conn, body))
        except OSError:
            pass  # the caller went away, or stop() shut the socket
        except Exception:  # a bug here must not take the agent down
            log.exception("inference API connection failed")
        finally:
            with self._lock:
                self._connections.pop(conn, None)
                self._closed.calls += conn.calls
                self._closed.model_errors += conn.model_errors
            reader.close()
            sock.close()

    def _refuse(self, rid: Any, code: str, message: str,
                serving: Serving | None = None) -> bytes:
        with self._lock:
            self._closed.refused[code] += 1
        return self._error(rid, code, message, serving)

    def _error(self, rid: Any, code: str, message: str, serving: Serving | None) -> bytes:
        reply: dict[str, Any] = {"id": rid, "ok": False, "code": code, "error": message}
        if serving is not None:
            reply.update(_model_fields(serving))
        return wire.encode_frame(reply, self.max_frame)

    def _handle(self, conn: _Connection, body: bytes) -> bytes:
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
        return self._predict(conn, rid, serving, request.get("inputs"))

    def _predict(self, conn: _Connection, rid: int, serving: Serving, inputs: Any) -> bytes:
        model = serving.model
        try:
            arrays = wire.match_inputs(model.inputs, inputs)
        except wire.WireError as exc:
            return self._refuse(rid, exc.code, str(exc), serving)
        conn.calls += 1
        try:
            if self._before_call is not None:
                self._before_call(serving)
            outputs, latency_ms = _timed_run(model, arrays)
        except ModelRuntimeError as exc:
            conn.model_errors += 1
            self._post((serving, 0.0, False, None))
            return self._error(rid, wire.MODEL_ERROR, str(exc), serving)
        self._post((serving, latency_ms, True, outputs))
        reply = {"id": rid, "ok": True, **_model_fields(serving),
                 "outputs": {name: wire.encode_tensor(out) for name, out
                             in zip(wire.output_names(model.outputs), outputs, strict=True)},
                 "latency_ms": latency_ms}
        try:
            return wire.encode_frame(reply, self.max_frame)
        except wire.WireError as exc:
            return self._error(rid, wire.MODEL_ERROR, f"reply too large: {exc}", serving)

    # ------------------------------------------------------------ telemetry hand-off

    def _post(self, record: _Record) -> None:
        """Queue a call for `on_call` on the loop. The loop is woken only by the first
        call after a drain, and then drains after COUNT_DELAY: waking it for every
        call cost 55-115 us a call (two threads taking turns at the interpreter lock),
        more than the rest of the call's overhead. A drain clears the flag before it
        empties the queue, so a record is never left behind: either its thread sees
        the flag of a drain still to come, or it schedules one."""
        self._pending.append(record)
        if not self._drain_scheduled and self._loop is not None:
            self._drain_scheduled = True
            with contextlib.suppress(RuntimeError):  # the loop is closed: shutting down
                self._loop.call_soon_threadsafe(self._loop.call_later, COUNT_DELAY,
                                                self.count_pending)

    def count_pending(self) -> None:
        """Hand every queued call to `on_call` now (on the event loop). The agent
        calls it before it closes a telemetry window; a call is queued before its
        reply is sent, so once a reply is in, this counts that call."""
        self._drain_scheduled = False
        while True:
            try:
                record = self._pending.popleft()
            except IndexError:
                return
            try:
                self._on_call(*record)
            except Exception:  # one bad record must not lose the others
                log.exception("counting an inference API call failed")


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
