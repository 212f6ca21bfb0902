"""The agent's local inference API (edge_agent.serving): protocol, validation,
concurrency, atomic model switches, telemetry, the client library and the CLI.

Most tests drive the server directly on a real LoadedModel from testkit/modelgen (a
server thread with its own event loop, clients in the test's threads); the last one
runs a hub and a real agent process and switches its model while an application calls.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from numpy.typing import NDArray

from edge_agent import protocol as proto
from edge_agent.errors import AgentUnreachable, InferenceError, InputRejected, NoModelLoaded
from edge_agent.runtime import LoadedModel
from edge_agent.serving import wire
from edge_agent.serving.client import InferenceClient
from edge_agent.serving.server import SOCKET_MODE, InferenceServer, Serving
from testkit.modelgen import make_two_head_model, model_for_version
from tests.device_kit import ReportWatch, configured_agent, deploy_and_wait
from tests.fleet import REPO_ROOT, Fleet

pytestmark = pytest.mark.timeout(60)

N_IN, N_OUT = 8, 4


def load(version: int) -> LoadedModel:
    return LoadedModel.from_bytes(model_for_version(version))


def serving(version: int) -> Serving:
    return Serving(load(version), {"model": "kws", "version": str(version),
                                   "digest": f"d{version}", "counter": version})


def row(seed: int) -> NDArray[np.float32]:
    return np.random.default_rng(seed).uniform(-1, 1, (1, N_IN)).astype(np.float32)


class ServerThread:
    """An InferenceServer on its own event loop in a thread, as inside the agent."""

    def __init__(self, path: Path, current: Serving | None, max_frame: int,
                 max_connections: int = 64) -> None:
        self.current = current
        self.calls: list[tuple[str, bool]] = []  # (version, ok), recorded on the loop
        self.loop = asyncio.new_event_loop()
        self.server = InferenceServer(path, lambda: self.current, self._on_call,
                                      max_frame=max_frame, max_connections=max_connections)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._run(self.server.start())

    def _on_call(self, s: Serving, latency_ms: float, ok: bool, outputs: Any) -> None:
        assert threading.current_thread() is self._thread  # telemetry stays on the loop
        self.calls.append((str(s.meta["version"]), ok))

    def counted(self) -> list[tuple[str, bool]]:
        """The calls counted once the server counted what it has queued (on the loop,
        as the agent does before closing a window): a call is queued before its reply
        is sent, so every call answered by now is in."""
        done: Future[None] = Future()

        def count() -> None:
            self.server.count_pending()
            done.set_result(None)

        self.loop.call_soon_threadsafe(count)
        done.result(5)
        return list(self.calls)

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def swap(self, new: Serving | None) -> None:
        """Switch models the way the agent does: one assignment on the loop."""
        done: Future[None] = Future()

        def assign() -> None:
            self.current = new
            done.set_result(None)

        self.loop.call_soon_threadsafe(assign)
        done.result(5)

    def stop(self) -> None:
        self._run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Short on purpose: a socket path holds at most 107 bytes (pytest's tmp_path is long).
    path = Path(tempfile.mkdtemp(prefix="fl-api-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def api(sock_dir: Path) -> Iterator[ServerThread]:
    server = ServerThread(sock_dir / "agent.sock", serving(1), max_frame=64 * 1024)
    try:
        yield server
    finally:
        server.stop()


def client_of(api: ServerThread) -> InferenceClient:
    return InferenceClient(api.server.path, timeout=10)


class RawConnection:
    """Frames by hand, to send what the client library never would."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))

    def send_body(self, body: bytes) -> None:
        self.sock.sendall(wire.HEADER.pack(len(body)) + body)

    def send(self, message: Any) -> None:
        self.send_body(msgpack.packb(message, use_bin_type=True))

    def reply(self) -> dict[Any, Any]:
        header = self._exactly(4)
        return wire.decode_body(self._exactly(wire.HEADER.unpack(header)[0]))

    def closed(self) -> bool:
        return self.sock.recv(1) == b""

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "connection closed"
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


def good_request(rid: int = 7) -> dict[str, Any]:
    return {"op": "predict", "id": rid, "inputs": {"input": wire.encode_tensor(row(rid))}}


# ---------------------------------------------------------------- answers


def test_predict_returns_what_the_interpreter_returns(api: ServerThread) -> None:
    direct = load(1)
    with client_of(api) as client:
        for seed in range(20):
            x = row(seed)
            expected = direct.run(x)
            for inputs in ({"input": x}, {0: x}, [x]):
                out = client.predict(inputs)  # type: ignore[arg-type]
                assert list(out) == ["output"]
                assert out["output"].dtype == np.float32
                np.testing.assert_array_equal(out["output"], expected)
        assert client.served_by == ("kws", "1")
    assert api.counted() == [("1", True)] * 60


def test_every_input_and_every_output_of_a_two_input_model(sock_dir: Path) -> None:
    """All inputs are read (by name, index or order), all outputs answered and all
    handed to telemetry; a missing or misshapen second input is refused by name."""
    rng = np.random.default_rng(9)
    data = make_two_head_model([(rng.normal(size=(3, 5)), rng.normal(size=3)),
                                (rng.normal(size=(2, 4)), rng.normal(size=2))],
                               shared_input=False)
    direct = LoadedModel.from_bytes(data)
    two = Serving(LoadedModel.from_bytes(data), {"model": "two", "version": "1"})
    seen: list[list[tuple[int, ...]]] = []
    api = ServerThread(sock_dir / "agent.sock", two, wire.MAX_FRAME_BYTES)
    api.server._on_call = lambda s, ms, ok, outs: seen.append(  # type: ignore[method-assign]
        [o.shape for o in outs or []])
    try:
        with client_of(api) as client:
            assert [i["name"] for i in client.info()["inputs"]] == ["in_a", "in_b"]
            for seed in range(5):
                r = np.random.default_rng(seed)
                a = r.normal(size=(1, 5)).astype(np.float32)
                b = r.normal(size=(1, 4)).astype(np.float32)
                expected = direct.run_all([a, b])
                for inputs in ({"in_a": a, "in_b": b}, {1: b, 0: a}, [a, b]):
                    out = client.predict(inputs)  # type: ignore[arg-type]
                    assert list(out) == ["out_a", "out_b"]
                    for got, want in zip(out.values(), expected, strict=True):
                        np.testing.assert_array_equal(got, want)
            with pytest.raises(InputRejected, match="missing input 'in_b'"):
                client.predict({"in_a": a})
            with pytest.raises(InputRejected, match=r"input 'in_b' expects shape \[1, 4\]"):
                client.predict([a, a])
        api.counted()
        assert seen == [[(1, 3), (1, 2)]] * 15  # both outputs of every call that ran
    finally:
        api.stop()


def test_info_and_health_describe_the_model(api: ServerThread) -> None:
    with client_of(api) as client:
        info = client.info()
        assert (info["model"], info["version"], info["digest"]) == ("kws", "1", "d1")
        assert info["inputs"] == [{"index": 0, "name": "input", "dtype": "float32",
                                   "shape": [1, N_IN],
                                   "quantization": {"scale": 0.0, "zero_point": 0}}]
        assert info["outputs"][0]["shape"] == [1, N_OUT]
        client.predict([row(1)])
        health = client.health()
        assert health["serving"] is True and health["version"] == "1"
        assert health["stats"]["calls"] == 1 and health["stats"]["connections"] == 1


def _tensor(x: NDArray[Any]) -> dict[str, Any]:
    return wire.encode_tensor(x)


def _nan_row() -> NDArray[np.float32]:
    x = row(3)
    x[0, 2] = np.nan
    return x


BAD_REQUESTS: list[tuple[str, Any, str, str]] = [
    ("unknown op", {"op": "train", "id": 1}, wire.UNKNOWN_OP, "unknown op 'train'"),
    ("no op", {"id": 1}, wire.UNKNOWN_OP, "unknown op None"),
    ("id not an integer", {"op": "info", "id": "x"}, wire.BAD_FRAME, "id must be"),
    ("not a map", [1, 2, 3], wire.BAD_FRAME, "must be a msgpack map"),
    ("wrong dtype", {"op": "predict", "id": 1,
                     "inputs": {"input": _tensor(row(1).astype(np.float64))}},
     wire.BAD_INPUT, "expects dtype float32, got float64"),
    ("wrong shape", {"op": "predict", "id": 1,
                     "inputs": {"input": _tensor(np.zeros((1, 9), np.float32))}},
     wire.BAD_INPUT, "expects shape [1, 8], got [1, 9]"),
    ("missing input", {"op": "predict", "id": 1, "inputs": {}},
     wire.BAD_INPUT, "missing input 'input'"),
    ("no inputs at all", {"op": "predict", "id": 1}, wire.BAD_INPUT, "inputs must be"),
    ("unknown input", {"op": "predict", "id": 1, "inputs": {"audio": _tensor(row(1))}},
     wire.BAD_INPUT, "unknown input 'audio'"),
    ("index out of range", {"op": "predict", "id": 1, "inputs": {3: _tensor(row(1))}},
     wire.BAD_INPUT, "index 3 out of range"),
    ("given twice", {"op": "predict", "id": 1,
                     "inputs": {"input": _tensor(row(1)), 0: _tensor(row(1))}},
     wire.BAD_INPUT, "given twice"),
    ("NaN", {"op": "predict", "id": 1, "inputs": [_tensor(_nan_row())]},
     wire.BAD_INPUT, "NaN or infinite"),
    ("short data", {"op": "predict", "id": 1, "inputs": [
        {"dtype": "float32", "shape": [1, 8], "data": b"\0" * 31}]},
     wire.BAD_INPUT, "needs 32 bytes of data, got 31"),
    ("odd dtype", {"op": "predict", "id": 1, "inputs": [
        {"dtype": "object", "shape": [1], "data": b"x"}]}, wire.BAD_INPUT, "dtype 'object'"),
    ("negative shape", {"op": "predict", "id": 1, "inputs": [
        {"dtype": "float32", "shape": [-1, 8], "data": b""}]}, wire.BAD_INPUT, "non-negative"),
]


@pytest.mark.parametrize(("request_", "code", "words"),
                         [pytest.param(r, c, w, id=name) for name, r, c, w in BAD_REQUESTS])
def test_a_bad_request_gets_a_clear_error_and_the_connection_stays_usable(
    api: ServerThread, request_: Any, code: str, words: str
) -> None:
    conn = RawConnection(api.server.path)
    try:
        conn.send(request_)
        reply = conn.reply()
        assert reply["ok"] is False and reply["code"] == code, reply
        assert words in reply["error"], reply["error"]
        conn.send(good_request(8))  # the same connection still answers
        ok = conn.reply()
        assert ok["ok"] is True and ok["id"] == 8
    finally:
        conn.close()
    assert api.server.stats.refused[code] == 1
    assert api.counted() == [("1", True)]  # refused requests never reach the model


def test_garbage_body_is_refused_and_the_connection_stays_usable(api: ServerThread) -> None:
    conn = RawConnection(api.server.path)
    try:
        conn.send_body(b"\xc1\xff\x00garbage")
        reply = conn.reply()
        assert (reply["ok"], reply["code"]) == (False, wire.BAD_FRAME)
        assert "not msgpack" in reply["error"]
        conn.send(good_request())
        assert conn.reply()["ok"] is True
    finally:
        conn.close()


@pytest.mark.parametrize("payload", [
    wire.HEADER.pack(64 * 1024 + 1) + b"\0" * 16,  # a frame over the limit
    bytes(range(256)) * 4,  # random bytes: the first four read as a huge length
], ids=["oversized frame", "garbage bytes"])
def test_broken_framing_is_answered_then_closed_and_a_new_connection_works(
    api: ServerThread, payload: bytes
) -> None:
    conn = RawConnection(api.server.path)
    try:
        conn.sock.sendall(payload)
        reply = conn.reply()
        assert (reply["ok"], reply["code"]) == (False, wire.FRAME_TOO_LARGE)
        assert "over the limit of 65536" in reply["error"]
        assert conn.closed()
    finally:
        conn.close()
    with client_of(api) as client:
        np.testing.assert_array_equal(client.predict([row(1)])["output"], load(1).run(row(1)))


def test_client_raises_typed_errors(api: ServerThread, sock_dir: Path) -> None:
    with client_of(api) as client:
        with pytest.raises(InputRejected, match="expects shape") as info:
            client.predict([np.zeros((2, 8), np.float32)])
        assert info.value.code == wire.BAD_INPUT
        with pytest.raises(InputRejected, match="over the limit"):
            client.predict([np.zeros((1, 20000), np.float32)])  # 80 KB > 64 KiB frames
        assert client.predict([row(2)])["output"].shape == (1, N_OUT)  # reconnected
        api.swap(None)
        with pytest.raises(NoModelLoaded, match="no model is installed"):
            client.predict([row(2)])
        assert client.health()["serving"] is False
    with pytest.raises(AgentUnreachable, match="no answer from the agent"):
        InferenceClient(sock_dir / "nobody.sock").health()
    assert issubclass(InferenceError, Exception) and issubclass(AgentUnreachable, InferenceError)


def test_socket_mode_stale_socket_and_cleanup(sock_dir: Path) -> None:
    path = sock_dir / "agent.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # left behind by a killed agent: nobody listens
    stale.close()
    first = ServerThread(path, serving(1), max_frame=wire.MAX_FRAME_BYTES)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == SOCKET_MODE
        with pytest.raises(InferenceError, match="already serves"):
            asyncio.run(InferenceServer(path, lambda: None, lambda *a: None).start())
    finally:
        first.stop()
    assert not path.exists()  # removed on stop


# ---------------------------------------------------------------- concurrency


def test_concurrent_clients_all_get_their_own_answers(api: ServerThread) -> None:
    direct = load(1)
    expected = {seed: direct.run(row(seed)) for seed in range(200)}

    def one_client(start: int) -> int:
        with client_of(api) as client:
            for seed in range(start, start + 25):
                np.testing.assert_array_equal(client.predict([row(seed)])["output"],
                                              expected[seed])
        return 25

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(one_client, range(0, 200, 25))) == 200
    calls = api.counted()
    assert len(calls) == 200 and all(ok for _, ok in calls)


def test_connections_over_the_limit_are_answered_busy_and_closed(sock_dir: Path) -> None:
    api = ServerThread(sock_dir / "agent.sock", serving(1), wire.MAX_FRAME_BYTES,
                       max_connections=2)
    try:
        first, second = client_of(api), client_of(api)
        first.predict([row(1)])
        second.predict([row(2)])  # two connections, each with its own thread
        third = RawConnection(api.server.path)
        reply = third.reply()  # answered without asking: there is no thread for it
        assert (reply["ok"], reply["code"]) == (False, wire.BUSY)
        assert "at most 2 connections" in reply["error"]
        assert third.closed()
        third.close()
        with pytest.raises(AgentUnreachable, match="at most 2"):
            client_of(api).health()
        first.close()  # a thread is free again once a caller hangs up
        _wait_until(lambda: api.server.stats.connections == 1)
        with client_of(api) as again:
            np.testing.assert_array_equal(again.predict([row(3)])["output"],
                                          load(1).run(row(3)))
        second.close()
        assert api.server.stats.refused[wire.BUSY] == 2
        assert api.counted() == [("1", True)] * 3
    finally:
        api.stop()


def test_a_busy_answer_is_given_when_the_agent_closed_before_the_request_went_out(
        sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race of the test above, forced: the agent answers BUSY and closes before the
    caller has sent its request, so the send fails (broken pipe); the caller still gets
    the agent's answer."""
    path = sock_dir / "busy.sock"
    answered = threading.Event()
    busy = {"ok": False, "code": wire.BUSY, "id": None,
            "error": "the agent serves at most 2 connections at once"}

    def turn_away(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        conn.sendall(wire.encode_frame(busy, wire.MAX_FRAME_BYTES))
        conn.close()
        answered.set()

    connect = InferenceClient._connected

    def connect_then_wait(self: InferenceClient) -> Any:
        out = connect(self)
        assert answered.wait(10)  # the agent has answered and closed: now send
        return out

    monkeypatch.setattr(InferenceClient, "_connected", connect_then_wait)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        thread = threading.Thread(target=turn_away, args=(listener,))
        thread.start()
        try:
            with pytest.raises(AgentUnreachable, match="at most 2") as caught:
                InferenceClient(path, timeout=10).health()
            assert caught.value.code == wire.BUSY
        finally:
            thread.join(10)


def test_model_switch_during_calls_is_atomic(api: ServerThread) -> None:
    directs = {"1": load(1), "2": load(2)}
    stop = threading.Event()
    seen: list[str] = []

    def caller(offset: int) -> int:
        calls = 0
        with client_of(api) as client:
            while not stop.is_set():
                seed = offset * 100_000 + calls
                out = client.predict([row(seed)])["output"]
                assert client.served_by is not None
                version = client.served_by[1]
                # Entirely the version that says it answered: never a mix, never a failure.
                np.testing.assert_array_equal(out, directs[version].run(row(seed)))
                seen.append(version)
                calls += 1
        return calls

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(caller, i) for i in range(4)]
        _wait_until(lambda: len(seen) >= 100)
        api.swap(serving(2))
        mark = len(seen)
        _wait_until(lambda: len(seen) >= mark + 100)
        api.swap(serving(1))  # a revert is the same swap
        mark = len(seen)
        _wait_until(lambda: len(seen) >= mark + 50)
        stop.set()
        total = sum(f.result(30) for f in futures)
    assert {"1", "2"} <= set(seen)
    calls = api.counted()
    assert len(calls) == total and all(ok for _, ok in calls)


def _wait_until(predicate: Any, timeout: float = 20.0) -> None:
    done = threading.Event()
    deadline = threading.Timer(timeout, done.set)
    deadline.start()
    try:
        while not predicate():
            assert not done.wait(0.01), "timed out"
    finally:
        deadline.cancel()


# ---------------------------------------------------------------- the CLI


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "edge_agent.cli", "predict", *args],
                          capture_output=True, text=True, timeout=60, env=env)


def test_predict_cli(api: ServerThread, sock_dir: Path) -> None:
    x = row(5)
    np.save(sock_dir / "x.npy", x)
    np.savez(sock_dir / "x.npz", input=x)
    np.save(sock_dir / "bad.npy", np.zeros((1, 3), np.float32))
    sock = str(api.server.path)
    done = _cli("--socket", sock, "--json", str(sock_dir / "x.npy"))
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)["output"]
    assert (got["dtype"], got["shape"]) == ("float32", [1, N_OUT])
    np.testing.assert_array_equal(np.asarray(got["values"], np.float32).reshape(1, N_OUT),
                                  load(1).run(x))
    table = _cli("--socket", sock, str(sock_dir / "x.npz"))
    assert table.returncode == 0 and "kws/1" in table.stdout and "float32" in table.stdout
    bad = _cli("--socket", sock, str(sock_dir / "bad.npy"))
    assert bad.returncode == 1 and "expects shape [1, 8]" in bad.stderr
    gone = _cli("--socket", str(sock_dir / "none.sock"), str(sock_dir / "x.npy"))
    assert gone.returncode == 3 and "no answer from the agent" in gone.stderr


# ---------------------------------------------------------------- a real agent


@pytest.mark.timeout(120)
async def test_real_agent_serves_calls_switches_atomically_and_counts_them(
    fleet: Fleet, model_files: dict[str, Path], sock_dir: Path
) -> None:
    device = "app-0"
    for version in ("1", "2"):
        await fleet.release_model(model_files[version], "kws", version)
    path = sock_dir / "agent.sock"
    agent = configured_agent(fleet, device, ["--api-socket", str(path)])
    agent.synthetic_load = False  # only the application's calls run the model
    directs = {v: LoadedModel.load(model_files[v]) for v in ("1", "2")}
    async with await fleet.client() as client:
        await client.call("device.enroll", {"device": device})
        reports = await ReportWatch.start(fleet.url_as(), device)
        agent.start()
        try:
            await deploy_and_wait(fleet, client, "1", [device])
            stop = threading.Event()
            seen: list[str] = []

            def application(offset: int) -> int:
                calls = 0
                with InferenceClient(path, timeout=10) as api:
                    while not stop.is_set():
                        x = row(offset * 100_000 + calls)
                        out = api.predict({"input": x})["output"]
                        assert api.served_by is not None
                        np.testing.assert_array_equal(out, directs[api.served_by[1]].run(x))
                        seen.append(api.served_by[1])
                        calls += 1
                return calls

            loop = asyncio.get_running_loop()
            apps = [loop.run_in_executor(None, application, i) for i in range(3)]
            while len(seen) < 50:
                await asyncio.sleep(0.02)
            await deploy_and_wait(fleet, client, "2", [device])  # while the calls run
            mark = len(seen)
            while len(seen) < mark + 50:
                await asyncio.sleep(0.02)
            stop.set()
            calls = sum(await asyncio.gather(*apps))
            assert seen[0] == "1" and seen[-1] == "2"

            def counted(_: object) -> bool:
                windows = {(r.boot, r.seq): r.count for r in reports.reports
                           if isinstance(r, proto.TelemetryWindow)}
                return sum(windows.values()) >= calls

            await reports.wait_for(counted, timeout=30, what=f"telemetry for {calls} calls")
            windows = {(r.boot, r.seq): r for r in reports.reports
                       if isinstance(r, proto.TelemetryWindow)}
            assert sum(w.count for w in windows.values()) == calls
            assert sum(w.errors for w in windows.values()) == 0
            by_version = {v: sum(w.count for w in windows.values() if w.version == v)
                          for v in ("1", "2")}
            assert by_version == {v: seen.count(v) for v in ("1", "2")}
        finally:
            await reports.close()
            agent.stop()
    assert not path.exists(), agent.log()  # the agent removed its socket on stop
