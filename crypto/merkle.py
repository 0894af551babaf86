"""RFC 9162 (Certificate Transparency v2) Merkle tree hashing, proofs and incremental state.

Hashes (RFC 9162 §2.1.1), SHA-256 throughout:

- empty tree: ``SHA-256("")``
- leaf: ``SHA-256(0x00 || entry)``
- node: ``SHA-256(0x01 || left || right)``

The tree over ``n`` leaves splits at ``k``, the largest power of two smaller than ``n``. Every
node of such a tree is either a *perfect* subtree (a power-of-two number of leaves starting at a
multiple of that power) or the right edge of one level, which is a fold of perfect subtrees. That
is why proofs can be built from a callable that only answers perfect-subtree hashes
(:data:`SubtreeHasher`).

Proof verification (:func:`verify_inclusion`, :func:`verify_consistency`) follows the numbered
steps of RFC 9162 §2.1.3.2 and §2.1.4.2 exactly and returns ``False`` for anything malformed; it
never raises. Generation raises :class:`MerkleError` for arguments out of range.

:class:`TreeFrontier` is the sequencer's incremental state: the roots of the perfect subtrees that
make up ``[0, size)`` (one per set bit of ``size``, at most 64 hashes), serializable to one small
byte string.

:func:`encode_fields` / :func:`decode_fields` are the canonical, type-tagged binary encoding of an
ordered list of named fields, so the service and an offline verifier hash the same entry bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "MAX_TREE_SIZE",
    "EncodingError",
    "FieldValue",
    "MerkleError",
    "SubtreeHasher",
    "SubtreeNode",
    "TreeFrontier",
    "consistency_proof",
    "consistency_proof_from",
    "decode_fields",
    "encode_fields",
    "inclusion_proof",
    "inclusion_proof_from",
    "leaf_hash",
    "node_hash",
    "root_from_leaf_hashes",
    "subtree_hasher_from_leaf_hashes",
    "subtree_hasher_from_nodes",
    "subtree_ranges",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
"""Length in bytes of every hash in the tree (SHA-256)."""

MAX_TREE_SIZE = 2**64 - 1
"""RFC 9162 tree sizes are uint64."""

EMPTY_ROOT = hashlib.sha256(b"").digest()
"""MTH({}) = SHA-256 of the empty string."""

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"

SubtreeHasher = Callable[[int, int], bytes]
"""``(start, end) -> MTH(D[start:end])`` for a *perfect, aligned* subtree only:
``end - start`` is a power of two and ``start`` is a multiple of it."""


class MerkleError(ValueError):
    """An argument to a tree function is out of range, or serialized tree state is malformed."""


class EncodingError(ValueError):
    """A field list cannot be encoded, or bytes are not a canonical field encoding."""


# --------------------------------------------------------------------------------------------
# Hashing
# --------------------------------------------------------------------------------------------


def leaf_hash(entry: bytes) -> bytes:
    """Return the RFC 9162 leaf hash ``SHA-256(0x00 || entry)``."""
    return hashlib.sha256(_LEAF_PREFIX + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Return the RFC 9162 interior node hash ``SHA-256(0x01 || left || right)``."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _check_hash(value: bytes, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        raise MerkleError(f"{what} must be {HASH_SIZE} bytes")


def _split(n: int) -> int:
    """Largest power of two strictly smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def _fold_right(nodes: Sequence[bytes]) -> bytes:
    """Combine perfect-subtree roots (left to right, decreasing size) into the MTH of their union."""
    if not nodes:
        return EMPTY_ROOT
    acc = nodes[-1]
    for left in reversed(nodes[:-1]):
        acc = node_hash(left, acc)
    return acc


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """Return the Merkle tree hash (RFC 9162 §2.1.1 MTH) of a list of leaf hashes.

    Iterative: O(n) hash operations and O(log n) memory. Equal to the RFC's recursive definition
    for every size, including ``EMPTY_ROOT`` for no leaves.
    """
    return TreeFrontier.empty().extend(hashes).root()


# --------------------------------------------------------------------------------------------
# Proof generation
# --------------------------------------------------------------------------------------------


def subtree_hasher_from_leaf_hashes(leaf_hashes: Sequence[bytes]) -> SubtreeHasher:
    """Return a :data:`SubtreeHasher` that computes subtree roots from an in-memory leaf-hash list.

    Each call costs ``end - start`` leaf reads and about as many hash operations.
    """

    def subtree_hash(start: int, end: int) -> bytes:
        if not 0 <= start < end <= len(leaf_hashes):
            raise MerkleError("subtree range outside the leaf list")
        return root_from_leaf_hashes(leaf_hashes[start:end])

    return subtree_hash


def _range_hash(start: int, end: int, subtree_hash: SubtreeHasher) -> bytes:
    """MTH(D[start:end]) for a node range of the RFC tree, from perfect-subtree hashes.

    Ranges produced by the RFC's split start at a multiple of the largest power of two not above
    their length, so decomposing the length into descending powers of two yields aligned perfect
    subtrees, whose roots fold right-to-left into the range's root.
    """
    nodes: list[bytes] = []
    pos = start
    remaining = end - start
    while remaining:
        width = 1 << (remaining.bit_length() - 1)
        value = subtree_hash(pos, pos + width)
        _check_hash(value, "subtree hash")
        nodes.append(value)
        pos += width
        remaining -= width
    return _fold_right(nodes)


def inclusion_proof_from(index: int, size: int, subtree_hash: SubtreeHasher) -> list[bytes]:
    """Return the RFC 9162 §2.1.3.1 inclusion path ``PATH(index, D[0:size])``, leaf level first.

    ``subtree_hash`` answers perfect-subtree roots (see :data:`SubtreeHasher`). The requested
    subtrees are disjoint, so they cover at most ``size - 1`` leaves in total: with a leaf-backed
    hasher this is O(size) work; with stored subtree hashes it is O(log² size) calls.
    """
    if not 0 <= index < size <= MAX_TREE_SIZE:
        raise MerkleError("inclusion proof needs 0 <= index < size")
    path: list[bytes] = []
    start, end = 0, size
    while end - start > 1:
        mid = start + _split(end - start)
        if index < mid:
            path.append(_range_hash(mid, end, subtree_hash))
            end = mid
        else:
            path.append(_range_hash(start, mid, subtree_hash))
            start = mid
    # Collected top-down; the RFC lists the path from the leaf upwards.
    path.reverse()
    return path


def inclusion_proof(index: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """Return the inclusion path for leaf ``index`` in the tree over all of ``leaf_hashes``.

    O(n) hash operations for n leaves.
    """
    return inclusion_proof_from(index, len(leaf_hashes), subtree_hasher_from_leaf_hashes(leaf_hashes))


def consistency_proof_from(old_size: int, new_size: int, subtree_hash: SubtreeHasher) -> list[bytes]:
    """Return the RFC 9162 §2.1.4.1 consistency proof ``PROOF(old_size, D[0:new_size])``.

    The RFC defines the proof for ``0 < old_size < new_size``; for ``old_size == 0`` or
    ``old_size == new_size`` there is nothing to prove and the proof is empty (which
    :func:`verify_consistency` accepts for exactly those cases). Cost as for
    :func:`inclusion_proof_from`: the requested subtrees are disjoint.
    """
    if not 0 <= old_size <= new_size <= MAX_TREE_SIZE:
        raise MerkleError("consistency proof needs 0 <= old_size <= new_size")
    if old_size in (0, new_size):
        return []
    proof: list[bytes] = []
    start, end = 0, new_size
    m = old_size  # SUBPROOF's m, relative to start
    whole_old_tree = True  # SUBPROOF's b: the current subtree is a prefix the verifier knows
    while m != end - start:
        mid = start + _split(end - start)
        if m <= mid - start:
            proof.append(_range_hash(mid, end, subtree_hash))
            end = mid
        else:
            proof.append(_range_hash(start, mid, subtree_hash))
            m -= mid - start
            start = mid
            whole_old_tree = False
    if not whole_old_tree:
        proof.append(_range_hash(start, end, subtree_hash))
    proof.reverse()
    return proof


def consistency_proof(old_size: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """Return the consistency proof from the first ``old_size`` leaves to all of ``leaf_hashes``.

    O(n) hash operations for n leaves.
    """
    return consistency_proof_from(old_size, len(leaf_hashes), subtree_hasher_from_leaf_hashes(leaf_hashes))


# --------------------------------------------------------------------------------------------
# Proof verification (RFC 9162 §2.1.3.2 and §2.1.4.2, step by step)
# --------------------------------------------------------------------------------------------


def _all_hashes(values: Sequence[bytes]) -> bool:
    return all(isinstance(v, bytes) and len(v) == HASH_SIZE for v in values)


def verify_inclusion(index: int, size: int, leaf_hash: bytes, proof: Sequence[bytes], root: bytes) -> bool:
    """Return whether ``proof`` shows leaf hash ``leaf_hash`` at ``index`` in the tree ``(size, root)``.

    RFC 9162 §2.1.3.2. Malformed input (sizes out of range, hashes of the wrong length, a path
    too long or too short) yields ``False``.
    """
    if not _all_hashes([leaf_hash, root, *proof]) or size > MAX_TREE_SIZE:
        return False
    # 1. leaf_index >= tree_size fails.
    if not 0 <= index < size:
        return False
    # 2.-3.
    fn, sn = index, size - 1
    r = leaf_hash
    # 4.
    for p in proof:
        # a.
        if sn == 0:
            return False
        # b.
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not (fn & 1 or fn == 0):
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        # c.
        fn >>= 1
        sn >>= 1
    # 5.
    return sn == 0 and hmac.compare_digest(r, root)


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]) -> bool:
    """Return whether ``proof`` shows tree ``(old_size, old_root)`` is a prefix of ``(new_size, new_root)``.

    RFC 9162 §2.1.4.2 for ``0 < old_size < new_size``. The trivial cases the RFC leaves out
    are decided without a proof (and only with an empty one): equal sizes need equal roots, and
    the empty tree (whose root must be :data:`EMPTY_ROOT`) is a prefix of every tree.
    """
    if not _all_hashes([old_root, new_root, *proof]):
        return False
    if not 0 <= old_size <= new_size <= MAX_TREE_SIZE:
        return False
    if old_size == new_size:
        return not proof and hmac.compare_digest(old_root, new_root)
    if old_size == 0:
        return not proof and hmac.compare_digest(old_root, EMPTY_ROOT)
    first, second = old_size, new_size
    # 1.
    if not proof:
        return False
    path = list(proof)
    # 2.
    if first & (first - 1) == 0:
        path.insert(0, old_root)
    # 3.
    fn, sn = first - 1, second - 1
    # 4.
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # 5.
    fr = sr = path[0]
    # 6.
    for c in path[1:]:
        # a.
        if sn == 0:
            return False
        # b.
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not (fn & 1 or fn == 0):
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        # c.
        fn >>= 1
        sn >>= 1
    # 7.
    return sn == 0 and hmac.compare_digest(fr, old_root) and hmac.compare_digest(sr, new_root)


# --------------------------------------------------------------------------------------------
# Incremental state
# --------------------------------------------------------------------------------------------

_FRONTIER_VERSION = 1
_FRONTIER_HEADER = struct.Struct(">BQ")


@dataclass(frozen=True, slots=True)
class SubtreeNode:
    """The root hash of the perfect subtree over leaves ``[idx * 2**level, (idx + 1) * 2**level)``."""

    level: int
    idx: int
    hash: bytes


def subtree_ranges(build: Callable[[SubtreeHasher], object]) -> list[tuple[int, int]]:
    """The perfect subtrees (as ``(level, idx)``) that ``build`` asks its hasher for.

    Which subtrees a proof needs depends only on indexes and sizes, never on hash values, so a
    dry run with placeholder hashes names them; fetch those nodes in one query, then run ``build``
    again with a hasher over what was fetched.
    """
    wanted: list[tuple[int, int]] = []

    def record(start: int, end: int) -> bytes:
        level = (end - start).bit_length() - 1
        wanted.append((level, start >> level))
        return bytes(HASH_SIZE)

    build(record)
    return wanted


def subtree_hasher_from_nodes(nodes: dict[tuple[int, int], bytes]) -> SubtreeHasher:
    """A :data:`SubtreeHasher` over stored nodes keyed by ``(level, idx)``; a missing node is an error."""

    def subtree_hash(start: int, end: int) -> bytes:
        level = (end - start).bit_length() - 1
        try:
            return nodes[(level, start >> level)]
        except KeyError:
            raise MerkleError("a subtree node needed for this proof is missing") from None

    return subtree_hash


@dataclass(frozen=True, slots=True)
class TreeFrontier:
    """The compact range ``[0, size)``: roots of the perfect subtrees covering the tree so far.

    ``nodes`` holds one root per set bit of ``size``, largest (leftmost) subtree first, so
    ``len(nodes) == size.bit_count() <= 64``. Immutable: :meth:`extend` returns a new frontier,
    so a failed batch leaves the stored state untouched. Appending n leaves costs O(n) hash
    operations amortized; :meth:`root` costs O(log size).

    Serialized form (:meth:`to_bytes`): ``0x01 || uint64be(size) || nodes[0] || ... ||
    nodes[-1]``, exactly ``9 + 32 * popcount(size)`` bytes.
    """

    size: int
    nodes: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or not 0 <= self.size <= MAX_TREE_SIZE:
            raise MerkleError("tree size out of range")
        if len(self.nodes) != self.size.bit_count():
            raise MerkleError("frontier must hold one node per set bit of the size")
        for node in self.nodes:
            _check_hash(node, "frontier node")

    @classmethod
    def empty(cls) -> TreeFrontier:
        """Return the frontier of the empty tree."""
        return cls(0, ())

    @classmethod
    def from_leaf_hashes(cls, leaf_hashes: Iterable[bytes]) -> TreeFrontier:
        """Return the frontier of the tree over ``leaf_hashes``."""
        return cls.empty().extend(leaf_hashes)

    def extend(self, leaf_hashes: Iterable[bytes]) -> TreeFrontier:
        """Return the frontier after appending ``leaf_hashes`` (in order) to this tree."""
        nodes = list(self.nodes)
        size = self.size
        for value in leaf_hashes:
            _check_hash(value, "leaf hash")
            if size == MAX_TREE_SIZE:
                raise MerkleError("tree is full")
            # Each trailing one bit of the old size is a perfect subtree of the same height as
            # the one being carried: merge them, like binary addition of 1.
            carry = value
            bits = size
            while bits & 1:
                carry = node_hash(nodes.pop(), carry)
                bits >>= 1
            nodes.append(carry)
            size += 1
        return TreeFrontier(size, tuple(nodes))

    def extend_with_nodes(self, leaf_hashes: Iterable[bytes]) -> tuple[TreeFrontier, list[SubtreeNode]]:
        """Like :meth:`extend`, and also return every perfect subtree the new leaves complete.

        A node ``(level, idx, hash)`` is the root of leaves ``[idx * 2**level, (idx + 1) * 2**level)``;
        level 0 nodes are the leaf hashes themselves. Stored as they appear, these nodes answer any
        :data:`SubtreeHasher` request, so proofs over a large log need O(log² size) lookups.
        """
        nodes = list(self.nodes)
        size = self.size
        completed: list[SubtreeNode] = []
        for value in leaf_hashes:
            _check_hash(value, "leaf hash")
            if size == MAX_TREE_SIZE:
                raise MerkleError("tree is full")
            carry, level, bits = value, 0, size
            completed.append(SubtreeNode(0, size, value))
            while bits & 1:
                carry = node_hash(nodes.pop(), carry)
                bits >>= 1
                level += 1
                completed.append(SubtreeNode(level, size >> level, carry))
            nodes.append(carry)
            size += 1
        return TreeFrontier(size, tuple(nodes)), completed

    def root(self) -> bytes:
        """Return the Merkle tree hash of ``[0, size)``."""
        return _fold_right(self.nodes)

    def to_bytes(self) -> bytes:
        """Serialize as ``0x01 || uint64be(size) || node hashes`` (see the class docstring)."""
        return _FRONTIER_HEADER.pack(_FRONTIER_VERSION, self.size) + b"".join(self.nodes)

    @classmethod
    def from_bytes(cls, data: bytes) -> TreeFrontier:
        """Parse :meth:`to_bytes` output; raise :class:`MerkleError` on any deviation."""
        if not isinstance(data, bytes) or len(data) < _FRONTIER_HEADER.size:
            raise MerkleError("malformed tree frontier")
        version, size = _FRONTIER_HEADER.unpack_from(data)
        if version != _FRONTIER_VERSION:
            raise MerkleError("unknown tree frontier version")
        body = data[_FRONTIER_HEADER.size :]
        if len(body) != HASH_SIZE * size.bit_count():
            raise MerkleError("malformed tree frontier")
        nodes = tuple(body[i : i + HASH_SIZE] for i in range(0, len(body), HASH_SIZE))
        return cls(size, nodes)


# --------------------------------------------------------------------------------------------
# Canonical field encoding
# --------------------------------------------------------------------------------------------

FieldValue = str | int | bytes | None

_FIELDS_VERSION = 1
_TAG_NONE = 0x00
_TAG_BYTES = 0x01
_TAG_STR = 0x02
_TAG_INT = 0x03
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_INT_MIN = -(2**63)
_INT_MAX = 2**63 - 1


def encode_fields(fields: Sequence[tuple[str, FieldValue]]) -> bytes:
    """Return the canonical binary encoding of an ordered list of named, typed fields.

    Format (all integers big-endian)::

        entry = 0x01 (version) || u32 field_count || field*
        field = u16 len(name) || UTF-8 name || tag || value
        tag 0x00 None   value: (nothing)
        tag 0x01 bytes  value: u32 len || bytes
        tag 0x02 str    value: u32 len || UTF-8
        tag 0x03 int    value: 8-byte two's complement (int64)

    Every length is explicit and every value is type-tagged, so distinct field lists never share an
    encoding. Names must be non-empty and unique. ``bool`` is refused (it is an ``int`` in
    Python but would not round-trip); ints must fit in int64. Raises :class:`EncodingError` for
    values out of range and :class:`TypeError` for values of other types.
    """
    if len(fields) > 0xFFFFFFFF:
        raise EncodingError("too many fields")
    out = [bytes([_FIELDS_VERSION]), _U32.pack(len(fields))]
    seen: set[str] = set()
    for field in fields:
        if not isinstance(field, tuple) or len(field) != 2:
            raise TypeError("each field must be a (name, value) tuple")
        name, value = field
        if not isinstance(name, str):
            raise TypeError("field names must be str")
        if name in seen:
            raise EncodingError("duplicate field name")
        seen.add(name)
        raw_name = _utf8(name)
        if not 0 < len(raw_name) <= 0xFFFF:
            raise EncodingError("field name must be 1..65535 UTF-8 bytes")
        out.append(_U16.pack(len(raw_name)))
        out.append(raw_name)
        out.append(_encode_value(value))
    return b"".join(out)


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        raise EncodingError("text is not encodable as UTF-8") from None


def _encode_value(value: FieldValue) -> bytes:
    if value is None:
        return bytes([_TAG_NONE])
    if isinstance(value, bool):
        raise TypeError("bool field values are not supported; use an int")
    if isinstance(value, bytes):
        return bytes([_TAG_BYTES]) + _length_prefixed(value)
    if isinstance(value, str):
        return bytes([_TAG_STR]) + _length_prefixed(_utf8(value))
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise EncodingError("int field values must fit in int64")
        return bytes([_TAG_INT]) + _I64.pack(value)
    raise TypeError("field values must be str, int, bytes or None")


def _length_prefixed(raw: bytes) -> bytes:
    if len(raw) > 0xFFFFFFFF:
        raise EncodingError("field value too long")
    return _U32.pack(len(raw)) + raw


def decode_fields(data: bytes) -> list[tuple[str, FieldValue]]:
    """Decode :func:`encode_fields` output, strictly; raise :class:`EncodingError` if malformed.

    Rejects an unknown version or tag, truncation, trailing bytes, invalid UTF-8, empty or
    duplicate names: every accepted input re-encodes to exactly the same bytes.
    """
    if not isinstance(data, bytes):
        raise EncodingError("field encoding must be bytes")
    reader = _Reader(data)
    if reader.take(1)[0] != _FIELDS_VERSION:
        raise EncodingError("unknown field encoding version")
    (count,) = _U32.unpack(reader.take(4))
    fields: list[tuple[str, FieldValue]] = []
    seen: set[str] = set()
    for _ in range(count):
        (name_len,) = _U16.unpack(reader.take(2))
        if name_len == 0:
            raise EncodingError("empty field name")
        name = _from_utf8(reader.take(name_len))
        if name in seen:
            raise EncodingError("duplicate field name")
        seen.add(name)
        tag = reader.take(1)[0]
        value: FieldValue
        if tag == _TAG_NONE:
            value = None
        elif tag == _TAG_BYTES:
            (length,) = _U32.unpack(reader.take(4))
            value = reader.take(length)
        elif tag == _TAG_STR:
            (length,) = _U32.unpack(reader.take(4))
            value = _from_utf8(reader.take(length))
        elif tag == _TAG_INT:
            (value,) = _I64.unpack(reader.take(8))
        else:
            raise EncodingError("unknown field type tag")
        fields.append((name, value))
    if not reader.at_end():
        raise EncodingError("trailing bytes after field encoding")
    return fields


def _from_utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")  # strict: rejects overlong forms and surrogates
    except UnicodeDecodeError:
        raise EncodingError("invalid UTF-8 in field encoding") from None


class _Reader:
    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise EncodingError("truncated field encoding")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def at_end(self) -> bool:
        return self._pos == len(self._data)
