"""The canonical field encoding round-trips, is injective, and its decoder is strict."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.merkle import EncodingError, FieldValue, decode_fields, encode_fields

VALUES: st.SearchStrategy[FieldValue] = st.one_of(
    st.none(),
    st.integers(-(2**63), 2**63 - 1),
    st.text(max_size=20),
    st.binary(max_size=20),
)
NAMES = st.text(min_size=1, max_size=8)


@st.composite
def field_lists(draw: st.DrawFn) -> list[tuple[str, FieldValue]]:
    names = draw(st.lists(NAMES, unique=True, max_size=6))
    return [(name, draw(VALUES)) for name in names]


@settings(max_examples=300, deadline=None)
@given(fields=field_lists())
def test_decode_inverts_encode(fields: list[tuple[str, FieldValue]]) -> None:
    decoded = decode_fields(encode_fields(fields))
    assert decoded == fields
    # Equality alone would let 1 == True or b"" == "" style confusions through; types must survive.
    assert [type(v) for _, v in decoded] == [type(v) for _, v in fields]


@settings(max_examples=500, deadline=None)
@given(a=field_lists(), b=field_lists())
def test_distinct_field_lists_never_share_an_encoding(
    a: list[tuple[str, FieldValue]], b: list[tuple[str, FieldValue]]
) -> None:
    def typed(fields: list[tuple[str, FieldValue]]) -> list[tuple[str, type, FieldValue]]:
        return [(n, type(v), v) for n, v in fields]

    if typed(a) != typed(b):
        assert encode_fields(a) != encode_fields(b)
    else:
        assert encode_fields(a) == encode_fields(b)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64))
def test_decoder_accepts_only_canonical_encodings(data: bytes) -> None:
    try:
        fields = decode_fields(data)
    except EncodingError:
        return
    assert encode_fields(fields) == data


@settings(max_examples=200, deadline=None)
@given(fields=field_lists(), cut=st.integers(1, 8))
def test_truncated_or_extended_encodings_are_rejected(fields: list[tuple[str, FieldValue]], cut: int) -> None:
    data = encode_fields(fields)
    with pytest.raises(EncodingError):
        decode_fields(data + b"\x00" * cut)
    if cut <= len(data):
        with pytest.raises(EncodingError):
            decode_fields(data[:-cut])


def test_encoding_layout_is_pinned() -> None:
    data = encode_fields([("a", None), ("b", b"\xff"), ("c", "é"), ("d", -2)])
    assert data.hex() == (
        "01" + "00000004"
        "0001" + "61" + "00"
        "0001" + "62" + "01" + "00000001" + "ff"
        "0001" + "63" + "02" + "00000002" + "c3a9"
        "0001" + "64" + "03" + "fffffffffffffffe"
    )
    assert encode_fields([]) == b"\x01\x00\x00\x00\x00"


def test_similar_values_of_different_types_encode_differently() -> None:
    encodings = {encode_fields([("x", v)]) for v in (None, 0, "", b"", "0", b"0", "\x00", b"\x00", 48, "None")}
    assert len(encodings) == 10


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ([("", 1)], EncodingError),
        ([("a", 1), ("a", 2)], EncodingError),
        ([("a", 2**63)], EncodingError),
        ([("a", -(2**63) - 1)], EncodingError),
        ([("a", "\ud800")], EncodingError),
        ([("\udfff", 1)], EncodingError),
        ([("a", True)], TypeError),
        ([("a", 1.5)], TypeError),
        ([("a", bytearray(b"x"))], TypeError),
        ([(1, 1)], TypeError),
        ([("a", 1, 2)], TypeError),
    ],
)
def test_encode_refuses_values_it_cannot_represent_canonically(
    fields: list[tuple[object, ...]], error: type[Exception]
) -> None:
    with pytest.raises(error):
        encode_fields(fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x02\x00\x00\x00\x00",  # unknown version
        b"\x01\x00\x00\x00\x01",  # one field announced, none present
        b"\x01\x00\x00\x00\x01\x00\x00\x00",  # empty name
        b"\x01\x00\x00\x00\x01\x00\x01a\x09",  # unknown tag
        b"\x01\x00\x00\x00\x01\x00\x01a\x02\x00\x00\x00\x01\xff",  # invalid UTF-8 value
        b"\x01\x00\x00\x00\x01\x00\x01\xc0\x00",  # invalid UTF-8 name
        b"\x01\x00\x00\x00\x02\x00\x01a\x00\x00\x01a\x00",  # duplicate name
        b"\x01\x00\x00\x00\x01\x00\x01a\x03\x00",  # short int
        b"\x01\x00\x00\x00\x00\x00",  # trailing byte
    ],
)
def test_decode_rejects_malformed_input(data: bytes) -> None:
    with pytest.raises(EncodingError):
        decode_fields(data)
