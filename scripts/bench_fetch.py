"""Model download throughput: the agent's pull-consumer read vs nats-py's stock get.

Both read the same objects from the same local nats-server in the same run; the
stock `ObjectStore.get` is the baseline (ratio = fast / stock). Prints a table;
results go into docs/BENCHMARKS.md by hand.

    .venv/bin/python scripts/bench_fetch.py [--sizes-mib 1 16 64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import blake3  # noqa: E402
import nats  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from edge_agent.transport.objects import iter_object_chunks  # noqa: E402
from testkit.nats_server import EmbeddedNats  # noqa: E402


async def bench(url: str, sizes: list[int], repeat: int) -> Table:
    nc = await nats.connect(url)
    js = nc.jetstream()
    obs = await js.create_object_store("bench")
    table = Table("size", "stock get MB/s", "fast read MB/s", "ratio", "digest ok",
                  title=f"Object Store read, median of {repeat}")
    for size in sizes:
        data = os.urandom(size)
        name = blake3.blake3(data).hexdigest()
        await obs.put(name, data)
        stock, fast, ok = [], [], True
        for _ in range(repeat):
            t = time.perf_counter()
            result = await obs.get(name)
            stock.append(size / (time.perf_counter() - t) / 1e6)
            ok &= result.data == data
            t = time.perf_counter()
            hasher = blake3.blake3()
            async for chunk in iter_object_chunks(nc, "bench", name, size):
                hasher.update(chunk)
            fast.append(size / (time.perf_counter() - t) / 1e6)
            ok &= hasher.hexdigest() == name
        s, f = statistics.median(stock), statistics.median(fast)
        table.add_row(f"{size / 2**20:g} MiB", f"{s:.0f}", f"{f:.0f}", f"{f / s:.1f}x",
                      "yes" if ok else "NO")
    await nc.close()
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mib", type=float, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(s * 2**20) for s in args.sizes_mib]
    with EmbeddedNats() as server:
        table = asyncio.run(bench(server.url, sizes, args.repeat))
    Console().print(table)


if __name__ == "__main__":
    main()
