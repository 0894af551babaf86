"""Records: round trips, and every kind of tampering or misfiling fails with the one DecryptionError."""

from __future__ import annotations

import copy
import pickle
import struct
from uuid import UUID, uuid4

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto import _format, envelope
from crypto.envelope import (
    RECORD_HEADER_BYTES,
    RECORD_OVERHEAD_BYTES,
    KeyRef,
    key_ref_bytes,
    open_record,
    open_records,
    read_key_ref,
    seal,
)
from crypto.errors import DecryptionError
from crypto.keys import DataKey

CHEAP = settings(max_examples=200, deadline=None)

# Fixed keys keep the properties fast; the properties never depend on the key bytes.
KEY_A = DataKey(UUID("6f1c2a4e-9b7d-4c3e-8a21-5d0f3b7e9c11"), 1, bytes(range(32)))
KEY_B = DataKey(UUID("0190d6a4-2222-7000-8000-00000000000b"), 1, bytes(range(32, 64)))

texts = st.text(max_size=24)
contexts = st.dictionaries(texts, texts, max_size=6)
plaintexts = st.binary(max_size=512)
CONTEXT = {"tenant": "st-elsewhere", "column": "messages.body", "row": "m-1", "thread": "th-1", "sender": "P/1"}


def test_a_record_round_trips_with_the_documented_overhead() -> None:
    record = seal(KEY_A, b"hello", CONTEXT)
    assert len(record) == RECORD_OVERHEAD_BYTES + 5 == 123
    assert record[:6] == b"BSDR\x01\x01"
    assert open_record(KEY_A, record, CONTEXT) == b"hello"


def test_sealing_twice_gives_different_records() -> None:
    assert seal(KEY_A, b"same", CONTEXT) != seal(KEY_A, b"same", CONTEXT)


@CHEAP
@given(plaintext=plaintexts, context=contexts)
def test_round_trip_for_any_plaintext_and_context(plaintext: bytes, context: dict[str, str]) -> None:
    record = seal(KEY_A, plaintext, context)
    assert open_record(KEY_A, record, dict(context)) == plaintext
    assert read_key_ref(record) == KeyRef(KEY_A.id, KEY_A.version)


# A page: records that share most of their context (tenant, column, thread), as a page of messages does.
page_contexts = st.lists(
    st.fixed_dictionaries({"tenant": st.sampled_from(["t-1", "t-2"]), "row": texts, "thread": texts}), max_size=8
)


@CHEAP
@given(contexts=page_contexts, data=st.data())
def test_open_records_opens_a_page_in_order(contexts: list[dict[str, str]], data: st.DataObject) -> None:
    plaintexts_ = [data.draw(plaintexts) for _ in contexts]
    records = [seal(KEY_A, p, c) for p, c in zip(plaintexts_, contexts, strict=True)]
    assert open_records(KEY_A, list(zip(records, contexts, strict=True))) == plaintexts_


@CHEAP
@given(contexts=page_contexts.filter(bool), data=st.data())
def test_one_bad_record_fails_the_whole_page(contexts: list[dict[str, str]], data: st.DataObject) -> None:
    records = [seal(KEY_A, b"body", c) for c in contexts]
    at = data.draw(st.integers(0, len(records) - 1))
    others = [i for i, c in enumerate(contexts) if c != contexts[at]]
    flaw = data.draw(st.sampled_from(["byte", "context", "key"] + (["swap"] if others else [])))
    items = list(zip(records, contexts, strict=True))
    if flaw == "byte":
        position = data.draw(st.integers(0, len(records[at]) - 1))
        changed = bytearray(records[at])
        changed[position] ^= 0x01
        items[at] = (bytes(changed), contexts[at])
    elif flaw == "context":
        items[at] = (records[at], {**contexts[at], "row": contexts[at]["row"] + "x"})
    elif flaw == "swap":  # another row's ciphertext in this row
        items[at] = (records[data.draw(st.sampled_from(others))], contexts[at])
    else:
        items[at] = (seal(KEY_B, b"body", contexts[at]), contexts[at])
    with pytest.raises(DecryptionError):
        open_records(KEY_A, items)


@CHEAP
@given(page=page_contexts, others=st.lists(contexts, max_size=3))
def test_a_shared_memo_never_changes_an_encoding(page: list[dict[str, str]], others: list[dict[str, str]]) -> None:
    memo: dict[tuple[str, str], bytes] = {}
    # Records sharing entries (the page's tenant, a thread), unrelated ones, then all again: memo hits
    # for shared and repeated entries alike must give the bytes a fresh encoding gives.
    for context in page + others + page:
        assert _format.encode_context(context, memo) == _format.encode_context(context)


@CHEAP
@given(plaintext=plaintexts, context=contexts, data=st.data())
def test_flipping_any_byte_fails(plaintext: bytes, context: dict[str, str], data: st.DataObject) -> None:
    record = bytearray(seal(KEY_A, plaintext, context))
    position = data.draw(st.integers(0, len(record) - 1), label="position")
    record[position] ^= data.draw(st.integers(1, 255), label="mask")
    with pytest.raises(DecryptionError):
        open_record(KEY_A, bytes(record), context)


@CHEAP
@given(plaintext=plaintexts, context=contexts, data=st.data())
def test_truncating_or_extending_fails(plaintext: bytes, context: dict[str, str], data: st.DataObject) -> None:
    record = seal(KEY_A, plaintext, context)
    cut = data.draw(st.integers(0, len(record) - 1), label="cut")
    with pytest.raises(DecryptionError):
        open_record(KEY_A, record[:cut], context)
    with pytest.raises(DecryptionError):
        open_record(KEY_A, record + data.draw(st.binary(min_size=1, max_size=16)), context)


@st.composite
def changed_contexts(draw: st.DrawFn) -> tuple[dict[str, str], dict[str, str]]:
    """A context and a different one: a value, a key, the order, or an entry added or removed."""
    original = draw(st.dictionaries(texts, texts, max_size=6))
    items = list(original.items())
    how = draw(st.sampled_from(["value", "key", "reorder", "add", "remove"]))
    if how == "value" and items:
        i = draw(st.integers(0, len(items) - 1))
        new_value = draw(texts.filter(lambda v: v != items[i][1]))
        items[i] = (items[i][0], new_value)
    elif how == "key" and items:
        i = draw(st.integers(0, len(items) - 1))
        new_key = draw(texts.filter(lambda k: k not in original))
        items[i] = (new_key, items[i][1])
    elif how == "reorder" and len(items) >= 2:
        shuffled = draw(st.permutations(items).filter(lambda p: list(p) != items))
        items = list(shuffled)
    elif how == "remove" and items:
        del items[draw(st.integers(0, len(items) - 1))]
    else:  # "add", or a change that needs more entries than were drawn
        new_key = draw(texts.filter(lambda k: k not in original))
        items.insert(draw(st.integers(0, len(items))), (new_key, draw(texts)))
    changed = dict(items)
    assert list(changed.items()) != list(original.items())
    return original, changed


@CHEAP
@given(plaintext=plaintexts, pair=changed_contexts())
def test_any_change_of_context_fails(plaintext: bytes, pair: tuple[dict[str, str], dict[str, str]]) -> None:
    sealed_with, opened_with = pair
    record = seal(KEY_A, plaintext, sealed_with)
    with pytest.raises(DecryptionError):
        open_record(KEY_A, record, opened_with)


def test_a_record_moved_to_another_row_thread_tenant_or_column_does_not_open() -> None:
    record = seal(KEY_A, b"body", CONTEXT)
    for field, other in [("row", "m-2"), ("thread", "th-2"), ("tenant", "mercy"), ("column", "threads.subject")]:
        with pytest.raises(DecryptionError):
            open_record(KEY_A, record, {**CONTEXT, field: other})


def test_context_encoding_is_unambiguous_where_concatenation_would_not_be() -> None:
    record = seal(KEY_A, b"x", {"ab": "c"})
    for lookalike in ({"a": "bc"}, {"abc": ""}, {"a": "b", "c": ""}):
        with pytest.raises(DecryptionError):
            open_record(KEY_A, record, lookalike)


@CHEAP
@given(plaintext=plaintexts, context=contexts)
def test_a_record_from_one_key_does_not_open_under_another(plaintext: bytes, context: dict[str, str]) -> None:
    record = seal(KEY_A, plaintext, context)
    with pytest.raises(DecryptionError):
        open_record(KEY_B, record, context)


def test_same_id_and_version_with_other_secret_fails_on_the_commitment() -> None:
    impostor = DataKey(KEY_A.id, KEY_A.version, bytes(32))
    with pytest.raises(DecryptionError):
        open_record(impostor, seal(KEY_A, b"x", CONTEXT), CONTEXT)


def test_another_version_of_the_same_dek_does_not_open_it() -> None:
    v2 = DataKey(KEY_A.id, 2, KEY_A.secret)
    with pytest.raises(DecryptionError):
        open_record(v2, seal(KEY_A, b"x", CONTEXT), CONTEXT)


@CHEAP
@given(version=st.integers(0, 255), suite=st.integers(0, 255), magic=st.binary(min_size=4, max_size=4))
def test_unknown_magic_version_or_suite_fails(version: int, suite: int, magic: bytes) -> None:
    record = bytearray(seal(KEY_A, b"payload", CONTEXT))
    changed = (magic, version, suite) != (b"BSDR", 1, 1)
    record[0:4], record[4], record[5] = magic, version, suite
    if changed:
        with pytest.raises(DecryptionError):
            open_record(KEY_A, bytes(record), CONTEXT)
        if magic not in (b"BSDR", b"BSDC") or (version, suite) != (1, 1):
            with pytest.raises(DecryptionError):
                read_key_ref(bytes(record))
    else:
        assert open_record(KEY_A, bytes(record), CONTEXT) == b"payload"


@pytest.mark.parametrize(("version", "suite"), [(2, 1), (1, 2), (0, 1), (1, 0)])
def test_a_validly_tagged_record_of_another_version_or_suite_is_refused(version: int, suite: int) -> None:
    # Tag and commitment are right for this header: only the strict version/suite check stops it.
    head = struct.pack(">4sBB16sI", b"BSDR", version, suite, KEY_A.id.bytes, KEY_A.version)
    context = _format.encode_context(CONTEXT)
    forged = _format.seal_core(KEY_A, b"bedside.record", head, b"x", context, bytes(32), bytes(12))
    with pytest.raises(DecryptionError):
        open_record(KEY_A, forged, CONTEXT)
    with pytest.raises(DecryptionError):
        read_key_ref(forged)
    honest = _format.seal_core(
        KEY_A, b"bedside.record", head[:4] + b"\x01\x01" + head[6:], b"x", context, bytes(32), bytes(12)
    )
    assert open_record(KEY_A, honest, CONTEXT) == b"x"


def test_read_key_ref_reads_the_header_without_the_key() -> None:
    key = DataKey.generate(version=4_000_000_000)
    ref = read_key_ref(seal(key, b"", {}))
    assert ref == KeyRef(key.id, 4_000_000_000)
    dek_id, dek_version = ref
    assert (dek_id, dek_version) == (key.id, key.version)


@pytest.mark.parametrize("junk", [b"", b"BSDR", b"BSDR\x01\x01" + bytes(200), b"not a record at all" * 10])
def test_read_key_ref_and_open_reject_junk(junk: bytes) -> None:
    with pytest.raises(DecryptionError):
        open_record(KEY_A, junk, CONTEXT)
    if not junk.startswith(b"BSDR\x01\x01"):
        with pytest.raises(DecryptionError):
            read_key_ref(junk)


def test_every_failure_looks_the_same() -> None:
    record = seal(KEY_A, b"x", CONTEXT)
    impostor = DataKey(KEY_A.id, KEY_A.version, bytes(32))
    attempts = [
        (KEY_A, b"", CONTEXT),
        (KEY_A, record[:-1], CONTEXT),  # GCM tag
        (KEY_A, b"XXXX" + record[4:], CONTEXT),  # magic
        (KEY_A, record[:4] + b"\x02" + record[5:], CONTEXT),  # version
        (KEY_B, record, CONTEXT),  # key id
        (impostor, record, CONTEXT),  # commitment
        (KEY_A, record, {}),  # context
    ]
    failures = set()
    for key, bad, context in attempts:
        with pytest.raises(DecryptionError) as info:
            open_record(key, bad, context)
        error = info.value
        failures.add((type(error), str(error), error.args))
        # Nothing underneath leaks through chaining either.
        assert error.__cause__ is None
        assert error.__context__ is None or error.__suppress_context__
    assert failures == {(DecryptionError, "decryption failed", ("decryption failed",))}


def test_header_length_matches_the_documented_layout() -> None:
    assert RECORD_HEADER_BYTES == 4 + 1 + 1 + 16 + 4 + 32 + 32 + 12 == 102
    record = seal(KEY_A, b"", {})
    magic, version, suite, dek_id, dek_version = struct.unpack_from(">4sBB16sI", record)
    assert (magic, version, suite, UUID(bytes=dek_id), dek_version) == (b"BSDR", 1, 1, KEY_A.id, 1)


def test_injected_randomness_is_private_and_checked() -> None:
    with pytest.raises(ValueError, match="salt and nonce"):
        envelope._seal_with(KEY_A, b"x", {}, salt=b"short", nonce=bytes(12))


def test_contexts_must_be_text() -> None:
    with pytest.raises(TypeError):
        seal(KEY_A, b"x", {"row": 5})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="surrogate"):
        seal(KEY_A, b"x", {"row": "\ud800"})
    with pytest.raises(DecryptionError):
        open_record(KEY_A, seal(KEY_A, b"x", {}), {"row": "\ud800"})
    with pytest.raises(TypeError):
        seal(KEY_A, "text is not bytes", {})  # type: ignore[arg-type]


# ---- DataKey ----


def test_data_key_secret_never_appears_in_repr_str_or_errors() -> None:
    key = DataKey.generate()
    for text in (repr(key), str(key), f"{key}", repr([key])):
        assert key.secret.hex() not in text
        assert repr(key.secret) not in text
        assert "redacted" in text
        assert str(key.id) in text
    with pytest.raises(ValueError, match="32 bytes, got 31") as info:
        DataKey(uuid4(), 1, key.secret[:31])
    assert key.secret[:31].hex() not in str(info.value)
    assert repr(key.secret[:31]) not in str(info.value)


def test_data_key_is_immutable_and_cannot_be_pickled_or_copied() -> None:
    key = DataKey.generate()
    with pytest.raises(AttributeError):
        key._secret = bytes(32)  # type: ignore[misc]
    with pytest.raises(TypeError):
        pickle.dumps(key)
    with pytest.raises(TypeError):
        copy.copy(key)


@pytest.mark.parametrize("version", [-1, 2**32, True])
def test_data_key_version_is_uint32(version: int) -> None:
    with pytest.raises(ValueError, match="version"):
        DataKey(uuid4(), version, bytes(32))


def test_generated_keys_are_distinct() -> None:
    first, second = DataKey.generate(), DataKey.generate()
    assert first.id != second.id
    assert first.secret != second.secret
    assert len(first.secret) == 32
    assert first.version == 1


def test_key_ref_bytes_are_equal_exactly_when_records_name_the_same_key() -> None:
    key, other = DataKey.generate(), DataKey.generate()
    newer = DataKey.generate(id=key.id, version=key.version + 1)
    first, second = seal(key, b"one", {"row": "1"}), seal(key, b"two", {"row": "2"})
    assert key_ref_bytes(first) == key_ref_bytes(second)
    assert key_ref_bytes(seal(other, b"one", {"row": "1"})) != key_ref_bytes(first)
    assert key_ref_bytes(seal(newer, b"one", {"row": "1"})) != key_ref_bytes(first)


# ---- key commitment ----
# AES-GCM alone is not key-committing: one ciphertext and tag can be made to authenticate under two keys.
# The commitment in the header is what makes a record open under exactly one data key. The test builds
# such a two-key ciphertext with GHASH algebra (GF(2^128), GCM bit order) and checks that only the key
# that the commitment names opens it.

_GCM_R = 0xE1 << 120


def _gf_mul(x: int, y: int) -> int:
    """Multiplication in GCM's GF(2^128) (NIST SP 800-38D, algorithm 1)."""
    z, v = 0, y
    for i in range(127, -1, -1):
        if (x >> i) & 1:
            z ^= v
        v = (v >> 1) ^ _GCM_R if v & 1 else v >> 1
    return z


def _gf_inverse(x: int) -> int:
    result, base, exponent = 1 << 127, x, 2**128 - 2  # 1 << 127 is the field's one in GCM bit order
    while exponent:
        if exponent & 1:
            result = _gf_mul(result, base)
        base = _gf_mul(base, base)
        exponent >>= 1
    return result


def _aes_block(key: bytes, block: bytes) -> int:
    # One raw block (the hash key H and the tag mask), as GCM itself computes them.
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305
    return int.from_bytes(encryptor.update(block) + encryptor.finalize(), "big")


def _ghash_terms(h: int, blocks: list[int]) -> int:
    y = 0
    for block in blocks:
        y = _gf_mul(y ^ block, h)
    return y


def _record_opening_under_two_keys(first: DataKey, second: DataKey, context: dict[str, str]) -> bytes:
    """A record whose header carries `first`'s commitment and whose tag is valid under both keys' AES keys."""
    salt, nonce = bytes(range(32)), bytes(12)
    info = _format.kdf_info(b"bedside.record", first)
    aes_1, commitment = _format.derive_suite1(first, salt, info)
    aes_2, _ = _format.derive_suite1(second, salt, info)
    header = _format.prefix(envelope.RECORD_MAGIC, first) + salt + commitment + nonce
    aad = header + _format.encode_context(context)
    aad_blocks = [int.from_bytes(aad[i : i + 16].ljust(16, b"\0"), "big") for i in range(0, len(aad), 16)]
    length_block = (len(aad) * 8) << 64 | (32 * 8)
    fixed = 0x42  # first ciphertext block; the second is solved for
    h_1, h_2 = _aes_block(aes_1, bytes(16)), _aes_block(aes_2, bytes(16))
    j0 = nonce + b"\0\0\0\1"
    mask_1, mask_2 = _aes_block(aes_1, j0), _aes_block(aes_2, j0)
    # tag = GHASH_H(aad, c0, c1) ^ E_K(J0) and c1 enters GHASH times H^2: solve tag_1 == tag_2 for c1.
    rest_1 = _ghash_terms(h_1, [*aad_blocks, fixed, 0, length_block]) ^ mask_1
    rest_2 = _ghash_terms(h_2, [*aad_blocks, fixed, 0, length_block]) ^ mask_2
    c1 = _gf_mul(rest_1 ^ rest_2, _gf_inverse(_gf_mul(h_1, h_1) ^ _gf_mul(h_2, h_2)))
    tag = rest_1 ^ _gf_mul(c1, _gf_mul(h_1, h_1))
    body = fixed.to_bytes(16, "big") + c1.to_bytes(16, "big") + tag.to_bytes(16, "big")
    # Both AES keys accept it: without the commitment, both data keys would open the record.
    for aes_key in (aes_1, aes_2):
        assert len(AESGCM(aes_key).decrypt(nonce, body, aad)) == 32
    return header + body


def test_a_ciphertext_valid_under_two_keys_opens_only_under_the_committed_one() -> None:
    # Same DEK id and version, other secret: a rewrapped or substituted key the header cannot tell apart.
    impostor = DataKey(KEY_A.id, KEY_A.version, bytes(range(64, 96)))
    record = _record_opening_under_two_keys(KEY_A, impostor, CONTEXT)
    assert len(open_record(KEY_A, record, CONTEXT)) == 32
    with pytest.raises(DecryptionError):
        open_record(impostor, record, CONTEXT)
    with pytest.raises(DecryptionError):
        open_records(impostor, [(record, CONTEXT)])
