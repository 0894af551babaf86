"""Attachment streams: round trips across chunk boundaries; any reordering, dropping, duplication,
truncation, extension, transplant or flipped byte is detected."""

from __future__ import annotations

import itertools
import struct
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto import _format
from crypto.envelope import open_record, read_key_ref, seal
from crypto.errors import DecryptionError
from crypto.keys import DataKey
from crypto.stream import (
    CHUNK_HEADER_BYTES,
    StreamOpener,
    StreamSealer,
    open_chunk,
    open_stream,
    seal_stream,
)

CHEAP = settings(max_examples=200, deadline=None)
KEY = DataKey(UUID("0190d6a4-2222-7000-8000-00000000000b"), 3, bytes(range(100, 132)))
OTHER_KEY = DataKey(UUID("0190d6a4-2222-7000-8000-00000000000c"), 3, bytes(range(32)))
OBJECT = "att-0190d6a4"
CONTEXT = {"tenant": "st-elsewhere", "column": "attachments.chunks", "thread": "th-1"}


def sealed(data: bytes, chunk_size: int = 8, object_id: str = OBJECT) -> list[bytes]:
    return list(seal_stream(KEY, [data], object_id=object_id, context=CONTEXT, chunk_size=chunk_size))


def opened(chunks: list[bytes], object_id: str = OBJECT, key: DataKey = KEY) -> bytes:
    return b"".join(open_stream(key, chunks, object_id=object_id, context=CONTEXT))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@CHEAP
@given(
    data=st.binary(max_size=200),
    chunk_size=st.integers(1, 33),
    cuts=st.lists(st.integers(0, 200), max_size=6),
)
def test_round_trip_any_size_any_piece_boundaries(data: bytes, chunk_size: int, cuts: list[int]) -> None:
    pieces = split(data, cuts)
    chunks = list(seal_stream(KEY, pieces, object_id=OBJECT, context=CONTEXT, chunk_size=chunk_size))
    expected_count = max(1, -(-len(data) // chunk_size))
    assert len(chunks) == expected_count
    assert all(len(c) == CHUNK_HEADER_BYTES + 16 + chunk_size for c in chunks[:-1])
    assert opened(chunks) == data


def test_an_empty_stream_is_one_empty_final_chunk() -> None:
    chunks = sealed(b"")
    assert len(chunks) == 1
    assert open_chunk(KEY, chunks[0], object_id=OBJECT, context=CONTEXT, index=0) == (b"", True)
    assert opened(chunks) == b""


def test_an_exact_multiple_of_the_chunk_size_has_no_empty_tail() -> None:
    chunks = sealed(bytes(24), chunk_size=8)
    assert len(chunks) == 3
    assert open_chunk(KEY, chunks[2], object_id=OBJECT, context=CONTEXT, index=2) == (bytes(8), True)


@st.composite
def manipulated(draw: st.DrawFn) -> tuple[list[bytes], list[bytes]]:
    """An honest chunk list and a manipulated copy of it."""
    data = draw(st.binary(max_size=64))
    chunks = sealed(data, chunk_size=draw(st.integers(1, 16)))
    bad = list(chunks)
    how = draw(st.sampled_from(["reorder", "drop", "duplicate", "truncate", "flip", "append", "foreign"]))
    n = len(bad)
    if how == "reorder" and n >= 2:
        i, j = draw(st.lists(st.integers(0, n - 1), min_size=2, max_size=2, unique=True))
        bad[i], bad[j] = bad[j], bad[i]
    elif how == "drop" and n >= 2:
        del bad[draw(st.integers(0, n - 1))]
    elif how == "duplicate":
        i = draw(st.integers(0, n - 1))
        bad.insert(draw(st.integers(0, n)), bad[i])
    elif how == "truncate" and n >= 2:
        bad = bad[: draw(st.integers(0, n - 1))]
    elif how == "append":
        bad.append(draw(st.sampled_from(sealed(b"more", chunk_size=2))))
    elif how == "foreign":
        foreign = sealed(data, chunk_size=16, object_id="another-attachment")
        i = draw(st.integers(0, min(n, len(foreign)) - 1))
        bad[i] = foreign[i]
    else:  # "flip", or a manipulation that needs more chunks than there are
        i = draw(st.integers(0, n - 1))
        chunk = bytearray(bad[i])
        chunk[draw(st.integers(0, len(chunk) - 1))] ^= draw(st.integers(1, 255))
        bad[i] = bytes(chunk)
    return chunks, bad


@CHEAP
@given(pair=manipulated())
def test_any_manipulation_of_the_chunk_sequence_fails(pair: tuple[list[bytes], list[bytes]]) -> None:
    honest, bad = pair
    assert bad != honest
    with pytest.raises(DecryptionError):
        opened(bad)


def test_named_manipulations_fail() -> None:
    c = sealed(b"0123456789abcdefghij", chunk_size=4)  # five chunks
    assert opened(c) == b"0123456789abcdefghij"
    cases = {
        "reordered": [c[1], c[0], *c[2:]],
        "dropped middle": [*c[:2], *c[3:]],
        "dropped final": c[:-1],
        "duplicated": [c[0], *c],
        "final repeated": [*c, c[-1]],
        "empty": [],
        "other object": sealed(b"0123456789abcdefghij", chunk_size=4, object_id="other"),
    }
    for name, chunks in cases.items():
        with pytest.raises(DecryptionError):
            opened(chunks)
        assert name


def test_a_stream_does_not_open_under_another_key_or_context() -> None:
    chunks = sealed(b"attachment bytes")
    with pytest.raises(DecryptionError):
        opened(chunks, key=OTHER_KEY)
    with pytest.raises(DecryptionError):
        b"".join(open_stream(KEY, chunks, object_id=OBJECT, context={**CONTEXT, "tenant": "mercy"}))


def test_chunks_and_records_are_not_interchangeable() -> None:
    record = seal(KEY, b"body", CONTEXT)
    with pytest.raises(DecryptionError):
        opened([record])
    chunk = sealed(b"body")[0]
    with pytest.raises(DecryptionError):
        open_record(KEY, chunk, CONTEXT)
    assert read_key_ref(chunk) == (KEY.id, KEY.version)


def test_truncation_is_only_reported_at_the_end_and_the_opener_then_refuses() -> None:
    chunks = sealed(b"0123456789", chunk_size=4)
    opener = StreamOpener(KEY, object_id=OBJECT, context=CONTEXT)
    assert opener.update(chunks[0]) == b"0123"
    assert opener.update(chunks[1]) == b"4567"
    with pytest.raises(DecryptionError):
        opener.finish()
    with pytest.raises(DecryptionError):
        opener.update(chunks[2])  # poisoned after a failure


def test_open_chunk_gives_random_access_and_checks_the_position() -> None:
    chunks = sealed(b"0123456789", chunk_size=4)
    assert open_chunk(KEY, chunks[1], object_id=OBJECT, context=CONTEXT, index=1) == (b"4567", False)
    assert open_chunk(KEY, chunks[2], object_id=OBJECT, context=CONTEXT, index=2) == (b"89", True)
    with pytest.raises(DecryptionError):
        open_chunk(KEY, chunks[1], object_id=OBJECT, context=CONTEXT, index=2)


def test_the_push_api_holds_at_most_one_chunk() -> None:
    sealer = StreamSealer(KEY, object_id=OBJECT, context=CONTEXT, chunk_size=4)
    assert sealer.update(b"abcd") == []  # could still be the final chunk
    assert len(sealer.update(b"e")) == 1
    assert len(sealer.update(bytearray(b"fghijklm"))) == 2
    final = sealer.finish()
    with pytest.raises(ValueError, match="after finish"):
        sealer.update(b"x")
    with pytest.raises(ValueError, match="twice"):
        sealer.finish()
    assert open_chunk(KEY, final, object_id=OBJECT, context=CONTEXT, index=3) == (b"m", True)
    assert len(sealer._buffer) == 0


def test_memory_is_bounded_by_the_chunk_size() -> None:
    sealer = StreamSealer(KEY, object_id=OBJECT, context=CONTEXT, chunk_size=1024)
    for _ in range(100):
        sealer.update(bytes(700))
        assert len(sealer._buffer) <= 1024


@pytest.mark.parametrize("size", [0, -1, 16 * 1024 * 1024 + 1])
def test_chunk_size_is_bounded(size: int) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        StreamSealer(KEY, object_id=OBJECT, context=CONTEXT, chunk_size=size)


def test_reprs_hold_no_key_material() -> None:
    sealer = StreamSealer(KEY, object_id=OBJECT, context=CONTEXT)
    opener = StreamOpener(KEY, object_id=OBJECT, context=CONTEXT)
    for text in (repr(sealer), repr(opener)):
        assert KEY.secret.hex() not in text
        assert repr(KEY.secret) not in text


@CHEAP
@given(data=st.binary(max_size=40), chunk_size=st.integers(1, 16), pick=st.integers(0, 40), cut=st.integers(0, 200))
def test_a_chunk_cut_short_anywhere_fails_with_the_one_error(data: bytes, chunk_size: int, pick: int, cut: int) -> None:
    # A row truncated in storage: every length, including a prefix too short to hold the chunk position.
    chunks = sealed(data, chunk_size=chunk_size)
    i = pick % len(chunks)
    short = chunks[i][: cut % len(chunks[i])]
    with pytest.raises(DecryptionError):
        open_chunk(KEY, short, object_id=OBJECT, context=CONTEXT, index=i)
    with pytest.raises(DecryptionError):
        opened([*chunks[:i], short, *chunks[i + 1 :]])


def test_after_a_bad_chunk_the_opener_refuses_even_the_right_one() -> None:
    chunks = sealed(b"0123456789", chunk_size=4)
    opener = StreamOpener(KEY, object_id=OBJECT, context=CONTEXT)
    assert opener.update(chunks[0]) == b"0123"
    with pytest.raises(DecryptionError):
        opener.update(chunks[2])  # chunk 1 skipped
    # A caller that swallows the error cannot carry on as if chunk 1 had never gone missing.
    with pytest.raises(DecryptionError):
        opener.update(chunks[1])
    with pytest.raises(DecryptionError):
        opener.update(chunks[2])
    with pytest.raises(DecryptionError):
        opener.finish()


def test_a_chunk_appended_after_the_final_one_poisons_finish() -> None:
    chunks = sealed(b"01234567", chunk_size=4)
    longer = sealed(b"0123456789", chunk_size=4)  # the same object sealed again, one chunk longer
    opener = StreamOpener(KEY, object_id=OBJECT, context=CONTEXT)
    assert opener.update(chunks[0]) + opener.update(chunks[1]) == b"01234567"
    with pytest.raises(DecryptionError):
        opener.update(longer[2])
    with pytest.raises(DecryptionError):
        opener.finish()


@pytest.mark.parametrize("flag", [2, 255])
def test_a_validly_tagged_chunk_with_an_unknown_final_flag_is_refused(flag: int) -> None:
    # Tag and commitment are right for this header: only the strict flag check stops it.
    head = _format.prefix(_format.CHUNK_MAGIC, KEY) + struct.pack(">QB", 0, flag)
    suffix = _format.text_field(OBJECT, "object_id") + _format.encode_context(CONTEXT)
    forged = _format.seal_core(KEY, b"bedside.chunk", head, b"x", suffix, bytes(32), bytes(12))
    with pytest.raises(DecryptionError):
        open_chunk(KEY, forged, object_id=OBJECT, context=CONTEXT, index=0)
    honest = _format.seal_core(KEY, b"bedside.chunk", head[:-1] + b"\x01", b"x", suffix, bytes(32), bytes(12))
    assert open_chunk(KEY, honest, object_id=OBJECT, context=CONTEXT, index=0) == (b"x", True)
