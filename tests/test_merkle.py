"""The Merkle tree (ledger/merkle.py) against RFC 6962/9162 test vectors, the reference
definitions, and every single-byte corruption of a proof, leaf or root."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.errors import LedgerError, ProofError, TreeRangeError
from ledger.merkle import (
    BLAKE3,
    HASHES,
    SHA256,
    MerkleFrontier,
    TreeHash,
    consistency_proof,
    frontier_coordinates,
    inclusion_proof,
    reference_consistency_proof,
    reference_inclusion_proof,
    root_at,
    root_from_leaves,
    verify_consistency,
    verify_inclusion,
)

# The leaves and roots used by the Certificate Transparency reference tests and by
# transparency-dev/merkle (SHA-256). ROOTS[n] is the root of the first n leaves.
CT_LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    bytes(range(0x50, 0x58)),
    bytes(range(0x60, 0x70)),
]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_INCLUSION = {
    (0, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (5, 8): [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
    (0, 1): [],
}
CT_CONSISTENCY = {
    (1, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (6, 8): [
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
    (2, 5): [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ],
}

Nodes = dict[tuple[int, int], bytes]


def complete_subtrees(th: TreeHash, leaf_hashes: list[bytes]) -> Nodes:
    """Every complete subtree's hash, level by level (independent of MerkleFrontier)."""
    nodes: Nodes = {}
    level, row = 0, list(leaf_hashes)
    while row:
        for idx, h in enumerate(row):
            nodes[(level, idx)] = h
        row = [th.node(row[i], row[i + 1]) for i in range(0, len(row) - 1, 2)]
        level += 1
    return nodes


def counting_reader(nodes: Nodes) -> tuple[Callable[[int, int], bytes], list[int]]:
    reads = [0]

    def get_node(level: int, idx: int) -> bytes:
        reads[0] += 1
        return nodes[(level, idx)]

    return get_node, reads


def leaves_for(th: TreeHash, n: int, salt: int = 0) -> list[bytes]:
    return [th.leaf(b"entry-%d-%d" % (salt, i)) for i in range(n)]


def flip(data: bytes, pos: int) -> bytes:
    edited = bytearray(data)
    edited[pos % len(edited)] ^= 0x01
    return bytes(edited)


def ct_nodes() -> tuple[list[bytes], Nodes]:
    leaves = [SHA256.leaf(d) for d in CT_LEAVES]
    return leaves, complete_subtrees(SHA256, leaves)


# -- known answers -------------------------------------------------------------------


def test_empty_tree_root_is_the_hash_of_nothing() -> None:
    assert SHA256.empty().hex() == CT_ROOTS[0]
    assert root_from_leaves(SHA256, []) == SHA256.empty()
    for th in HASHES.values():
        assert root_at(th, 0, lambda level, idx: pytest.fail("no node is needed")) == th.empty()
        assert MerkleFrontier(th).root() == th.empty()
    assert BLAKE3.empty() != SHA256.empty()


def test_leaf_and_node_prefixes() -> None:
    import hashlib

    assert SHA256.leaf(b"abc") == hashlib.sha256(b"\x00abc").digest()
    assert (
        SHA256.node(b"l" * 32, b"r" * 32)
        == hashlib.sha256(b"\x01" + b"l" * 32 + b"r" * 32).digest()
    )
    assert SHA256.leaf(b"").hex() == CT_ROOTS[1]


def test_sha256_roots_match_rfc6962_test_vectors() -> None:
    leaves, nodes = ct_nodes()
    frontier = MerkleFrontier(SHA256)
    for size, want in enumerate(CT_ROOTS):
        assert root_from_leaves(SHA256, leaves[:size]).hex() == want
        assert root_at(SHA256, size, lambda lv, i: nodes[(lv, i)]).hex() == want
        assert frontier.root().hex() == want
        if size < len(leaves):
            frontier.append(leaves[size])


@pytest.mark.parametrize(("index", "size"), sorted(CT_INCLUSION))
def test_sha256_inclusion_proofs_match_test_vectors(index: int, size: int) -> None:
    leaves, nodes = ct_nodes()
    proof = inclusion_proof(SHA256, index, size, lambda lv, i: nodes[(lv, i)])
    assert [h.hex() for h in proof] == CT_INCLUSION[(index, size)]
    assert proof == reference_inclusion_proof(SHA256, index, leaves[:size])
    verify_inclusion(SHA256, index, size, leaves[index], proof, bytes.fromhex(CT_ROOTS[size]))


@pytest.mark.parametrize(("m", "n"), sorted(CT_CONSISTENCY))
def test_sha256_consistency_proofs_match_test_vectors(m: int, n: int) -> None:
    leaves, nodes = ct_nodes()
    proof = consistency_proof(SHA256, m, n, lambda lv, i: nodes[(lv, i)])
    assert [h.hex() for h in proof] == CT_CONSISTENCY[(m, n)]
    assert proof == reference_consistency_proof(SHA256, m, leaves[:n])
    roots = [bytes.fromhex(r) for r in CT_ROOTS]
    verify_consistency(SHA256, m, n, roots[m], roots[n], proof)


# -- properties over random trees ---------------------------------------------------

tree_hashes = st.sampled_from(sorted(HASHES.values(), key=lambda th: th.name))


@settings(max_examples=200, deadline=None)
@given(th=tree_hashes, n=st.integers(1, 300), salt=st.integers(0, 2**16), data=st.data())
def test_proofs_from_stored_nodes_equal_the_reference_and_verify(
    th: TreeHash, n: int, salt: int, data: st.DataObject
) -> None:
    leaves = leaves_for(th, n, salt)
    nodes = complete_subtrees(th, leaves)
    get_node, reads = counting_reader(nodes)
    roots = [root_from_leaves(th, leaves[:size]) for size in range(n + 1)]
    assert root_at(th, n, get_node) == roots[n]
    budget = 2 * n.bit_length() + 2  # O(log n) node reads per root or proof

    # The streaming frontier completes exactly the stored nodes, and tracks the root.
    frontier, completed = MerkleFrontier(th), {}
    for leaf in leaves:
        completed.update({(lv, i): h for lv, i, h in frontier.append(leaf)})
    assert completed == nodes and frontier.root() == roots[n]
    # A frontier resumed from the stored right edge of size k (what an appender reads)
    # continues exactly as the one that saw every leaf.
    k = data.draw(st.integers(0, n))
    resumed = MerkleFrontier(th, k, [nodes[c] for c in frontier_coordinates(k)])
    assert resumed.root() == roots[k]
    for leaf in leaves[k:]:
        for lv, i, h in resumed.append(leaf):
            assert nodes[(lv, i)] == h
    assert resumed.root() == roots[n]

    sampled = set(data.draw(st.lists(st.integers(0, n - 1), max_size=8)))
    for index in range(n):
        reads[0] = 0
        proof = inclusion_proof(th, index, n, get_node)
        assert reads[0] <= budget, f"{reads[0]} reads for one inclusion proof"
        if index in sampled or index in (0, n - 1):
            assert proof == reference_inclusion_proof(th, index, leaves)
        verify_inclusion(th, index, n, leaves[index], proof, roots[n])

    sampled = set(data.draw(st.lists(st.integers(0, n), max_size=8)))
    for m in range(n + 1):
        reads[0] = 0
        proof = consistency_proof(th, m, n, get_node)
        assert reads[0] <= budget, f"{reads[0]} reads for one consistency proof"
        if m in sampled or m in (1, n):
            assert proof == reference_consistency_proof(th, m, leaves)
        verify_consistency(th, m, n, roots[m], roots[n], proof)


@settings(max_examples=200, deadline=None)
@given(th=tree_hashes, n=st.integers(1, 300), data=st.data())
def test_any_flipped_byte_breaks_an_inclusion_proof(
    th: TreeHash, n: int, data: st.DataObject
) -> None:
    leaves = leaves_for(th, n)
    nodes = complete_subtrees(th, leaves)
    index = data.draw(st.integers(0, n - 1))
    proof = inclusion_proof(th, index, n, lambda lv, i: nodes[(lv, i)])
    root, leaf = root_from_leaves(th, leaves), leaves[index]
    pos = data.draw(st.integers(0, th.size - 1))
    for k in range(len(proof)):
        bad = [*proof[:k], flip(proof[k], pos), *proof[k + 1 :]]
        with pytest.raises(ProofError):
            verify_inclusion(th, index, n, leaf, bad, root)
    with pytest.raises(ProofError):
        verify_inclusion(th, index, n, flip(leaf, pos), proof, root)
    with pytest.raises(ProofError):
        verify_inclusion(th, index, n, leaf, proof, flip(root, pos))
    # Another leaf's index: its path puts the same hashes in another order.
    for other in {index - 1, index + 1, index ^ 2} - {index}:
        if 0 <= other < n:
            with pytest.raises(ProofError):
                verify_inclusion(th, other, n, leaf, proof, root)
    with pytest.raises(ProofError, match="not in a tree"):
        verify_inclusion(th, n, n, leaf, proof, root)
    # Another size, with that size's root: fails unless both sizes have the very same
    # path (then the proof *is* that size's proof too).
    for size in {n - 1, n + 1, 2 * n, n // 2} - {n}:
        if index < size <= n:
            other_root = root_from_leaves(th, leaves[:size])
            if reference_inclusion_proof(th, index, leaves[:size]) != proof:
                with pytest.raises(ProofError):
                    verify_inclusion(th, index, size, leaf, proof, other_root)
    # A proof with a hash more or less.
    with pytest.raises(ProofError):
        verify_inclusion(th, index, n, leaf, [*proof, leaf], root)
    if proof:
        with pytest.raises(ProofError):
            verify_inclusion(th, index, n, leaf, proof[:-1], root)


@settings(max_examples=200, deadline=None)
@given(th=tree_hashes, n=st.integers(1, 300), data=st.data())
def test_any_flipped_byte_breaks_a_consistency_proof(
    th: TreeHash, n: int, data: st.DataObject
) -> None:
    leaves = leaves_for(th, n)
    nodes = complete_subtrees(th, leaves)
    m = data.draw(st.integers(0, n))
    proof = consistency_proof(th, m, n, lambda lv, i: nodes[(lv, i)])
    root_m, root_n = root_from_leaves(th, leaves[:m]), root_from_leaves(th, leaves)
    pos = data.draw(st.integers(0, th.size - 1))
    for k in range(len(proof)):
        bad = [*proof[:k], flip(proof[k], pos), *proof[k + 1 :]]
        with pytest.raises(ProofError):
            verify_consistency(th, m, n, root_m, root_n, bad)
    with pytest.raises(ProofError):
        verify_consistency(th, m, n, flip(root_m, pos), root_n, proof)
    if m > 0:  # every tree extends the empty tree: there is nothing to check of root_n
        with pytest.raises(ProofError):
            verify_consistency(th, m, n, root_m, flip(root_n, pos), proof)
    with pytest.raises(ProofError):
        verify_consistency(th, m, n, root_m, root_n, [*proof, root_n])
    if proof:
        with pytest.raises(ProofError):
            verify_consistency(th, m, n, root_m, root_n, proof[:-1])
    # The roots of other first sizes are not consistent through this proof.
    for other in {m - 1, m + 1} - {m}:
        if 0 <= other <= n and reference_consistency_proof(th, other, leaves) != proof:
            with pytest.raises(ProofError):
                verify_consistency(
                    th, other, n, root_from_leaves(th, leaves[:other]), root_n, proof
                )


# -- edges and errors ----------------------------------------------------------------


def test_a_proof_does_not_pin_the_tree_size_on_its_own() -> None:
    # RFC 9162 behaviour worth knowing: leaf 0's proof in the tree of 3 also verifies as
    # leaf 0 "in a tree of 4" against the same root. The size is bound to the root by
    # the signed checkpoint that carries both, never by the proof.
    leaves = leaves_for(SHA256, 3)
    root = root_from_leaves(SHA256, leaves)
    proof = reference_inclusion_proof(SHA256, 0, leaves)
    verify_inclusion(SHA256, 0, 3, leaves[0], proof, root)
    verify_inclusion(SHA256, 0, 4, leaves[0], proof, root)


def test_equal_and_empty_first_trees() -> None:
    leaves = leaves_for(BLAKE3, 5)
    root = root_from_leaves(BLAKE3, leaves)
    verify_consistency(BLAKE3, 5, 5, root, root, [])
    verify_consistency(BLAKE3, 0, 5, BLAKE3.empty(), root, [])
    with pytest.raises(ProofError, match="roots differ"):
        verify_consistency(BLAKE3, 5, 5, root, flip(root, 0), [])
    with pytest.raises(ProofError, match="must be empty"):
        verify_consistency(BLAKE3, 5, 5, root, root, [root])
    with pytest.raises(ProofError, match="empty tree"):
        verify_consistency(BLAKE3, 0, 5, root, root, [])
    with pytest.raises(ProofError, match="larger than"):
        verify_consistency(BLAKE3, 6, 5, root, root, [root])
    with pytest.raises(ProofError, match="is empty"):
        verify_consistency(BLAKE3, 3, 5, root_from_leaves(BLAKE3, leaves[:3]), root, [])


def test_malformed_hashes_are_refused_with_a_clear_message() -> None:
    leaves = leaves_for(SHA256, 2)
    root = root_from_leaves(SHA256, leaves)
    with pytest.raises(ProofError, match="element 0 is not a 32-byte sha256 hash"):
        verify_inclusion(SHA256, 0, 2, leaves[0], [b"short"], root)
    with pytest.raises(ProofError, match="root is not a 32-byte"):
        verify_inclusion(SHA256, 0, 2, leaves[0], [leaves[1]], root[:31])


def test_out_of_range_requests_raise_ledger_errors() -> None:
    nodes = complete_subtrees(SHA256, leaves_for(SHA256, 4))

    def get(lv: int, i: int) -> bytes:
        return nodes[(lv, i)]

    with pytest.raises(TreeRangeError, match="leaf index 4 is not in a tree of size 4"):
        inclusion_proof(SHA256, 4, 4, get)
    with pytest.raises(TreeRangeError, match="larger than"):
        consistency_proof(SHA256, 5, 4, get)
    with pytest.raises(TreeRangeError, match="non-negative"):
        root_at(SHA256, -1, get)
    with pytest.raises(TreeRangeError):
        MerkleFrontier(SHA256, 3, [b"x" * 32])  # a size of 3 needs 2 subtrees
    assert issubclass(TreeRangeError, LedgerError) and issubclass(ProofError, LedgerError)
