"""The ledger's Merkle tree, exactly as RFC 9162 §2.1 defines it (pure, no I/O).

    MTH({})        = HASH()                               the empty tree
    MTH({d0})      = HASH(0x00 || d0)                     a leaf
    MTH(D[n])      = HASH(0x01 || MTH(D[0:k]) || MTH(D[k:n]))
                     with k the largest power of two smaller than n

The leaf data of ledger entry `seq` is that entry's canonical body, and its leaf index
is `seq`. HASH is pluggable (`TreeHash`): SHA-256 by default (RFC 6962's, so standard
transparency-log tooling can check the tree), or BLAKE3.

Proof generation reads *complete subtrees* through `get_node(level, index)`: the hash
of the perfect subtree over leaves [index * 2**level, (index + 1) * 2**level). A store
can give any such node in O(1) reads (the ledger's store keeps every 4th level in
tiles and hashes the others up from them, ledger/tiles.py), so a root, an inclusion
proof or a consistency proof of any tree size costs O(log n) node lookups. The
`reference_*` functions compute the same things from a full list of leaf hashes by the
RFC's recursive definitions; they exist to test the fast path against.

Verification (`verify_inclusion`, `verify_consistency`) follows the algorithms of
RFC 9162 §2.1.3.2 and §2.1.4.2 step by step and raises `ProofError` on failure.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import blake3

from ledger.errors import ProofError, TreeRangeError

LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"

GetNode = Callable[[int, int], bytes]
"""`get_node(level, index)`: the hash of the complete subtree at `level` (0 = a leaf)
and position `index` within that level."""


@dataclass(frozen=True)
class TreeHash:
    """The hash function of one tree: RFC 9162's HASH with its leaf and node prefixes."""

    name: str
    size: int
    _digest: Callable[[bytes], bytes] = field(repr=False, compare=False)

    def empty(self) -> bytes:
        """MTH({}) = HASH(""), the root of the empty tree."""
        return self._digest(b"")

    def leaf(self, data: bytes) -> bytes:
        """HASH(0x00 || data)."""
        return self._digest(LEAF_PREFIX + data)

    def node(self, left: bytes, right: bytes) -> bytes:
        """HASH(0x01 || left || right)."""
        return self._digest(NODE_PREFIX + left + right)

    @property
    def digest(self) -> Callable[[bytes], bytes]:
        """The bare HASH (no prefix), for loops that hash many leaves and nodes."""
        return self._digest


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _blake3(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


SHA256 = TreeHash("sha256", 32, _sha256)
BLAKE3 = TreeHash("blake3", 32, _blake3)
HASHES: dict[str, TreeHash] = {th.name: th for th in (BLAKE3, SHA256)}
# New ledgers: RFC 6962's SHA-256, so standard C2SP/tlog tooling checks their checkpoints
# and proofs; BLAKE3 is chosen explicitly (`hub init --tree-hash blake3`).
DEFAULT_TREE_HASH = SHA256.name


def _split(n: int) -> int:
    """The largest power of two smaller than n (n >= 2): RFC 9162's k."""
    return 1 << ((n - 1).bit_length() - 1)


def _check_size(what: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TreeRangeError(f"{what} must be a non-negative integer, got {value!r}")


# -- roots -----------------------------------------------------------------------------


def root_from_leaves(th: TreeHash, leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH over `leaf_hashes` by the recursive definition (reference implementation)."""
    n = len(leaf_hashes)
    if n == 0:
        return th.empty()
    if n == 1:
        return leaf_hashes[0]
    k = _split(n)
    return th.node(root_from_leaves(th, leaf_hashes[:k]), root_from_leaves(th, leaf_hashes[k:]))


def subtree_coordinates(lo: int, hi: int) -> list[tuple[int, int]]:
    """The complete subtrees that make up leaves [lo, hi), left to right, as (level, index).

    For the ranges a proof asks about (and for [0, size)) these are the largest aligned
    perfect subtrees; folding their hashes from the right gives MTH(D[lo:hi]).
    """
    coords: list[tuple[int, int]] = []
    while lo < hi:
        level = (hi - lo).bit_length() - 1
        while lo & ((1 << level) - 1):
            level -= 1
        coords.append((level, lo >> level))
        lo += 1 << level
    return coords


def frontier_coordinates(size: int) -> list[tuple[int, int]]:
    """The complete subtrees whose hashes determine the root of a tree of `size` leaves
    (one per bit set in `size`, largest first): what an appender needs to continue."""
    _check_size("tree size", size)
    return subtree_coordinates(0, size)


def _fold(th: TreeHash, hashes: Sequence[bytes]) -> bytes:
    # RFC 9162 splits at the largest power of two, so a range made of decreasing
    # perfect subtrees hashes as s0 + (s1 + (s2 + ...)): fold from the right.
    acc = hashes[-1]
    for h in reversed(hashes[:-1]):
        acc = th.node(h, acc)
    return acc


def _range_hash(th: TreeHash, lo: int, hi: int, get_node: GetNode) -> bytes:
    return _fold(th, [get_node(level, idx) for level, idx in subtree_coordinates(lo, hi)])


def root_at(th: TreeHash, size: int, get_node: GetNode) -> bytes:
    """MTH of the first `size` leaves, from O(log size) complete-subtree nodes."""
    _check_size("tree size", size)
    if size == 0:
        return th.empty()
    return _range_hash(th, 0, size, get_node)


# -- proofs from stored nodes -----------------------------------------------------------


def inclusion_proof(th: TreeHash, index: int, size: int, get_node: GetNode) -> list[bytes]:
    """PATH(index, D[size]) of RFC 9162 §2.1.3.1, reading O(log size) stored nodes."""
    _check_size("leaf index", index)
    _check_size("tree size", size)
    if index >= size:
        raise TreeRangeError(f"leaf index {index} is not in a tree of size {size}")
    proof: list[bytes] = []
    lo, hi = 0, size
    # Walk down from the root; each step's sibling is prepended by the recursion, so
    # collect top-down and reverse (the proof lists the leaf's sibling first).
    while hi - lo > 1:
        k = _split(hi - lo)
        if index - lo < k:
            proof.append(_range_hash(th, lo + k, hi, get_node))
            hi = lo + k
        else:
            proof.append(get_node((k.bit_length() - 1), lo >> (k.bit_length() - 1)))
            lo = lo + k
    proof.reverse()
    return proof


def consistency_proof(th: TreeHash, m: int, n: int, get_node: GetNode) -> list[bytes]:
    """PROOF(m, D[n]) of RFC 9162 §2.1.4.1, reading O(log n) stored nodes.

    For m == n and for m == 0 the proof is empty (there is nothing to prove; see
    `verify_consistency`), as in transparency-dev/merkle.
    """
    _check_size("first tree size", m)
    _check_size("second tree size", n)
    if m > n:
        raise TreeRangeError(f"first tree size {m} is larger than second tree size {n}")
    if m in (0, n):
        return []
    proof: list[bytes] = []
    lo, hi, complete_first = 0, n, True  # SUBPROOF(m, D[lo:hi], b), m counted from 0
    while True:
        if m == hi:
            if not complete_first:
                proof.append(_range_hash(th, lo, hi, get_node))
            break
        k = _split(hi - lo)
        if m - lo <= k:
            proof.append(_range_hash(th, lo + k, hi, get_node))
            hi = lo + k
        else:
            level = k.bit_length() - 1
            proof.append(get_node(level, lo >> level))
            lo, complete_first = lo + k, False
    proof.reverse()
    return proof


# -- reference proofs over a full leaf list (for tests) ------------------------------


def reference_inclusion_proof(
    th: TreeHash, index: int, leaf_hashes: Sequence[bytes]
) -> list[bytes]:
    """PATH(index, D[n]) by the recursive definition of RFC 9162 §2.1.3.1."""
    n = len(leaf_hashes)
    if not 0 <= index < n:
        raise TreeRangeError(f"leaf index {index} is not in a tree of size {n}")
    if n == 1:
        return []
    k = _split(n)
    if index < k:
        return [
            *reference_inclusion_proof(th, index, leaf_hashes[:k]),
            root_from_leaves(th, leaf_hashes[k:]),
        ]
    return [
        *reference_inclusion_proof(th, index - k, leaf_hashes[k:]),
        root_from_leaves(th, leaf_hashes[:k]),
    ]


def _reference_subproof(
    th: TreeHash, m: int, leaf_hashes: Sequence[bytes], complete: bool
) -> list[bytes]:
    n = len(leaf_hashes)
    if m == n:
        return [] if complete else [root_from_leaves(th, leaf_hashes)]
    k = _split(n)
    if m <= k:
        return [
            *_reference_subproof(th, m, leaf_hashes[:k], complete),
            root_from_leaves(th, leaf_hashes[k:]),
        ]
    return [
        *_reference_subproof(th, m - k, leaf_hashes[k:], False),
        root_from_leaves(th, leaf_hashes[:k]),
    ]


def reference_consistency_proof(th: TreeHash, m: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """PROOF(m, D[n]) = SUBPROOF(m, D[n], true) of RFC 9162 §2.1.4.1 (empty for m in {0, n})."""
    n = len(leaf_hashes)
    if not 0 <= m <= n:
        raise TreeRangeError(f"first tree size {m} is not between 0 and {n}")
    if m in (0, n):
        return []
    return _reference_subproof(th, m, leaf_hashes, True)


# -- verification -------------------------------------------------------------------


def _check_hashes(th: TreeHash, what: str, hashes: Sequence[bytes]) -> None:
    for i, h in enumerate(hashes):
        if not isinstance(h, bytes) or len(h) != th.size:
            raise ProofError(
                f"{what} element {i} is not a {th.size}-byte {th.name} hash: {h!r:.80}"
            )


def _check_hash(th: TreeHash, what: str, value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != th.size:
        raise ProofError(f"{what} is not a {th.size}-byte {th.name} hash: {value!r:.80}")


def verify_inclusion(
    th: TreeHash, index: int, size: int, leaf_hash: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that `leaf_hash` is leaf `index` of the tree of `size` leaves with `root`,
    by the algorithm of RFC 9162 §2.1.3.2. Raises `ProofError` if it is not."""
    _check_size("leaf index", index)
    _check_size("tree size", size)
    _check_hash(th, "leaf hash", leaf_hash)
    _check_hash(th, "root", root)
    _check_hashes(th, "inclusion proof", proof)
    # 1. leaf_index must be smaller than tree_size.
    if index >= size:
        raise ProofError(f"leaf index {index} is not in a tree of size {size}")
    # 2.-3.
    fn, sn, r = index, size - 1, leaf_hash
    # 4.
    for p in proof:
        if sn == 0:  # a.
            raise ProofError(
                f"inclusion proof for leaf {index} in a tree of size {size} is too long "
                f"({len(proof)} hashes)"
            )
        if fn & 1 or fn == sn:  # b.
            r = th.node(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = th.node(r, p)
        fn >>= 1  # c.
        sn >>= 1
    # 5.
    if sn != 0:
        raise ProofError(
            f"inclusion proof for leaf {index} in a tree of size {size} is too short "
            f"({len(proof)} hashes)"
        )
    if r != root:
        raise ProofError(
            f"inclusion proof for leaf {index} in a tree of size {size} does not lead to "
            f"the root: computed {r.hex()}, expected {root.hex()}"
        )


def verify_consistency(
    th: TreeHash, m: int, n: int, root_m: bytes, root_n: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree of `m` leaves with `root_m` is a prefix of the tree of `n`
    leaves with `root_n`, by the algorithm of RFC 9162 §2.1.4.2. Raises `ProofError`.

    RFC 9162 defines proofs for 0 < m < n only (§2.1.4.2 fails an empty proof). As in
    transparency-dev/merkle, m == n needs an empty proof and equal roots, and m == 0 an
    empty proof; unlike it (it ignores root_m there), `root_m` must then also be the
    empty tree's root HASH(), since a checkpoint of size 0 signs that root.
    """
    _check_size("first tree size", m)
    _check_size("second tree size", n)
    _check_hash(th, "first root", root_m)
    _check_hash(th, "second root", root_n)
    _check_hashes(th, "consistency proof", proof)
    if m > n:
        raise ProofError(f"first tree size {m} is larger than second tree size {n}")
    if m == n or m == 0:
        if proof:
            raise ProofError(
                f"consistency proof from size {m} to size {n} must be empty, "
                f"got {len(proof)} hashes"
            )
        expected = root_n if m == n else th.empty()
        if root_m != expected:
            what = "the roots differ" if m == n else "the first root is not the empty tree's"
            raise ProofError(f"trees of sizes {m} and {n} are not consistent: {what}")
        return
    # 1.
    if not proof:
        raise ProofError(f"consistency proof from size {m} to size {n} is empty")
    # 2. If first is an exact power of 2, prepend first_hash.
    path = [root_m, *proof] if m & (m - 1) == 0 else list(proof)
    # 3.
    fn, sn = m - 1, n - 1
    # 4.
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # 5.
    fr = sr = path[0]
    # 6.
    for c in path[1:]:
        if sn == 0:  # a.
            raise ProofError(
                f"consistency proof from size {m} to size {n} is too long ({len(proof)} hashes)"
            )
        if fn & 1 or fn == sn:  # b.
            fr = th.node(c, fr)
            sr = th.node(c, sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = th.node(sr, c)
        fn >>= 1  # c.
        sn >>= 1
    # 7.
    if sn != 0:
        raise ProofError(
            f"consistency proof from size {m} to size {n} is too short ({len(proof)} hashes)"
        )
    if fr != root_m:
        raise ProofError(
            f"consistency proof from size {m} to size {n} does not lead to the first root: "
            f"computed {fr.hex()}, expected {root_m.hex()}"
        )
    if sr != root_n:
        raise ProofError(
            f"consistency proof from size {m} to size {n} does not lead to the second root: "
            f"computed {sr.hex()}, expected {root_n.hex()}"
        )


# -- streaming -------------------------------------------------------------------------


class MerkleFrontier:
    """The incremental tree: the hashes of the complete subtrees of the current size
    (one per bit set in it, largest first), O(log n) memory.

    `append(leaf_hash)` returns every node the new leaf completes, leaf first, as
    (level, index, hash): exactly the nodes a store keeps.
    """

    def __init__(self, th: TreeHash, size: int = 0, subtrees: Sequence[bytes] = ()) -> None:
        _check_size("tree size", size)
        if len(subtrees) != size.bit_count():
            raise TreeRangeError(
                f"a tree of size {size} has {size.bit_count()} complete subtrees on its "
                f"right edge, got {len(subtrees)}"
            )
        self._th = th
        self._size = size
        self._stack = list(subtrees)

    @property
    def size(self) -> int:
        return self._size

    @property
    def subtrees(self) -> list[bytes]:
        """The right edge: one complete subtree hash per bit set in `size`, largest first."""
        return list(self._stack)

    def append(self, leaf_hash: bytes) -> list[tuple[int, int, bytes]]:
        """Add the next leaf; return the nodes it completes, leaf first."""
        completed = self.completed_by(leaf_hash)
        self.advance(completed)
        return completed

    def completed_by(self, leaf_hash: bytes) -> list[tuple[int, int, bytes]]:
        """The nodes appending `leaf_hash` would complete, leaf first, as (level, index,
        hash); the frontier itself is not changed (see `advance`)."""
        th, idx = self._th, self._size
        completed = [(0, idx, leaf_hash)]
        h, level, pos = leaf_hash, 0, len(self._stack)
        while idx & 1:  # a right child: its left sibling is the next subtree on the stack
            pos -= 1
            h = th.node(self._stack[pos], h)
            level += 1
            idx >>= 1
            completed.append((level, idx, h))
        return completed

    def extend(self, leaf_hashes: Iterable[bytes]) -> list[tuple[int, int, bytes]]:
        """Append many leaves; return every node they complete, in the order `append`
        would (each leaf, then the nodes it completes, lowest first). The batch form of
        `append`, for the append path: one call instead of one per leaf."""
        digest, prefix = self._th.digest, NODE_PREFIX
        stack, size = self._stack, self._size
        out: list[tuple[int, int, bytes]] = []
        add, push, pop = out.append, stack.append, stack.pop
        for h in leaf_hashes:
            add((0, size, h))
            idx, level = size, 0
            while idx & 1:  # a right child: its left sibling is the last subtree
                h = digest(prefix + pop() + h)
                level += 1
                idx >>= 1
                add((level, idx, h))
            push(h)
            size += 1
        self._size = size
        return out

    def advance(self, completed: Sequence[tuple[int, int, bytes]]) -> None:
        """Append the leaf whose `completed_by` result is `completed`."""
        if not completed or completed[0][:2] != (0, self._size):
            raise TreeRangeError(f"nodes to advance by do not start with leaf {self._size}")
        merged = len(completed) - 1
        if merged:
            del self._stack[-merged:]
        self._stack.append(completed[-1][2])
        self._size += 1

    def root(self) -> bytes:
        """MTH of the leaves appended so far."""
        if not self._stack:
            return self._th.empty()
        return _fold(self._th, self._stack)
