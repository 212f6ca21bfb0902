"""Reading the stored Merkle tree: roots, proofs and node reads from the tiles, and the
tree's right edge that an append continues from.

The tree (RFC 9162, ledger/merkle.py) is stored beside the entries as tiles
(`ledger_tiles`, ledger/tiles.py): the hashes of every 4th level, 16 to a row. Any root or
proof needs only O(log n / 4) row reads; what a computation will ask for is learnt by a
dry run, then every tile it needs is read in one statement.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from ledger.errors import StoreError, TreeRangeError
from ledger.merkle import (
    GetNode,
    TreeHash,
    consistency_proof,
    frontier_coordinates,
    inclusion_proof,
    root_at,
)
from ledger.storage.sql import TREE_SIZE_SQL, read_driver, store_error, tiles_sql
from ledger.tiles import (
    TILE_HEIGHT,
    TILE_WIDTH,
    edge_tiles,
    group_by_tile,
    hash_up,
    locate,
    split_hashes,
)
from ledger.verify import TreeRow

# Tiles are read in one statement; this many (level, idx) pairs at most per statement.
_TREE_READ_CHUNK = 200
_T = TypeVar("_T")

TileKey = tuple[int, int]
"""(tile level, tile index) of a `ledger_tiles` row."""


@dataclass(frozen=True)
class Edge:
    """The tree's right edge after an append: enough to continue without reading it."""

    size: int
    head: bytes  # the hash of entry size - 1 (whose append this describes)
    subtrees: list[bytes]  # MerkleFrontier.subtrees at `size`
    tiles: dict[TileKey, bytes]  # every partial tile at `size`, as stored


def _in_range(what: str, value: int, lo: int, hi: int, why: str) -> int:
    """`value` if lo <= value <= hi, else `TreeRangeError` saying why."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TreeRangeError(f"{what} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        bounds = f" (allowed: {lo}..{hi})" if lo <= hi else ""
        raise TreeRangeError(f"{what} {value} is out of range{bounds}: {why}")
    return value


def _has(count: int) -> str:
    return f"the ledger has {count} entries" if count else "the ledger is empty"


def read_tiles(conn: Connection, keys: Iterable[TileKey]) -> dict[TileKey, bytes]:
    """The stored tiles among `keys` (missing ones are left out)."""
    found: dict[TileKey, bytes] = {}
    wanted = sorted(keys)
    for start in range(0, len(wanted), _TREE_READ_CHUNK):
        chunk = wanted[start : start + _TREE_READ_CHUNK]
        # Plain SQL, integers inlined (ours, computed): a proof on a freshly opened
        # store costs no statement compilation, just the O(log n) index lookups.
        for level, idx, blob in conn.exec_driver_sql(tiles_sql(
            f"level = {int(lv)} AND idx = {int(i)}" for lv, i in chunk
        )):  # fmt: skip
            found[(level, idx)] = bytes(blob)
    return found


class TileTree:
    """The Merkle tree stored in a ledger's tiles, read through `engine`. `where` names
    the ledger in error messages; `th` is the tree hash the ledger records."""

    def __init__(self, engine: Engine, where: str, th: TreeHash) -> None:
        self._engine = engine
        self._where = where
        self._th = th

    # -- roots and proofs ----------------------------------------------------------------

    def root(self, size: int | None = None) -> bytes:
        """The Merkle root (RFC 9162 MTH) of the first `size` entries (default: all)."""

        def compute(conn: Connection, current: int) -> bytes:
            n = current if size is None else _in_range("tree size", size, 0, current, _has(current))
            return self._from_nodes(conn, lambda get: root_at(self._th, n, get))

        return self._read_tree("compute the Merkle root of", compute)

    def inclusion_proof(self, seq: int, size: int | None = None) -> list[bytes]:
        """The RFC 9162 inclusion proof of entry `seq` in the tree of `size` entries
        (default: all), leaf's sibling first; O(log n) node reads."""

        def compute(conn: Connection, current: int) -> list[bytes]:
            n = current if size is None else _in_range("tree size", size, 0, current, _has(current))
            why = _has(current) if size is None else f"not in the tree of size {n}"
            index = _in_range("seq", seq, 0, n - 1, why)
            return self._from_nodes(conn, lambda get: inclusion_proof(self._th, index, n, get))

        return self._read_tree("prove inclusion in", compute)

    def consistency_proof(self, m: int, n: int) -> list[bytes]:
        """The RFC 9162 consistency proof from the tree of `m` entries to the tree of
        `n` entries (empty when m == n or m == 0); O(log n) node reads."""

        def compute(conn: Connection, current: int) -> list[bytes]:
            second = _in_range("second tree size", n, 0, current, _has(current))
            first = _in_range("first tree size", m, 0, second, f"it exceeds the second, {n}")
            return self._from_nodes(
                conn, lambda get: consistency_proof(self._th, first, second, get)
            )

        return self._read_tree("prove consistency in", compute)

    def leaf_hash(self, seq: int) -> bytes:
        """The stored Merkle leaf hash of entry `seq`: HASH(0x00 || body)."""

        def compute(conn: Connection, current: int) -> bytes:
            index = _in_range("seq", seq, 0, current - 1, _has(current))
            return self._from_nodes(conn, lambda get: get(0, index))

        return self._read_tree("read the Merkle tree of", compute)

    def subtree_hashes(self, coords: Iterable[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        """The hashes of the complete subtrees at `coords` (level, index), read from the
        tiles; those the tiles do not hold are left out."""
        wanted = list(coords)
        try:
            with self._engine.connect() as conn:
                tiles = read_tiles(
                    conn, {(s.tile_level, s.tile_idx) for s in map(lambda c: locate(*c), wanted)}
                )
        except SQLAlchemyError as exc:
            raise store_error(self._where, "read the Merkle tree of", exc) from exc
        get = self.tile_getter(tiles)
        found: dict[tuple[int, int], bytes] = {}
        for level, idx in wanted:
            try:
                found[(level, idx)] = get(level, idx)
            except StoreError:
                continue
        return found

    def _read_tree(self, action: str, compute: Callable[[Connection, int], _T]) -> _T:
        # One read transaction (a snapshot in SQLite WAL), so the size and the tiles agree.
        # The size is the tree's own (every append writes its leaves in the transaction
        # that writes the entries): read from the last leaf tile, whose pages a proof at
        # that size reads anyway, not from the entries' B-tree (3 more cold page reads).
        try:
            with self._engine.connect() as conn:
                last = conn.exec_driver_sql(TREE_SIZE_SQL).first()
                size = 0 if last is None else last[0] * TILE_WIDTH + last[1] // self._th.size
                return compute(conn, size)
        except SQLAlchemyError as exc:
            raise store_error(self._where, action, exc) from exc

    def _from_nodes(self, conn: Connection, compute: Callable[[GetNode], _T]) -> _T:
        """Run `compute(get_node)` with every tile it needs read in one statement: a dry
        run records which nodes it asks for (what it asks never depends on the hashes)."""
        wanted: set[TileKey] = set()
        blank = bytes(self._th.size)

        def record(level: int, idx: int) -> bytes:
            span = locate(level, idx)
            wanted.add((span.tile_level, span.tile_idx))
            return blank

        compute(record)
        return compute(self.tile_getter(read_tiles(conn, wanted)))

    def tile_getter(self, tiles: dict[TileKey, bytes]) -> GetNode:
        """`get_node` over tiles already read: a stored hash, or the stored hashes
        under the node hashed up (at most 15 node hashes)."""
        hsize, digest = self._th.size, self._th.digest

        def get(level: int, idx: int) -> bytes:
            span = locate(level, idx)
            blob = tiles.get((span.tile_level, span.tile_idx), b"")
            lo, hi = span.start * hsize, (span.start + span.count) * hsize
            if len(blob) < hi:
                raise StoreError(
                    f"ledger {self._where}: Merkle tree node (level {level}, index {idx}) is "
                    f"missing: tile (level {span.tile_level}, index {span.tile_idx}) holds "
                    f"{len(blob) // hsize} hashes (run `ledger verify`)"
                )
            if span.count == 1:
                return blob[lo:hi]
            return hash_up(digest, split_hashes(blob[lo:hi], hsize))

        return get

    # -- the right edge (appends) --------------------------------------------------------

    def read_edge(self, conn: Connection, size: int, head_hash: bytes) -> Edge:
        """The tree's right edge at `size`, read from the tiles in `conn`'s transaction."""
        try:
            hsize = self._th.size
            coords = frontier_coordinates(size)
            wanted = {(t.tile_level, t.tile_idx) for t in map(lambda c: locate(*c), coords)}
            partial_widths = {(lv, ix): w for lv, ix, w in edge_tiles(size)}
            tiles = read_tiles(conn, wanted | set(partial_widths))
            get = self.tile_getter(tiles)
            subtrees = [get(level, idx) for level, idx in coords]
            partial: dict[TileKey, bytes] = {}
            for key, width in partial_widths.items():
                blob = tiles.get(key, b"")
                if len(blob) != width * hsize:
                    raise StoreError(
                        f"cannot append to ledger {self._where}: Merkle tree tile (level "
                        f"{key[0]}, index {key[1]}) holds {len(blob) // hsize} hashes, the "
                        f"{size} entries need {width} (run `ledger verify`)"
                    )
                partial[key] = blob
        except SQLAlchemyError as exc:
            raise store_error(self._where, "read the Merkle tree of", exc) from exc
        return Edge(size, head_hash, subtrees, partial)

    def tile_writes(
        self, edge: Edge, completed: list[tuple[int, int, bytes]]
    ) -> tuple[list[tuple[int, int, bytes]], list[tuple[bytes, int, int]], dict[TileKey, bytes]]:
        """The tile rows to insert (level, idx, hashes) and to extend (hashes, level,
        idx) for the nodes an append `completed`, and the partial tiles afterwards."""
        full = TILE_WIDTH * self._th.size
        inserts: list[tuple[int, int, bytes]] = []
        extends: list[tuple[bytes, int, int]] = []
        partial = dict(edge.tiles)
        for (level, idx), (start, hashes) in group_by_tile(completed).items():
            blob = b"".join(hashes)
            if start == 0:
                inserts.append((level, idx, blob))
            else:
                # read_edge read (or the store kept) every partial tile, at its width.
                blob = partial[(level, idx)] + blob
                extends.append((blob, level, idx))
            if len(blob) < full:
                partial[(level, idx)] = blob
            else:
                partial.pop((level, idx), None)
        return inserts, extends, partial

    # -- stored nodes, for verification ----------------------------------------------------

    def tree_nodes(
        self, start: int, stop: int, max_level: int | None = None
    ) -> dict[tuple[int, int], bytes]:
        """The stored nodes (those on tile levels, see ledger/tiles.py) completed by
        leaves start <= seq < stop (at most `max_level`), keyed by (level, index); with
        start = stop = 0, every stored node above `max_level`."""
        ranges: dict[int, tuple[int, int]] = {}  # tile level -> node index range
        if start < stop:
            tile_level = 0
            while (1 << (level := TILE_HEIGHT * tile_level)) <= stop and (
                max_level is None or level <= max_level
            ):
                # Node (level, i) is completed by leaf (i + 1) * 2**level - 1.
                lo = ((start + (1 << level)) >> level) - 1
                hi = (stop >> level) - 1
                if lo <= hi:
                    ranges[tile_level] = (lo, hi)
                tile_level += 1
            conditions = [  # our own integers: no parameters needed
                f"level = {tl} AND idx BETWEEN {lo >> TILE_HEIGHT} AND {hi >> TILE_HEIGHT}"
                for tl, (lo, hi) in ranges.items()
            ]
        else:
            conditions = [f"level > {int(max_level or 0) // TILE_HEIGHT}"]
        if not conditions:
            return {}
        hsize = self._th.size
        nodes: dict[tuple[int, int], bytes] = {}
        for tile_level, tile_idx, blob in read_driver(
            self._engine, self._where, tiles_sql(conditions)
        ):
            level, first = TILE_HEIGHT * tile_level, tile_idx << TILE_HEIGHT
            lo, hi = ranges.get(tile_level, (first, first + TILE_WIDTH - 1))
            for j, h in enumerate(split_hashes(blob, hsize)):
                if lo <= first + j <= hi:
                    nodes[(level, first + j)] = h
        return nodes

    def iter_tree_rows(self, batch: int = 4096, start: int = 0) -> Iterator[TreeRow]:
        """Stored tree nodes in the order appends complete them (see `TreeCheck`), from
        those completed by leaf `start` on: per batch of leaves [start, end), the nodes
        whose last leaf falls in it."""
        while True:
            end = start + batch
            nodes = self.tree_nodes(start, end)
            if not nodes:
                return
            # Sort by (completing seq, level).
            for _, level, idx in sorted(
                (((idx + 1) << level) - 1, level, idx) for level, idx in nodes
            ):
                yield TreeRow(level, idx, nodes[(level, idx)])
            start = end
