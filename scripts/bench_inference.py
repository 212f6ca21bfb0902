"""Local inference API overhead: calls through the agent's socket vs the interpreter.

One run, two processes, as on a device: a server process runs the agent's
InferenceServer (edge_agent.serving.server) on a model from testkit/modelgen, and this
process is the application. It times, in alternating blocks so both see the same
machine, (a) `LoadedModel.run_all` on its own interpreter of the same model, in this
process, and (b) `InferenceClient.predict` through the socket. Latency is per call,
wall clock at the caller; the rate is calls per second of one caller in a loop. The
server counts every call as the agent does (a TelemetryWindowBuilder on its event loop,
with drift bins for up to 64 output values), so telemetry's cost is in the API numbers.

Models: `dense` is one FULLY_CONNECTED layer of 512x512 float32 weights (1 MiB of
weights that every call multiplies), `padded` the 8x4 test model padded to 1 MiB
(the file is as large, the compute is nearly nothing: the API's cost shows alone).

    .venv/bin/python scripts/bench_inference.py [--calls 5000] [--blocks 5]

Target (issue 14): the API adds at most 0.2 ms p50 and keeps >= 0.8x the direct rate.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from edge_agent.runtime import LoadedModel  # noqa: E402
from edge_agent.serving.client import InferenceClient  # noqa: E402
from edge_agent.serving.server import InferenceServer, Serving  # noqa: E402
from edge_agent.telemetry import TelemetryWindowBuilder  # noqa: E402
from testkit.modelgen import model_for_version  # noqa: E402

MODELS = {
    "dense 512x512 (1 MiB weights)": lambda: model_for_version(1, n_in=512, n_out=512),
    "8x4 padded to 1 MiB": lambda: model_for_version(1, extra_bytes=1 << 20),
}


def serve(model_path: Path, socket_path: Path) -> None:
    """The server process: serve until SIGTERM; print READY once listening."""
    model = LoadedModel.load(model_path, mapped=True)
    current = Serving(model, {"model": "bench", "version": "1"})
    window = TelemetryWindowBuilder()
    values = int(np.prod(model.outputs[0].shape))
    window.set_drift_bins([[float(e) for e in np.linspace(-4.0, 4.0, 11)]] * min(values, 64))

    def count(_: Serving, latency_ms: float, ok: bool, outputs: list[Any] | None) -> None:
        window.record(latency_ms, ok, outputs)
        if window.count >= 10_000:
            window.take()

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        server = InferenceServer(socket_path, lambda: current, count)
        await server.start()
        print("READY", flush=True)
        await stop.wait()
        await server.stop()

    asyncio.run(main())


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def bench_model(name: str, data: bytes, calls: int, blocks: int, work: Path) -> list[str]:
    model_path = work / "model.tflite"
    model_path.write_bytes(data)
    socket_path = work / "bench.sock"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(model_path), str(socket_path)],
        stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "READY":
            raise SystemExit("the server process did not start")
        direct = LoadedModel.load(model_path)
        spec = direct.inputs[0]
        x = np.random.default_rng(0).uniform(-1, 1, spec.shape).astype(spec.numpy_dtype)
        lat: dict[str, list[float]] = {"direct": [], "api": []}
        spent: dict[str, float] = {"direct": 0.0, "api": 0.0}
        with InferenceClient(socket_path) as client:
            np.testing.assert_array_equal(client.predict([x])["output"], direct.run(x))
            for _ in range(200):  # warm both paths
                direct.run_all([x])
                client.predict([x])
            per_block = max(1, calls // blocks)
            for _ in range(blocks):
                for how, call in (("direct", lambda: direct.run_all([x])),
                                  ("api", lambda: client.predict([x]))):
                    block_start = time.perf_counter()
                    for _ in range(per_block):
                        t0 = time.perf_counter()
                        call()
                        lat[how].append((time.perf_counter() - t0) * 1000.0)
                    spent[how] += time.perf_counter() - block_start
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(10)
    d50, a50 = percentile(lat["direct"], 50), percentile(lat["api"], 50)
    d99, a99 = percentile(lat["direct"], 99), percentile(lat["api"], 99)
    d_rate, a_rate = len(lat["direct"]) / spent["direct"], len(lat["api"]) / spent["api"]
    ratio = a_rate / d_rate
    added = a50 - d50
    meets = "yes" if added <= 0.2 and ratio >= 0.8 else "no"
    return [name, f"{len(data) / 1e6:.2f}", f"{d_rate:,.0f}", f"{a_rate:,.0f}", f"{ratio:.2f}x",
            f"{d50:.3f} / {d99:.3f}", f"{a50:.3f} / {a99:.3f}", f"{added:+.3f}", meets]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=5000, help="calls per path per model")
    p.add_argument("--blocks", type=int, default=5, help="alternating blocks")
    p.add_argument("--serve", nargs=2, metavar=("MODEL", "SOCKET"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), Path(args.serve[1]))
        return
    table = Table(title=f"Local inference API vs direct interpreter, {args.calls} calls each, "
                  "one caller")
    for column in ("model", "file MB", "direct calls/s", "API calls/s", "API/direct",
                   "direct p50 / p99 ms", "API p50 / p99 ms", "added p50 ms",
                   "meets target"):
        table.add_column(column)
    with tempfile.TemporaryDirectory(prefix="fl-bench-", dir="/tmp") as tmp:
        for name, make in MODELS.items():
            work = Path(tmp) / str(len(table.rows))
            work.mkdir()
            table.add_row(*bench_model(name, make(), args.calls, args.blocks, work))
    Console().print(table)
    print("target: added p50 <= 0.2 ms and API/direct >= 0.8x")


if __name__ == "__main__":
    main()
