"""A small TCP proxy for fault tests: put it between a client and a server, then break
the network on command.

    proxy = await TcpProxy.start("127.0.0.1", server_port)
    ... connect the client to proxy.url("nats") ...
    proxy.reset_all()                   # every connection gets a TCP RST now
    fired = proxy.reset_after(2 << 20)  # ... once 2 MiB more went to the clients
    proxy.partition()                   # nothing passes (bytes wait, as in a real
    proxy.heal()                        #   partition with TCP retransmits); then it flows
    fired = proxy.partition_after(n)    # partition once n more bytes went to the clients

A partition holds bytes instead of dropping them: the kernel buffers fill and the peers
see a stalled connection, as TCP does while packets are lost; new connections are
accepted but not forwarded until `heal()`. Only asyncio, so it runs in the test's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field

READ_SIZE = 64 * 1024


@dataclass(eq=False)
class _Pair:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class TcpProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream_host, self.upstream_port = upstream_host, upstream_port
        self.port = 0
        self.resets = 0  # connections reset by reset_all()
        self.connections = 0  # accepted so far
        self.bytes_down = 0  # server -> clients, forwarded
        self._server: asyncio.Server | None = None
        self._pairs: set[_Pair] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._trigger_at: int | None = None
        self._trigger_action = "reset"
        self._trigger_fired = asyncio.Event()

    @classmethod
    async def start(cls, upstream_host: str, upstream_port: int) -> TcpProxy:
        proxy = cls(upstream_host, upstream_port)
        proxy._server = await asyncio.start_server(proxy._accept, "127.0.0.1", 0)
        proxy.port = proxy._server.sockets[0].getsockname()[1]
        return proxy

    def url(self, scheme: str = "nats") -> str:
        return f"{scheme}://127.0.0.1:{self.port}"

    # ------------------------------------------------------------ faults

    def reset_all(self) -> int:
        """Abort every open connection with a TCP RST (both sides); returns how many."""
        pairs = list(self._pairs)
        for pair in pairs:
            self._abort(pair)
        self.resets += len(pairs)
        return len(pairs)

    def reset_after(self, nbytes: int) -> asyncio.Event:
        """Reset every connection once `nbytes` more bytes went to the clients; the
        event is set when that happened."""
        return self._after(nbytes, "reset")

    def partition_after(self, nbytes: int) -> asyncio.Event:
        """Partition once `nbytes` more bytes went to the clients (see `partition`)."""
        return self._after(nbytes, "partition")

    def _after(self, nbytes: int, action: str) -> asyncio.Event:
        self._trigger_at = self.bytes_down + nbytes
        self._trigger_action = action
        self._trigger_fired = asyncio.Event()
        return self._trigger_fired

    def partition(self) -> None:
        """Stop forwarding in both directions, on open and new connections."""
        self._flowing.clear()

    def heal(self) -> None:
        self._flowing.set()

    @property
    def partitioned(self) -> bool:
        return not self._flowing.is_set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.heal()
        for pair in list(self._pairs):
            self._abort(pair)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    # ------------------------------------------------------------ internals

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        pair = _Pair(writer)
        self._pairs.add(pair)
        try:
            await self._flowing.wait()
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port)
            except OSError:
                self._abort(pair)
                return
            pair.upstream = up_writer
            pair.tasks = [
                asyncio.create_task(self._pump(reader, up_writer, pair, down=False)),
                asyncio.create_task(self._pump(up_reader, writer, pair, down=True)),
            ]
            await asyncio.gather(*pair.tasks, return_exceptions=True)
        finally:
            self._abort(pair)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    pair: _Pair, *, down: bool) -> None:
        try:
            while True:
                await self._flowing.wait()
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                await self._flowing.wait()  # partitioned while this read waited
                if pair not in self._pairs:
                    break
                if down and self._trigger_at is not None:
                    room = self._trigger_at - self.bytes_down
                    if len(data) >= room:
                        # Forward up to the trigger point, then break the network: the
                        # cut lands inside a message, as a real fault does.
                        head, data = data[:max(room, 0)], data[max(room, 0):]
                        writer.write(head)
                        self.bytes_down += len(head)
                        self._trigger_at = None
                        with contextlib.suppress(Exception):
                            await writer.drain()
                        self._trigger_fired.set()
                        if self._trigger_action == "reset":
                            self.reset_all()
                            break
                        self.partition()
                        await self._flowing.wait()
                        if pair not in self._pairs:
                            break
                writer.write(data)
                if down:
                    self.bytes_down += len(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._abort(pair)

    def _abort(self, pair: _Pair) -> None:
        if pair not in self._pairs:
            return
        self._pairs.discard(pair)
        for writer in (pair.client, pair.upstream):
            if writer is None:
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:  # SO_LINGER 0: close() sends RST, not FIN
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
            writer.transport.abort()
        for task in pair.tasks:
            if task is not asyncio.current_task():
                task.cancel()
