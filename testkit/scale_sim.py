"""A light simulated device for fleets of 10,000: the device's wire protocol, no model.

`testkit.fleet_sim` runs real `EdgeAgent`s (slots on disk, TFLite, telemetry windows):
right for 1,000 devices, far too heavy for 10,000 on two cores. A `LightDevice` does, per
device, what the hub and nats-server see of a real agent, through the agent's own
transport code:

- its own NATS connection, authenticated with its own device nkey in the DEVICES
  account (`NatsAuth.for_device`: its own inbox prefix, its own permissions);
- its assignment watched by hint plus direct get (`NatsTransport.watch_assignment`,
  edge_agent.transport.direct.KeyHints: a core subscription on its own key, a direct
  get at start, on each hint and on the 60 s poll), and `root.latest` watched the same
  way, as the agent does;
- each assignment checked as the agent checks it (`update.check_assignment`: the
  director's signature, this device, a counter above the last), the signed timestamp
  read and checked (`update.check_timestamp`), the release manifest read by direct get
  and checked (`update.check_manifest`);
- the blob's metadata read by direct get (`NatsTransport.blob_ref`) and the blob read
  chunk by chunk with direct gets from the `releases` bucket
  (`NatsTransport.blob_chunks`), BLAKE3 checked against the manifest;
- a signed status report (`applied`, and `started` once connected) published with a
  JetStream publish on `fleet.report.<device>.status`, waiting for the stream's ack.

What it skips (said again in docs/BENCHMARKS.md): no TFLite, no slots on disk, no spool
(a report is retried in memory until acked), no telemetry windows (the fleet is quiet),
no trust-root walk (the sim's root is the hub's first; `root.latest` is still watched).
With `shared_blob=True` (the benchmark's default) the devices of one process share one
download per blob: the first device that needs it reads every chunk, the others wait for
that read and still make their own metadata direct get; the blob is then moved
once per process, not once per device (10,000 x 1 MiB = 10 GB through Python on two
cores would measure the simulator, not the hub). `shared_blob=False` has every device
read every chunk itself.

Device keys are derived from a salt and the device id (`device_key`), so 10,000 devices
need no key files. `python -m testkit.scale_sim` runs one shard (a slice of the devices)
and answers one JSON line per command on stdin (`ScaleShards` drives them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent import protocol as proto
from edge_agent import update
from edge_agent.errors import UpdateRefused
from edge_agent.protocol import names
from edge_agent.transport import KeyUpdates
from edge_agent.transport.connect import NatsAuth
from edge_agent.transport.nats_transport import NatsTransport, close_quietly
from edge_agent.trust.root import TrustRoot
from ledger.signing import SigningKey

log = logging.getLogger("scale_sim")


def device_ids(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(count)]


def device_key(salt: str, device: str) -> SigningKey:
    """The device's Ed25519 key, derived from `salt` and its id (no key files)."""
    seed = blake3.blake3(f"scale-sim:{salt}:{device}".encode()).digest()
    return SigningKey(Ed25519PrivateKey.from_private_bytes(seed))


@dataclass
class Applied:
    """When a device applied which counter (wall clock, s)."""

    counter: int
    version: str
    at: float


class BlobCache:
    """One verified download per blob digest for the devices of one process."""

    def __init__(self) -> None:
        self._reads: dict[str, asyncio.Future[int]] = {}
        self.bytes_read = 0  # over the wire, by this process

    async def get(self, digest: str, read: Any) -> int:
        future = self._reads.get(digest)
        if future is None or (future.done() and future.exception() is not None):
            future = asyncio.ensure_future(self._count(read))
            self._reads[digest] = future
        return await asyncio.shield(future)

    async def _count(self, read: Any) -> int:
        got: int = await read()
        self.bytes_read += got
        return got


@dataclass
class LightDevice:
    device: str
    key: SigningKey
    trust: TrustRoot
    nats_url: str
    blobs: BlobCache | None  # None: this device reads every chunk itself
    boot: str = field(default_factory=lambda: proto.boot_id(int(time.time()),
                                                            secrets.token_hex(4)))
    last_counter: int = 0
    timestamp_version: int = 0
    applied: list[Applied] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    bytes_read: int = 0
    _seq: int = 0
    _transport: NatsTransport | None = None
    _watches: list[KeyUpdates] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def transport(self) -> NatsTransport:
        assert self._transport is not None
        return self._transport

    async def start(self) -> None:
        """Connect, report `started`, watch the assignment and `root.latest`."""
        auth = NatsAuth.for_device(self.device, self.key.private_raw())

        async def on_reconnect() -> None:
            return None  # NatsTransport kicks the watches itself

        self._transport = await NatsTransport.connect(
            self.nats_url, auth, name=f"scale-sim:{self.device}", on_reconnect=on_reconnect)
        self._tasks.append(asyncio.create_task(self._report(proto.STATUS_STARTED, None)))
        assignment = await self.transport.watch_assignment(self.device)
        roots = await self.transport.watch_latest_root()
        self._watches = [assignment, roots]
        self._tasks.append(asyncio.create_task(self._follow(assignment)))
        self._tasks.append(asyncio.create_task(self._drain(roots)))

    async def _drain(self, watch: KeyUpdates) -> None:
        while True:  # a rotation is not simulated: the sim's root stays the first
            with contextlib.suppress(TimeoutError):
                await watch.updates(timeout=3600)

    async def _follow(self, watch: KeyUpdates) -> None:
        while True:
            try:
                value = await watch.updates(timeout=3600)
            except TimeoutError:
                continue
            if value is None:
                continue
            try:
                await self._handle(value)
            except asyncio.CancelledError:
                raise
            except UpdateRefused as exc:
                self.refused.append(str(exc))
                log.error("%s: update refused: %s", self.device, exc)
            except Exception as exc:  # a transfer failure: the next hint or poll retries
                log.warning("%s: update failed: %r", self.device, exc)

    async def _handle(self, data: bytes) -> None:
        assignment = update.check_assignment(
            self.trust, self.device, update.Counters(self.last_counter), data)
        if assignment is None:
            return
        stamp = update.check_timestamp(self.trust, await self.transport.timestamp(),
                                       self.timestamp_version)
        if stamp is not None:
            self.timestamp_version = max(self.timestamp_version, stamp.version)
        raw = await self.transport.manifest(
            names.manifest_key(assignment.model, assignment.version))
        manifest = update.check_manifest(self.trust, assignment, raw)
        ref = await self.transport.blob_ref(manifest.digest, manifest.size)

        async def read() -> int:
            hasher, got = blake3.blake3(), 0
            async for chunk in self.transport.blob_chunks(
                    ref, manifest.size, received=0, chunks_seen=0, start_seq=None,
                    batch=1, timeout=30.0):
                hasher.update(chunk.data)
                got += len(chunk.data)
            if hasher.hexdigest() != manifest.digest:
                raise UpdateRefused(f"blob {manifest.digest[:16]}: digest mismatch")
            return got

        if self.blobs is None:
            self.bytes_read += await read()
        else:
            await self.blobs.get(manifest.digest, read)
        self.last_counter = assignment.counter
        self.applied.append(Applied(assignment.counter, assignment.version, time.time()))
        await self._report(proto.STATUS_APPLIED, assignment)

    async def _report(self, event: str, assignment: proto.Assignment | None) -> None:
        self._seq += 1
        report = proto.StatusReport(
            device=self.device, boot=self.boot, seq=self._seq, ts=time.time_ns(),
            event=event, model=assignment.model if assignment else "",
            version=assignment.version if assignment else "",
            digest=assignment.digest if assignment else "",
            counter=assignment.counter if assignment else 0, reason="")
        data = proto.encode_signed_report(report, self.key)
        msg_id = names.report_msg_id(self.device, self.boot, report.seq)
        subject = names.report_subject(self.device, "status")
        delay = 0.2
        while True:  # until acknowledged, as the agent's outbox does
            try:
                await self.transport.publish(subject, data, msg_id)
                return
            except Exception as exc:
                log.debug("%s: report not acked (%s); again", self.device, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for watch in self._watches:
            await watch.stop()
        if self._transport is not None:
            await close_quietly(self._transport, 2.0)


# ---------------------------------------------------------------- one shard


async def _run_shard(a: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.ERROR)
    trust = TrustRoot.load(Path(a.trust_root))
    blobs = BlobCache() if a.shared_blob else None
    ids = device_ids(a.prefix, a.total)[a.shard::a.shards]
    devices = [LightDevice(d, device_key(a.salt, d), trust, a.nats, blobs) for d in ids]
    sem = asyncio.Semaphore(a.connect_concurrency)

    async def start(device: LightDevice) -> None:
        async with sem:
            await device.start()

    t = time.perf_counter()
    await asyncio.gather(*(start(d) for d in devices))
    started = time.perf_counter() - t
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def say(obj: Any) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    say({"ready": len(devices), "start_s": started, "pid": os.getpid()})
    while True:
        command = (await reader.readline()).decode().strip()
        if command == "applied":  # device -> [[counter, version, at], ...]
            say({d.device: [[x.counter, x.version, x.at] for x in d.applied]
                 for d in devices})
        elif command == "stats":
            say({"bytes": (blobs.bytes_read if blobs else 0) + sum(d.bytes_read
                                                                   for d in devices),
                 "refused": sum(len(d.refused) for d in devices),
                 "fetches": sum(getattr(w, "fetches", 0) for d in devices
                                for w in d._watches)})
        else:  # "stop", or the parent went away
            await asyncio.gather(*(d.stop() for d in devices), return_exceptions=True)
            say({"ok": True})
            return


def _main() -> None:
    p = argparse.ArgumentParser(description="one shard of a light simulated fleet")
    p.add_argument("--nats", required=True)
    p.add_argument("--trust-root", required=True)
    p.add_argument("--total", type=int, required=True)
    p.add_argument("--prefix", default="s")
    p.add_argument("--salt", required=True)
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--shared-blob", action="store_true")
    p.add_argument("--connect-concurrency", type=int, default=64)
    asyncio.run(_run_shard(p.parse_args()))


# ---------------------------------------------------------------- the shards


class ScaleShards:
    """`procs` shard processes (`python -m testkit.scale_sim`) over the devices
    `device_ids(prefix, total)`, driven by one JSON line per command."""

    def __init__(self, nats_url: str, trust_root: Path, total: int, procs: int, *,
                 prefix: str, salt: str, shared_blob: bool = True) -> None:
        self.args = ["--nats", nats_url, "--trust-root", str(trust_root), "--total",
                     str(total), "--prefix", prefix, "--salt", salt]
        if shared_blob:
            self.args.append("--shared-blob")
        self.procs = max(1, min(procs, total))
        self.shards: list[asyncio.subprocess.Process] = []
        self.start_s: list[float] = []

    async def start(self) -> None:
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
        for k in range(self.procs):
            self.shards.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "testkit.scale_sim", *self.args, "--shard", str(k),
                "--shards", str(self.procs), stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, env=env, limit=2**26))
        for proc in self.shards:
            self.start_s.append((await self._reply(proc))["start_s"])

    @staticmethod
    async def _reply(proc: asyncio.subprocess.Process) -> Any:
        assert proc.stdout is not None
        line = await proc.stdout.readline()
        if not line:
            raise RuntimeError(f"scale shard {proc.pid} exited ({await proc.wait()})")
        return json.loads(line)

    async def _all(self, command: str) -> list[Any]:
        for proc in self.shards:
            assert proc.stdin is not None
            proc.stdin.write(command.encode() + b"\n")
            await proc.stdin.drain()
        return [await self._reply(proc) for proc in self.shards]

    async def applied(self) -> dict[str, list[tuple[int, str, float]]]:
        out: dict[str, list[tuple[int, str, float]]] = {}
        for reply in await self._all("applied"):
            out.update({d: [(int(c), str(v), float(t)) for c, v, t in rows]
                        for d, rows in reply.items()})
        return out

    async def stats(self) -> dict[str, int]:
        replies = await self._all("stats")
        return {k: sum(r[k] for r in replies) for k in ("bytes", "refused", "fetches")}

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.shards]

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._all("stop"), 60)
        for proc in self.shards:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        self.shards.clear()


if __name__ == "__main__":
    _main()
