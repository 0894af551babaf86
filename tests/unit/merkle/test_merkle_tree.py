"""crypto.merkle against an independent RFC 9162 reference, the CT test vectors, and tampering."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.merkle import (
    EMPTY_ROOT,
    MerkleError,
    TreeFrontier,
    consistency_proof,
    consistency_proof_from,
    inclusion_proof,
    inclusion_proof_from,
    leaf_hash,
    node_hash,
    root_from_leaf_hashes,
    subtree_hasher_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)

# --------------------------------------------------------------------------------------------
# Reference implementation: RFC 9162 §2.1 text, recursive, written without looking at the module.
# --------------------------------------------------------------------------------------------


def ref_hash(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def ref_k(n: int) -> int:
    """Largest power of two smaller than n (n > 1)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(d: Sequence[bytes]) -> bytes:
    """MTH over *entries* (the RFC's D[n]), not leaf hashes."""
    n = len(d)
    if n == 0:
        return ref_hash(b"")
    if n == 1:
        return ref_hash(b"\x00" + d[0])
    k = ref_k(n)
    return ref_hash(b"\x01" + ref_mth(d[:k]) + ref_mth(d[k:]))


def ref_path(m: int, d: Sequence[bytes]) -> list[bytes]:
    n = len(d)
    if n == 1:
        return []
    k = ref_k(n)
    if m < k:
        return [*ref_path(m, d[:k]), ref_mth(d[k:])]
    return [*ref_path(m - k, d[k:]), ref_mth(d[:k])]


def ref_subproof(m: int, d: Sequence[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [ref_mth(d)]
    k = ref_k(n)
    if m <= k:
        return [*ref_subproof(m, d[:k], b), ref_mth(d[k:])]
    return [*ref_subproof(m - k, d[k:], False), ref_mth(d[:k])]


def ref_proof(m: int, d: Sequence[bytes]) -> list[bytes]:
    return ref_subproof(m, d, True)


def entries(n: int) -> list[bytes]:
    return [i.to_bytes(4, "big") + b"entry" for i in range(n)]


def flip(value: bytes, position: int = 0) -> bytes:
    position %= len(value)
    return value[:position] + bytes([value[position] ^ 0x01]) + value[position + 1 :]


# --------------------------------------------------------------------------------------------
# Known answers: RFC 6962 / Certificate Transparency test vectors
# --------------------------------------------------------------------------------------------

CT_LEAVES = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_INCLUSION = [  # (leaf index, tree size, path)
    (
        0,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (
        1,
        5,
        [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]
CT_CONSISTENCY = [  # (old size, new size, proof)
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        [
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]


def test_empty_tree_root_is_sha256_of_nothing() -> None:
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert root_from_leaf_hashes([]) == EMPTY_ROOT
    assert TreeFrontier.empty().root() == EMPTY_ROOT


def test_leaf_and_node_hashes_use_the_rfc_domain_prefixes() -> None:
    assert leaf_hash(b"abc") == hashlib.sha256(b"\x00abc").digest()
    left, right = b"L" * 32, b"R" * 32
    assert node_hash(left, right) == hashlib.sha256(b"\x01" + left + right).digest()


@pytest.mark.parametrize("size", range(1, 9))
def test_ct_vector_roots(size: int) -> None:
    hashes = [leaf_hash(e) for e in CT_LEAVES[:size]]
    assert root_from_leaf_hashes(hashes).hex() == CT_ROOTS[size - 1]
    assert TreeFrontier.from_leaf_hashes(hashes).root().hex() == CT_ROOTS[size - 1]


@pytest.mark.parametrize(("index", "size", "path"), CT_INCLUSION)
def test_ct_vector_inclusion_proofs(index: int, size: int, path: list[str]) -> None:
    hashes = [leaf_hash(e) for e in CT_LEAVES[:size]]
    proof = inclusion_proof(index, hashes)
    assert [p.hex() for p in proof] == path
    assert verify_inclusion(index, size, hashes[index], proof, bytes.fromhex(CT_ROOTS[size - 1]))


@pytest.mark.parametrize(("old", "new", "path"), CT_CONSISTENCY)
def test_ct_vector_consistency_proofs(old: int, new: int, path: list[str]) -> None:
    hashes = [leaf_hash(e) for e in CT_LEAVES[:new]]
    proof = consistency_proof(old, hashes)
    assert [p.hex() for p in proof] == path
    assert verify_consistency(old, new, bytes.fromhex(CT_ROOTS[old - 1]), bytes.fromhex(CT_ROOTS[new - 1]), proof)


# --------------------------------------------------------------------------------------------
# Against the reference, for many sizes
# --------------------------------------------------------------------------------------------

SIZES = st.one_of(st.integers(1, 300), st.sampled_from([511, 512, 513, 1000, 1024, 1025]))


@settings(max_examples=150, deadline=None)
@given(size=SIZES, data=st.data())
def test_roots_and_inclusion_proofs_equal_the_reference(size: int, data: st.DataObject) -> None:
    d = entries(size)
    hashes = [leaf_hash(e) for e in d]
    root = root_from_leaf_hashes(hashes)
    assert root == ref_mth(d)

    index = data.draw(st.integers(0, size - 1), label="index")
    proof = inclusion_proof(index, hashes)
    assert proof == ref_path(index, d)
    assert verify_inclusion(index, size, hashes[index], proof, root)


@settings(max_examples=150, deadline=None)
@given(size=SIZES, data=st.data())
def test_consistency_proofs_equal_the_reference(size: int, data: st.DataObject) -> None:
    d = entries(size)
    hashes = [leaf_hash(e) for e in d]
    old = data.draw(st.integers(1, size), label="old_size")
    proof = consistency_proof(old, hashes)
    if old < size:
        assert proof == ref_proof(old, d)
    else:
        assert proof == []
    assert verify_consistency(old, size, ref_mth(d[:old]), ref_mth(d), proof)


def test_every_index_and_prefix_of_small_trees() -> None:
    for size in range(1, 40):
        d = entries(size)
        hashes = [leaf_hash(e) for e in d]
        root = ref_mth(d)
        for index in range(size):
            proof = inclusion_proof(index, hashes)
            assert proof == ref_path(index, d)
            assert verify_inclusion(index, size, hashes[index], proof, root)
        for old in range(1, size):
            proof = consistency_proof(old, hashes)
            assert proof == ref_proof(old, d)
            assert verify_consistency(old, size, ref_mth(d[:old]), root, proof)


def test_proofs_from_a_perfect_subtree_callable_only_ask_for_aligned_perfect_subtrees() -> None:
    hashes = [leaf_hash(e) for e in entries(300)]
    inner = subtree_hasher_from_leaf_hashes(hashes)
    asked: list[tuple[int, int]] = []

    def perfect_only(start: int, end: int) -> bytes:
        width = end - start
        assert width > 0
        assert width & (width - 1) == 0
        assert start % width == 0
        asked.append((start, end))
        return inner(start, end)

    for size in (1, 2, 3, 77, 128, 255, 300):
        for index in (0, size // 3, size - 1):
            assert inclusion_proof_from(index, size, perfect_only) == inclusion_proof(index, hashes[:size])
        for old in (1, size // 2 or 1, size - 1 or 1):
            assert consistency_proof_from(old, size, perfect_only) == consistency_proof(old, hashes[:size])
    assert asked


def test_proof_generation_rejects_out_of_range_arguments() -> None:
    hashes = [leaf_hash(e) for e in entries(5)]
    with pytest.raises(MerkleError):
        inclusion_proof(5, hashes)
    with pytest.raises(MerkleError):
        inclusion_proof(-1, hashes)
    with pytest.raises(MerkleError):
        inclusion_proof(0, [])
    with pytest.raises(MerkleError):
        consistency_proof(6, hashes)
    with pytest.raises(MerkleError):
        consistency_proof(-1, hashes)
    with pytest.raises(MerkleError):
        root_from_leaf_hashes([b"short"])


def test_trivial_consistency_cases() -> None:
    hashes = [leaf_hash(e) for e in entries(7)]
    root = root_from_leaf_hashes(hashes)
    assert consistency_proof(0, hashes) == []
    assert consistency_proof(7, hashes) == []
    assert verify_consistency(0, 7, EMPTY_ROOT, root, [])
    assert verify_consistency(7, 7, root, root, [])
    assert verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    # ...and nothing else passes as trivial.
    assert not verify_consistency(0, 7, root, root, [])
    assert not verify_consistency(7, 7, root, flip(root), [])
    assert not verify_consistency(7, 7, root, root, [root])
    assert not verify_consistency(0, 7, EMPTY_ROOT, root, [root])
    assert not verify_consistency(3, 7, root_from_leaf_hashes(hashes[:3]), root, [])


# --------------------------------------------------------------------------------------------
# Tampering
# --------------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(size=st.integers(1, 300), data=st.data())
def test_tampered_inclusion_proofs_fail(size: int, data: st.DataObject) -> None:
    hashes = [leaf_hash(e) for e in entries(size)]
    root = root_from_leaf_hashes(hashes)
    index = data.draw(st.integers(0, size - 1), label="index")
    proof = inclusion_proof(index, hashes)
    leaf = hashes[index]
    assert verify_inclusion(index, size, leaf, proof, root)

    assert not verify_inclusion(index, size, flip(leaf), proof, root)
    assert not verify_inclusion(index, size, leaf, proof, flip(root, 31))
    assert not verify_inclusion(index, size, leaf, [*proof, root], root)
    assert not verify_inclusion(size, size, leaf, proof, root)
    assert not verify_inclusion(-1, size, leaf, proof, root)
    assert not verify_inclusion(index, size, leaf, [*proof, b"x" * 31], root)
    if proof:
        at = data.draw(st.integers(0, len(proof) - 1), label="at")
        bad = [*proof]
        bad[at] = flip(bad[at], at)
        assert not verify_inclusion(index, size, leaf, bad, root)
        assert not verify_inclusion(index, size, leaf, proof[:-1], root)
        if proof[::-1] != proof:
            assert not verify_inclusion(index, size, leaf, proof[::-1], root)
    other_index = data.draw(st.integers(0, size - 1), label="other_index")
    if other_index != index:
        assert not verify_inclusion(other_index, size, leaf, proof, root)
    other_size = data.draw(st.integers(1, 2 * size + 1), label="other_size")
    if index < other_size and ref_path_length(index, other_size) != len(proof):
        # The proof's shape is a function of (index, size); the pair (size, root) itself is bound
        # by the signed checkpoint, so a size whose shape happens to coincide is not a forgery.
        assert not verify_inclusion(index, other_size, leaf, proof, root)


def ref_path_length(m: int, n: int) -> int:
    if n == 1:
        return 0
    k = ref_k(n)
    return 1 + (ref_path_length(m, k) if m < k else ref_path_length(m - k, n - k))


@settings(max_examples=100, deadline=None)
@given(size=st.integers(2, 300), data=st.data())
def test_tampered_consistency_proofs_fail(size: int, data: st.DataObject) -> None:
    hashes = [leaf_hash(e) for e in entries(size)]
    new_root = root_from_leaf_hashes(hashes)
    old = data.draw(st.integers(1, size - 1), label="old_size")
    old_root = root_from_leaf_hashes(hashes[:old])
    proof = consistency_proof(old, hashes)
    assert verify_consistency(old, size, old_root, new_root, proof)

    assert not verify_consistency(old, size, flip(old_root), new_root, proof)
    assert not verify_consistency(old, size, old_root, flip(new_root, 7), proof)
    assert not verify_consistency(old, size, old_root, new_root, [])
    assert not verify_consistency(old, size, old_root, new_root, [*proof, new_root])
    assert not verify_consistency(old, size, old_root, new_root, proof[:-1])
    assert not verify_consistency(size, old, new_root, old_root, proof)
    assert not verify_consistency(old, size, old_root, new_root, [*proof[:-1], b"\x00" * 33])
    at = data.draw(st.integers(0, len(proof) - 1), label="at")
    bad = [*proof]
    bad[at] = flip(bad[at], at)
    assert not verify_consistency(old, size, old_root, new_root, bad)
    other_old = data.draw(st.integers(1, size - 1), label="other_old")
    if other_old != old:
        assert not verify_consistency(other_old, size, old_root, new_root, proof)
    # A different tree that shares the old prefix but not the new leaves.
    forked = [*hashes[:old], *[leaf_hash(b"fork" + h) for h in hashes[old:]]]
    assert not verify_consistency(old, size, old_root, root_from_leaf_hashes(forked), proof)


def test_verification_rejects_malformed_sizes_without_raising() -> None:
    h = leaf_hash(b"x")
    assert not verify_inclusion(0, 0, h, [], h)
    assert not verify_inclusion(0, 2**64, h, [], h)
    assert not verify_inclusion(0, 1, h[:31], [], h[:31])
    assert verify_inclusion(0, 1, h, [], h)
    assert not verify_consistency(-1, 1, EMPTY_ROOT, h, [])
    assert not verify_consistency(2, 1, h, h, [h])
    assert not verify_consistency(1, 2**64, h, h, [h])


# --------------------------------------------------------------------------------------------
# Incremental frontier
# --------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(batches=st.lists(st.integers(0, 40), min_size=1, max_size=20))
def test_frontier_extended_in_batches_through_storage_matches_the_reference(batches: list[int]) -> None:
    frontier = TreeFrontier.empty()
    d: list[bytes] = []
    for batch in batches:
        new = [f"{len(d) + i}".encode() for i in range(batch)]
        stored = frontier.to_bytes()
        frontier = TreeFrontier.from_bytes(stored).extend([leaf_hash(e) for e in new])
        d.extend(new)
        assert frontier.size == len(d)
        assert len(frontier.nodes) == len(d).bit_count()
        assert frontier.root() == ref_mth(d)
        assert len(frontier.to_bytes()) == 9 + 32 * len(d).bit_count()


def test_frontier_agrees_with_root_from_leaf_hashes_for_every_size() -> None:
    hashes = [leaf_hash(e) for e in entries(600)]
    frontier = TreeFrontier.empty()
    for n in range(600):
        assert frontier.root() == root_from_leaf_hashes(hashes[:n])
        frontier = frontier.extend([hashes[n]])


def test_frontier_extend_leaves_the_original_unchanged() -> None:
    before = TreeFrontier.from_leaf_hashes([leaf_hash(b"a")])
    after = before.extend([leaf_hash(b"b")])
    assert before.size == 1
    assert after.size == 2


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01" + (0).to_bytes(7, "big"),  # truncated header
        b"\x02" + (0).to_bytes(8, "big"),  # unknown version
        b"\x01" + (1).to_bytes(8, "big"),  # missing node
        b"\x01" + (1).to_bytes(8, "big") + b"\x00" * 31,
        b"\x01" + (1).to_bytes(8, "big") + b"\x00" * 33,
        b"\x01" + (3).to_bytes(8, "big") + b"\x00" * 32,
        b"\x01" + (0).to_bytes(8, "big") + b"\x00",
    ],
)
def test_frontier_from_bytes_rejects_malformed_state(data: bytes) -> None:
    with pytest.raises(MerkleError):
        TreeFrontier.from_bytes(data)


def test_frontier_rejects_inconsistent_construction() -> None:
    with pytest.raises(MerkleError):
        TreeFrontier(3, (b"\x00" * 32,))
    with pytest.raises(MerkleError):
        TreeFrontier(-1, ())
    with pytest.raises(MerkleError):
        TreeFrontier.empty().extend([b"\x00" * 31])


@settings(max_examples=100, deadline=None)
@given(size=st.integers(1, 300), data=st.data())
def test_a_proof_longer_than_its_tree_fails_even_when_it_hashes_to_the_root(size: int, data: st.DataObject) -> None:
    # Past the top of the tree each extra element wraps the root once more: a verifier that kept going
    # (RFC 9162 step 4a / 6a skipped) would accept the leaf, or the prefix, under a made-up root.
    hashes = [leaf_hash(e) for e in entries(size)]
    root = root_from_leaf_hashes(hashes)
    extra = leaf_hash(b"beyond the top")
    index = data.draw(st.integers(0, size - 1), label="index")
    proof = inclusion_proof(index, hashes)
    assert verify_inclusion(index, size, hashes[index], proof, root)
    assert not verify_inclusion(index, size, hashes[index], [*proof, extra], node_hash(extra, root))
    if size >= 2:
        old = data.draw(st.integers(1, size - 1), label="old_size")
        old_root = root_from_leaf_hashes(hashes[:old])
        consistency = consistency_proof(old, hashes)
        assert verify_consistency(old, size, old_root, root, consistency)
        wrapped_old, wrapped_new = node_hash(extra, old_root), node_hash(extra, root)
        assert not verify_consistency(old, size, wrapped_old, wrapped_new, [*consistency, extra])


def ref_consistency_length(m: int, n: int) -> int:
    return len(ref_proof(m, entries(n)))


@settings(max_examples=100, deadline=None)
@given(size=st.integers(2, 200), data=st.data())
def test_a_consistency_proof_does_not_stretch_to_a_larger_new_size(size: int, data: st.DataObject) -> None:
    # A log must not pass off its tree of `size` leaves, root unchanged, as a larger one: the proof for
    # (old, size) runs out before a larger tree's path is done (RFC 9162 step 7 checks sn == 0).
    hashes = [leaf_hash(e) for e in entries(size)]
    root = root_from_leaf_hashes(hashes)
    old = data.draw(st.integers(1, size - 1), label="old_size")
    old_root = root_from_leaf_hashes(hashes[:old])
    proof = consistency_proof(old, hashes)
    claimed = data.draw(st.integers(size + 1, 2 * size + 1), label="claimed_size")
    if ref_consistency_length(old, claimed) != len(proof):
        # As for inclusion: a size whose proof has the same shape is bound by the signed checkpoint.
        assert not verify_consistency(old, claimed, old_root, root, proof)


def test_proof_elements_that_are_not_hashes_are_refused_without_raising() -> None:
    hashes = [leaf_hash(e) for e in entries(5)]
    root = root_from_leaf_hashes(hashes)
    proof = inclusion_proof(2, hashes)
    assert verify_inclusion(2, 5, hashes[2], proof, root)
    for bad in ("x" * 32, proof[0].hex(), None, proof[0][:31], proof[0] + b"\x00"):
        assert not verify_inclusion(2, 5, hashes[2], [bad, *proof[1:]], root)  # type: ignore[list-item]
