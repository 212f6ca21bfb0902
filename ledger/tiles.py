"""The Merkle tree's stored form: tiles of 16 hashes (pure, no I/O).

The idea is C2SP tlog-tiles: instead of one row per tree node, the store keeps the
hashes of every 4th level of the tree, 16 consecutive hashes to a row. Tile
(`tile_level` L, `tile_index` N) holds the tree nodes (4L, 16N + j), j = 0 .. width-1:
for L = 0 the leaf hashes, for L = 1 the roots of 16-leaf subtrees, and so on. Every
other complete subtree, (4L + r, i) with 0 < r < 4, is the root of the 2**r hashes
[i * 2**r, (i + 1) * 2**r) of one tile's row, hashed up as RFC 9162 nodes; a root or a
proof therefore reads O(log n / 4) rows and hashes at most 15 nodes per row.

Why 16 and not tlog-tiles' 256: a cold proof is bound by page reads. A 512-byte row
sits in one B-tree page; an 8 KiB row is a chain of overflow pages read one after the
other, and hashing up 255 nodes per row costs more than the saved rows (measured:
2.7 ms against 6.0 ms per cold proof at 200,000 entries). Appends write ~1/15 tile
row per entry either way, against ~2 node rows per entry for one row per node.

A tile is full at width 16. The rightmost tile of each level is partial (width 1 to
15) and grows as appends complete the nodes of its level: a row is never rewritten
except to extend its hashes, so what was stored stays as it was (docs/PROTOCOL.md,
"Storage").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ledger.merkle import NODE_PREFIX

TILE_HEIGHT = 4
TILE_WIDTH = 1 << TILE_HEIGHT
_LOW = TILE_WIDTH - 1


def is_stored_level(level: int) -> bool:
    """Whether the nodes of tree `level` are kept in tiles (every 4th level, leaves too)."""
    return level % TILE_HEIGHT == 0


@dataclass(frozen=True)
class TileSpan:
    """Where node (level, idx) comes from: the hashes [start, start + count) of tile
    (tile_level, tile_idx), hashed up (count is a power of two; 1 = stored as is)."""

    tile_level: int
    tile_idx: int
    start: int
    count: int


def locate(level: int, idx: int) -> TileSpan:
    """The tile and the stored hashes that make node (level, idx)."""
    tile_level, rise = divmod(level, TILE_HEIGHT)
    first = idx << rise  # index of its leftmost descendant on the stored level
    return TileSpan(tile_level, first >> TILE_HEIGHT, first & _LOW, 1 << rise)


def edge_tiles(size: int) -> list[tuple[int, int, int]]:
    """The partial tiles of a tree of `size` leaves, as (tile_level, tile_idx, width),
    lowest level first: what the next append extends."""
    out = []
    level = 0
    while (nodes := size >> (TILE_HEIGHT * level)) > 0:
        if nodes & _LOW:
            out.append((level, nodes >> TILE_HEIGHT, nodes & _LOW))
        level += 1
    return out


def hash_up(digest: Callable[[bytes], bytes], hashes: list[bytes]) -> bytes:
    """The root of the perfect subtree over `hashes` (a power of two of them)."""
    prefix = NODE_PREFIX
    while len(hashes) > 1:
        hashes = [digest(prefix + hashes[i] + hashes[i + 1]) for i in range(0, len(hashes), 2)]
    return hashes[0]


def split_hashes(blob: bytes, size: int) -> list[bytes]:
    """A tile row's hashes, one `size`-byte hash each."""
    return [blob[i : i + size] for i in range(0, len(blob), size)]


def group_by_tile(
    completed: Iterable[tuple[int, int, bytes]],
) -> dict[tuple[int, int], tuple[int, list[bytes]]]:
    """The stored-level nodes among `completed` (in completion order), by tile:
    (tile_level, tile_idx) -> (first position written, hashes in position order)."""
    tiles: dict[tuple[int, int], tuple[int, list[bytes]]] = {}
    for level, idx, h in completed:
        if level % TILE_HEIGHT:
            continue
        key = (level // TILE_HEIGHT, idx >> TILE_HEIGHT)
        found = tiles.get(key)
        if found is None:
            tiles[key] = (idx & _LOW, [h])
        else:
            found[1].append(h)
    return tiles
