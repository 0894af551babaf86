"""Checkpoints and signed notes: known answers, round trips, tampering, strict parsing, key files."""

from __future__ import annotations

import base64
import os
import pickle
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointSigner,
    Ed25519CheckpointSigner,
    VerifierKey,
    format_checkpoint,
    format_vkey,
    key_id,
    parse_checkpoint,
    parse_vkey,
    sign_note,
    verify_checkpoint,
    verify_note,
)
from crypto.merkle import leaf_hash, root_from_leaf_hashes

EM_DASH = "\u2014"

# Known answers from golang.org/x/mod/sumdb/note (the reference implementation) and from the
# c2sp.org/signed-note specification. Ed25519 is deterministic, so signing must match byte for byte.
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
GO_NOTE = (
    GO_TEXT + "\n" + EM_DASH + " PeterNeumann "
    "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)
SPEC_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
SPEC_NOTE = (
    "This is an example message.\n\n" + EM_DASH + " example.com/foo "
    "Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n"
)

ORIGIN = "bedside.example/audit/tenant-1"
ROOT = root_from_leaf_hashes([leaf_hash(b"a"), leaf_hash(b"b"), leaf_hash(b"c")])


@pytest.fixture(scope="module")
def log_signer() -> Ed25519CheckpointSigner:
    return Ed25519CheckpointSigner.generate(ORIGIN)


@pytest.fixture(scope="module")
def signed(log_signer: Ed25519CheckpointSigner) -> str:
    return sign_note(format_checkpoint(ORIGIN, 3, ROOT), log_signer)


def vkey_of(signer: Ed25519CheckpointSigner) -> str:
    return format_vkey(signer.name, signer.public_key)


# --------------------------------------------------------------------------------------------
# Known answers
# --------------------------------------------------------------------------------------------


def test_go_reference_signer_key_reproduces_the_reference_note_byte_for_byte() -> None:
    signer = Ed25519CheckpointSigner.from_skey(GO_SKEY)
    assert signer.key_id.hex() == "c74f20a3"
    assert vkey_of(signer) == GO_VKEY
    assert signer.export_skey() == GO_SKEY
    assert sign_note(GO_TEXT, signer) == GO_NOTE
    assert verify_note(GO_NOTE, GO_VKEY) == GO_TEXT


def test_spec_example_note_verifies() -> None:
    assert verify_note(SPEC_NOTE, SPEC_VKEY) == "This is an example message.\n"
    key = parse_vkey(SPEC_VKEY)
    assert key.to_vkey() == SPEC_VKEY
    assert key_id(key.name, key.public_key) == bytes.fromhex("530d903a")


def test_key_id_is_truncated_sha256_of_name_newline_type_and_key() -> None:
    import hashlib

    public = parse_vkey(GO_VKEY).public_key
    expected = hashlib.sha256(b"PeterNeumann\n\x01" + public).digest()[:4]
    assert key_id("PeterNeumann", public) == expected


def test_checkpoint_body_format_is_exact() -> None:
    root = bytes(range(32))
    body = format_checkpoint("example.com/log", 20852163, root, ["ext one"])
    assert body == f"example.com/log\n20852163\n{base64.b64encode(root).decode()}\next one\n"
    assert parse_checkpoint(body) == Checkpoint("example.com/log", 20852163, root, ("ext one",))
    assert format_checkpoint("example.com/log", 0, root).split("\n")[1] == "0"


# --------------------------------------------------------------------------------------------
# Round trip and tampering
# --------------------------------------------------------------------------------------------


def test_signed_checkpoint_round_trip(log_signer: Ed25519CheckpointSigner, signed: str) -> None:
    checkpoint = verify_checkpoint(signed, vkey_of(log_signer))
    assert checkpoint == Checkpoint(ORIGIN, 3, ROOT)
    assert verify_checkpoint(signed, log_signer.verifier_key(), origin=ORIGIN) == checkpoint
    assert signed.startswith(format_checkpoint(ORIGIN, 3, ROOT) + "\n" + EM_DASH + " " + ORIGIN + " ")


def test_checkpoint_for_another_origin_is_refused(log_signer: Ed25519CheckpointSigner, signed: str) -> None:
    with pytest.raises(CheckpointError):
        verify_checkpoint(signed, vkey_of(log_signer), origin="bedside.example/audit/tenant-2")
    other_body = sign_note(format_checkpoint("elsewhere.example/log", 3, ROOT), log_signer)
    with pytest.raises(CheckpointError):
        verify_checkpoint(other_body, vkey_of(log_signer))


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_changed_character_of_the_body_fails(
    log_signer: Ed25519CheckpointSigner, signed: str, data: st.DataObject
) -> None:
    body_length = signed.index("\n\n") + 1
    at = data.draw(st.integers(0, body_length - 1), label="at")
    replacement = data.draw(st.characters(codec="utf-8").filter(lambda c: c != signed[at]), label="char")
    tampered = signed[:at] + replacement + signed[at + 1 :]
    with pytest.raises(CheckpointError):
        verify_checkpoint(tampered, vkey_of(log_signer))


def test_a_different_key_fails(signed: str) -> None:
    stranger = Ed25519CheckpointSigner.generate("someone.example/else")
    with pytest.raises(CheckpointError):
        verify_note(signed, vkey_of(stranger))
    # Same name, different key: the key id differs, so the line is an unknown key's and ignored.
    impostor = Ed25519CheckpointSigner.generate(ORIGIN)
    with pytest.raises(CheckpointError):
        verify_note(signed, vkey_of(impostor))


def test_truncated_signatures_fail(log_signer: Ed25519CheckpointSigner, signed: str) -> None:
    line_start = signed.index("\n\n") + 2
    b64_start = signed.index(" ", line_start + 2) + 1
    for cut in range(1, len(signed) - 1 - b64_start):
        truncated = signed[: len(signed) - 1 - cut] + "\n"
        with pytest.raises(CheckpointError):
            verify_note(truncated, vkey_of(log_signer))
    sig = base64.b64decode(signed[b64_start:-1])
    short = signed[:b64_start] + base64.b64encode(sig[:-1]).decode() + "\n"
    with pytest.raises(CheckpointError):
        verify_note(short, vkey_of(log_signer))


@pytest.mark.parametrize(
    "mangle",
    [
        lambda n: n[:-1],  # no final newline
        lambda n: n.replace("\n\n", "\n", 1),  # no blank line
        lambda n: n.replace("\n\n", "\n\n\n", 1),  # the text gains nothing, the signature block breaks
        lambda n: n + "\n",  # trailing blank line
        lambda n: n + "junk\n",  # trailing junk line
        lambda n: n.replace(EM_DASH, "-", 1),  # ASCII dash
        lambda n: n.replace(EM_DASH + " ", EM_DASH, 1),  # no space after the dash
        lambda n: n.replace("\n", "\r\n"),  # CRLF
        lambda n: n.replace("=\n", "\n"),  # non-canonical base64 (padding dropped)
        lambda n: n[: n.index("\n")] + n[n.index("\n") + 1 :],  # body line joined
    ],
)
def test_malformed_notes_fail(log_signer: Ed25519CheckpointSigner, signed: str, mangle: Callable[[str], str]) -> None:
    with pytest.raises(CheckpointError):
        verify_checkpoint(mangle(signed), vkey_of(log_signer))


class _WitnessSigner:
    """A second, independent implementation of the CheckpointSigner protocol."""

    def __init__(self, name: str) -> None:
        self._key = Ed25519PrivateKey.generate()
        self.name = name
        self.public_key = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.key_id = key_id(name, self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


def test_several_signatures_verify_independently_and_unknown_ones_are_ignored(
    log_signer: Ed25519CheckpointSigner,
) -> None:
    witness = _WitnessSigner("witness.example/w1")
    assert isinstance(witness, CheckpointSigner)
    assert isinstance(log_signer, CheckpointSigner)
    body = format_checkpoint(ORIGIN, 3, ROOT)
    note = sign_note(body, witness, log_signer)
    assert verify_note(note, vkey_of(log_signer)) == body
    assert verify_note(note, format_vkey(witness.name, witness.public_key)) == body
    # An unknown key's garbage signature line is ignored, as the spec requires.
    junk = f"{EM_DASH} unknown.example/k {base64.b64encode(b'1234' + b'x' * 64).decode()}\n"
    assert verify_note(note + junk, vkey_of(log_signer)) == body


def test_a_bad_signature_from_the_trusted_key_rejects_the_whole_note(
    log_signer: Ed25519CheckpointSigner, signed: str
) -> None:
    forged_sig = base64.b64encode(log_signer.key_id + b"\x00" * 64).decode()
    with_bad_line = signed + f"{EM_DASH} {ORIGIN} {forged_sig}\n"
    with pytest.raises(CheckpointError):
        verify_note(with_bad_line, vkey_of(log_signer))


def test_sign_note_refuses_text_it_cannot_sign(log_signer: Ed25519CheckpointSigner) -> None:
    for text in ("", "no newline", "tab\there\n", "nul\x00\n", "cr\r\n", "\ud800\n"):
        with pytest.raises(CheckpointError):
            sign_note(text, log_signer)
    with pytest.raises(CheckpointError):
        sign_note("x\n", log_signer, log_signer)


def test_notes_whose_text_holds_blank_lines_split_at_the_last_one(log_signer: Ed25519CheckpointSigner) -> None:
    text = "first\n\nsecond\n"
    assert verify_note(sign_note(text, log_signer), vkey_of(log_signer)) == text


# --------------------------------------------------------------------------------------------
# Strict parsing
# --------------------------------------------------------------------------------------------

GOOD_ROOT = base64.b64encode(bytes(32)).decode()


@pytest.mark.parametrize(
    "body",
    [
        "",
        "\n",
        f"origin\n1\n{GOOD_ROOT}",  # no final newline
        f"origin\n1\n{GOOD_ROOT}\n\n",  # blank line
        f"origin\n1\n{GOOD_ROOT}\nx\n\n",
        f"origin\n1\n{GOOD_ROOT}\n junk",  # trailing junk without newline
        "origin\n1\n",  # too few lines
        f"\n1\n{GOOD_ROOT}\n",  # empty origin
        f"has space\n1\n{GOOD_ROOT}\n",
        f"has+plus\n1\n{GOOD_ROOT}\n",
        f"nbsp\u00a0origin\n1\n{GOOD_ROOT}\n",
        f"origin\n01\n{GOOD_ROOT}\n",  # leading zero
        f"origin\n00\n{GOOD_ROOT}\n",
        f"origin\n+1\n{GOOD_ROOT}\n",
        f"origin\n-1\n{GOOD_ROOT}\n",
        f"origin\n 1\n{GOOD_ROOT}\n",
        f"origin\n1_000\n{GOOD_ROOT}\n",
        f"origin\n\u0661\n{GOOD_ROOT}\n",  # Arabic-Indic digit one
        f"origin\n{2**64}\n{GOOD_ROOT}\n",
        f"origin\n{'9' * 5000}\n{GOOD_ROOT}\n",
        f"origin\n1\n{base64.b64encode(bytes(31)).decode()}\n",  # short hash
        f"origin\n1\n{base64.b64encode(bytes(33)).decode()}\n",  # long hash
        f"origin\n1\n{GOOD_ROOT.rstrip('=')}\n",  # missing padding
        f"origin\n1\n{GOOD_ROOT[:-2]}B=\n",  # non-canonical trailing bits
        f"origin\n1\n{GOOD_ROOT[:-1]} \n",
        f"origin\r\n1\n{GOOD_ROOT}\n",
        f"origin\n1\n{GOOD_ROOT}\next\tension\n",
    ],
)
def test_parse_rejects_malformed_bodies(body: str) -> None:
    with pytest.raises(CheckpointError):
        parse_checkpoint(body)


def test_parse_accepts_the_largest_size_and_extensions() -> None:
    body = f"origin\n{2**64 - 1}\n{GOOD_ROOT}\nfirst ext\nsecond ext\n"
    checkpoint = parse_checkpoint(body)
    assert checkpoint.size == 2**64 - 1
    assert checkpoint.extensions == ("first ext", "second ext")
    assert checkpoint.to_text() == body


def test_format_refuses_a_bare_string_as_extensions() -> None:
    with pytest.raises(CheckpointError):
        format_checkpoint("a", 1, bytes(32), "ext")


@pytest.mark.parametrize(
    ("origin", "size", "root", "extensions"),
    [
        ("", 1, bytes(32), ()),
        ("a b", 1, bytes(32), ()),
        ("a\nb", 1, bytes(32), ()),
        ("a", -1, bytes(32), ()),
        ("a", 2**64, bytes(32), ()),
        ("a", 1, bytes(31), ()),
        ("a", 1, bytes(32), ("",)),
        ("a", 1, bytes(32), ("two\nlines",)),
    ],
)
def test_format_refuses_what_parse_would_refuse(
    origin: str, size: int, root: bytes, extensions: tuple[str, ...]
) -> None:
    with pytest.raises(CheckpointError):
        format_checkpoint(origin, size, root, extensions)


@settings(max_examples=400, deadline=None)
@given(text=st.text(max_size=120))
def test_parse_checkpoint_fuzz_raises_only_checkpoint_error(text: str) -> None:
    try:
        checkpoint = parse_checkpoint(text)
    except CheckpointError:
        return
    assert checkpoint.to_text() == text


@st.composite
def near_checkpoints(draw: st.DrawFn) -> str:
    """Valid bodies with a few random edits, to reach deeper than random text does."""
    lines = [
        draw(st.sampled_from(["example.com/log", "o", "ö/ü"])),
        str(draw(st.integers(0, 2**64 + 5))),
        base64.b64encode(draw(st.binary(min_size=30, max_size=34))).decode(),
        *draw(st.lists(st.text(min_size=0, max_size=5), max_size=2)),
    ]
    text = "\n".join(lines) + "\n"
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(max_size=2)) + text[at + draw(st.integers(0, 2)) :]
    return text


@settings(max_examples=400, deadline=None)
@given(text=near_checkpoints())
def test_parse_checkpoint_near_miss_fuzz_raises_only_checkpoint_error(text: str) -> None:
    try:
        checkpoint = parse_checkpoint(text)
    except CheckpointError:
        return
    assert checkpoint.to_text() == text


@settings(max_examples=300, deadline=None)
@given(note=st.text(max_size=200), vkey=st.sampled_from([GO_VKEY, SPEC_VKEY]))
def test_verify_note_fuzz_raises_only_checkpoint_error(note: str, vkey: str) -> None:
    with pytest.raises(CheckpointError):
        verify_note(note, vkey)


@settings(max_examples=300, deadline=None)
@given(vkey=st.text(max_size=80))
def test_parse_vkey_fuzz_raises_only_checkpoint_error(vkey: str) -> None:
    try:
        key = parse_vkey(vkey)
    except CheckpointError:
        return
    assert key.to_vkey() == vkey


def test_every_mangling_of_a_vkey_is_rejected() -> None:
    # Ported from the Go reference's TestNewVerifier: every proper substring and every single
    # character bump must fail to parse.
    for i in range(len(GO_VKEY) + 1):
        for j in range(i + 1, len(GO_VKEY) + 1):
            if (i, j) != (0, len(GO_VKEY)):
                with pytest.raises(CheckpointError):
                    parse_vkey(GO_VKEY[i:j])
    for i in range(len(GO_VKEY)):
        bumped = GO_VKEY[:i] + chr(ord(GO_VKEY[i]) + 1) + GO_VKEY[i + 1 :]
        with pytest.raises(CheckpointError):
            parse_vkey(bumped)
    with pytest.raises(CheckpointError):  # unknown algorithm byte
        parse_vkey("PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW")
    with pytest.raises(CheckpointError):
        VerifierKey("PeterNeumann", b"\x00\x00\x00\x00", parse_vkey(GO_VKEY).public_key)


def test_every_mangling_of_a_signer_key_is_rejected() -> None:
    for i in range(len(GO_SKEY)):
        bumped = GO_SKEY[:i] + chr(ord(GO_SKEY[i]) + 1) + GO_SKEY[i + 1 :]
        with pytest.raises(CheckpointError):
            Ed25519CheckpointSigner.from_skey(bumped)
    for cut in range(1, len(GO_SKEY)):
        with pytest.raises(CheckpointError):
            Ed25519CheckpointSigner.from_skey(GO_SKEY[:cut])


# --------------------------------------------------------------------------------------------
# Key files and key hygiene
# --------------------------------------------------------------------------------------------


def test_key_file_round_trip_is_owner_only(tmp_path: Path) -> None:
    signer = Ed25519CheckpointSigner.generate(ORIGIN)
    path = tmp_path / "checkpoint.key"
    signer.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = Ed25519CheckpointSigner.load(path)
    assert (loaded.name, loaded.key_id, loaded.public_key) == (signer.name, signer.key_id, signer.public_key)
    note = sign_note(format_checkpoint(ORIGIN, 0, bytes(32)), loaded)
    assert verify_note(note, vkey_of(signer))


def test_key_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.key"
    Ed25519CheckpointSigner.generate(ORIGIN).save(path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        Ed25519CheckpointSigner.generate(ORIGIN).save(path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o606])
def test_group_or_world_accessible_key_file_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "checkpoint.key"
    Ed25519CheckpointSigner.generate(ORIGIN).save(path)
    os.chmod(path, mode)
    with pytest.raises(CheckpointError):
        Ed25519CheckpointSigner.load(path)


def test_key_file_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "dir.key"
    directory.mkdir(mode=0o700)
    with pytest.raises(CheckpointError):
        Ed25519CheckpointSigner.load(directory)


def test_a_fifo_at_the_key_path_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(CheckpointError):
        Ed25519CheckpointSigner.load(fifo)


def test_malformed_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(b"-----BEGIN PRIVATE KEY-----\n")
    with pytest.raises(CheckpointError):
        Ed25519CheckpointSigner.load(path)


def test_signer_repr_never_shows_key_material() -> None:
    signer = Ed25519CheckpointSigner.from_skey(GO_SKEY)
    seed_b64 = GO_SKEY.split("+", 4)[4]
    seed = base64.b64decode(seed_b64)[1:]
    for text in (repr(signer), str(signer), f"{signer!r}"):
        assert "redacted" in text
        assert seed_b64 not in text
        assert seed.hex() not in text
    with pytest.raises(TypeError):
        pickle.dumps(signer)
