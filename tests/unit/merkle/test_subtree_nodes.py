"""Stored subtree nodes answer proofs exactly as the whole leaf list does."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.merkle import (
    TreeFrontier,
    consistency_proof,
    consistency_proof_from,
    inclusion_proof,
    inclusion_proof_from,
    leaf_hash,
    subtree_hasher_from_nodes,
    subtree_ranges,
)


def _leaves(n: int) -> list[bytes]:
    return [leaf_hash(hashlib.sha256(str(i).encode()).digest()) for i in range(n)]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=8), st.data())
def test_nodes_from_batches_answer_every_proof(batches: list[int], data: st.DataObject) -> None:
    leaves = _leaves(sum(batches))
    frontier, stored, start = TreeFrontier.empty(), {}, 0
    for batch in batches:
        frontier, nodes = frontier.extend_with_nodes(leaves[start : start + batch])
        for node in nodes:
            assert (node.level, node.idx) not in stored  # each node is completed exactly once
            stored[(node.level, node.idx)] = node.hash
        start += batch
    assert frontier == TreeFrontier.from_leaf_hashes(leaves)
    size = len(leaves)
    assert sum(1 for level, _ in stored if level == 0) == size

    index = data.draw(st.integers(min_value=0, max_value=size - 1))
    wanted = subtree_ranges(lambda h: inclusion_proof_from(index, size, h))
    hasher = subtree_hasher_from_nodes({key: stored[key] for key in wanted})
    assert inclusion_proof_from(index, size, hasher) == inclusion_proof(index, leaves)

    old = data.draw(st.integers(min_value=1, max_value=size))
    wanted = subtree_ranges(lambda h: consistency_proof_from(old, size, h))
    hasher = subtree_hasher_from_nodes({key: stored[key] for key in wanted})
    assert consistency_proof_from(old, size, hasher) == consistency_proof(old, leaves)
