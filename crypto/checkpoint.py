"""C2SP tlog-checkpoints carried in C2SP signed notes, signed with Ed25519.

Checkpoint body (c2sp.org/tlog-checkpoint)::

    <origin>\\n<tree size, decimal, no leading zeros>\\n<base64 root hash>\\n[<extension>\\n]*

Signed note (c2sp.org/signed-note): the text (ending in a newline), a blank line, then one or
more lines ``— <key name> <base64(4-byte key id || signature)>\\n`` (U+2014 em dash). The
signature covers the text including its final newline.

Ed25519 keys: ``key id = SHA-256(name || 0x0A || 0x01 || 32-byte public key)[:4]``; verifier key
(vkey) ``<name>+<8 hex key id>+<base64(0x01 || public key)>``; signer key (the key file, the same
format as Go's golang.org/x/mod/sumdb/note) ``PRIVATE+KEY+<name>+<8 hex key id>+<base64(0x01 ||
32-byte seed)>``.

Every failure to parse, format or verify raises :class:`CheckpointError`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn, Protocol, runtime_checkable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from crypto.merkle import HASH_SIZE, MAX_TREE_SIZE

__all__ = [
    "MAX_NOTE_BYTES",
    "MAX_SIGNATURES",
    "SIGNATURE_TYPE_ED25519",
    "Checkpoint",
    "CheckpointError",
    "CheckpointSigner",
    "Ed25519CheckpointSigner",
    "VerifierKey",
    "format_checkpoint",
    "format_vkey",
    "key_id",
    "parse_checkpoint",
    "parse_vkey",
    "sign_note",
    "verify_checkpoint",
    "verify_note",
]

SIGNATURE_TYPE_ED25519 = 0x01
"""The signed-note signature type identifier byte for Ed25519."""

MAX_SIGNATURES = 100
"""Signature lines accepted in one note (the spec requires at least 16)."""

MAX_NOTE_BYTES = 1 << 20
"""Largest note, in UTF-8 bytes, that :func:`verify_note` will look at."""

_KEY_ID_SIZE = 4
_ED25519_KEY_SIZE = 32
_ED25519_SIG_SIZE = 64
_EM_DASH = "\u2014"
_SIG_PREFIX = _EM_DASH + " "
_SKEY_PREFIX = "PRIVATE+KEY+"
_MAX_KEY_FILE_BYTES = 4096
_SIZE_RE = re.compile(r"0|[1-9][0-9]{0,19}")
_KEY_ID_RE = re.compile(r"[0-9a-f]{8}")


class CheckpointError(Exception):
    """A checkpoint, note, key or key file is malformed, or a signature does not verify."""


# --------------------------------------------------------------------------------------------
# Small strict helpers
# --------------------------------------------------------------------------------------------


def _check_text(text: str, what: str) -> bytes:
    """Return ``text`` as UTF-8; refuse non-str, unencodable text and control chars but newline."""
    if not isinstance(text, str):
        raise CheckpointError(f"{what} must be str")
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(f"{what} is not valid UTF-8") from None
    if any(b < 0x20 and b != 0x0A for b in raw):
        raise CheckpointError(f"{what} contains control characters")
    return raw


def _is_valid_name(name: str) -> bool:
    """Key-name rule of the signed-note spec: non-empty, no Unicode spaces, no ``+``."""
    return (
        isinstance(name, str)
        and name != ""
        and "+" not in name
        and not any(ch.isspace() or ord(ch) < 0x20 for ch in name)
        and _encodable(name)
    )


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _b64decode_canonical(text: str) -> bytes:
    """Standard, padded base64 that must re-encode to exactly ``text``."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise CheckpointError("invalid base64") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise CheckpointError("non-canonical base64")
    return raw


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


# --------------------------------------------------------------------------------------------
# Checkpoint bodies
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A parsed, validated tlog-checkpoint body."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # The origin doubles as our log's key name, so it follows the key-name rules.
        if not _is_valid_name(self.origin):
            raise CheckpointError("origin must be non-empty, without spaces, '+' or control characters")
        if isinstance(self.size, bool) or not isinstance(self.size, int):
            raise CheckpointError("tree size must be an int")
        if not 0 <= self.size <= MAX_TREE_SIZE:
            raise CheckpointError("tree size out of range")
        if not isinstance(self.root_hash, bytes) or len(self.root_hash) != HASH_SIZE:
            raise CheckpointError(f"root hash must be {HASH_SIZE} bytes")
        if not isinstance(self.extensions, tuple):
            raise CheckpointError("extensions must be a tuple of str")
        for line in self.extensions:
            _check_text(line, "extension line")
            if line == "" or "\n" in line:
                raise CheckpointError("extension lines must be non-empty single lines")

    def to_text(self) -> str:
        """Return the checkpoint body (the note text), ending in a newline."""
        lines = [self.origin, str(self.size), _b64(self.root_hash), *self.extensions]
        return "\n".join(lines) + "\n"


def format_checkpoint(origin: str, size: int, root: bytes, extensions: Sequence[str] = ()) -> str:
    """Return the tlog-checkpoint body for a tree head; raise :class:`CheckpointError` if invalid."""
    if isinstance(extensions, str):
        raise CheckpointError("extensions must be a sequence of lines, not one str")
    return Checkpoint(origin, size, root, tuple(extensions)).to_text()


def parse_checkpoint(text: str) -> Checkpoint:
    """Parse a checkpoint body strictly.

    Rejects: anything but newline-terminated, non-empty lines (so no blank line and no trailing
    junk after the final newline); fewer than three lines; an origin breaking the key-name rules;
    a size with a sign, leading zeros, non-ASCII digits or above 2**64-1; a root that is not
    canonical base64 of exactly 32 bytes; control characters anywhere.
    """
    _check_text(text, "checkpoint")
    if not text.endswith("\n"):
        raise CheckpointError("checkpoint must end with a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3 or any(line == "" for line in lines):
        raise CheckpointError("checkpoint needs at least three non-empty lines")
    origin, size_line, root_line, *extensions = lines
    if not _SIZE_RE.fullmatch(size_line):
        raise CheckpointError("malformed tree size")
    if len(root_line) != 44:  # base64 of 32 bytes
        raise CheckpointError("malformed root hash")
    root = _b64decode_canonical(root_line)
    return Checkpoint(origin, int(size_line), root, tuple(extensions))


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


def key_id(name: str, public_key: bytes) -> bytes:
    """Return the 4-byte Ed25519 key id ``SHA-256(name || 0x0A || 0x01 || public_key)[:4]``."""
    if not _is_valid_name(name):
        raise CheckpointError("invalid key name")
    if not isinstance(public_key, bytes) or len(public_key) != _ED25519_KEY_SIZE:
        raise CheckpointError("Ed25519 public key must be 32 bytes")
    digest = hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([SIGNATURE_TYPE_ED25519]) + public_key)
    return digest.digest()[:_KEY_ID_SIZE]


@dataclass(frozen=True, slots=True)
class VerifierKey:
    """A trusted Ed25519 note-verifier key: name, 4-byte key id and 32-byte public key."""

    name: str
    key_id: bytes
    public_key: bytes

    def __post_init__(self) -> None:
        if key_id(self.name, self.public_key) != self.key_id:
            raise CheckpointError("key id does not match the key name and public key")

    def to_vkey(self) -> str:
        """Return the ``<name>+<hex key id>+<base64(0x01 || key)>`` encoding."""
        blob = bytes([SIGNATURE_TYPE_ED25519]) + self.public_key
        return f"{self.name}+{self.key_id.hex()}+{_b64(blob)}"


def format_vkey(name: str, public_key: bytes) -> str:
    """Return the vkey text for an Ed25519 public key under ``name``."""
    return VerifierKey(name, key_id(name, public_key), public_key).to_vkey()


def parse_vkey(vkey: str) -> VerifierKey:
    """Parse a vkey strictly: valid name, 8 lowercase hex digits, canonical base64 of
    ``0x01 || 32-byte key``, and a key id that matches the name and key."""
    if not isinstance(vkey, str):
        raise CheckpointError("vkey must be str")
    parts = vkey.split("+", 2)  # the base64 part may itself contain '+'
    if len(parts) != 3:
        raise CheckpointError("malformed vkey")
    name, hex_id, b64_key = parts
    if not _is_valid_name(name) or not _KEY_ID_RE.fullmatch(hex_id):
        raise CheckpointError("malformed vkey")
    blob = _b64decode_canonical(b64_key)
    if len(blob) != 1 + _ED25519_KEY_SIZE or blob[0] != SIGNATURE_TYPE_ED25519:
        raise CheckpointError("vkey is not an Ed25519 key")
    return VerifierKey(name, bytes.fromhex(hex_id), blob[1:])


@runtime_checkable
class CheckpointSigner(Protocol):
    """Something that signs notes as a named key (a local key file, later an HSM or KMS)."""

    @property
    def name(self) -> str:
        """The key name (for the log's own key, the checkpoint origin)."""
        ...

    @property
    def key_id(self) -> bytes:
        """The 4-byte key id placed in front of each signature."""
        ...

    @property
    def public_key(self) -> bytes:
        """The raw public key (32 bytes for Ed25519)."""
        ...

    def sign(self, message: bytes) -> bytes:
        """Return the signature over ``message`` (the note text as UTF-8)."""
        ...


class Ed25519CheckpointSigner:
    """A :class:`CheckpointSigner` holding an Ed25519 private key in memory.

    The key file is the Go sumdb/note signer-key text, mode 0600. ``repr`` never shows key
    material.
    """

    __slots__ = ("_key_id", "_name", "_private_key", "_public_key")

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        """Wrap ``private_key`` as the signer named ``name``."""
        if not _is_valid_name(name):
            raise CheckpointError("invalid key name")
        if not isinstance(private_key, Ed25519PrivateKey):
            raise CheckpointError("an Ed25519 private key is required")
        self._name = name
        self._private_key = private_key
        self._public_key = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self._key_id = key_id(name, self._public_key)

    @classmethod
    def generate(cls, name: str) -> Ed25519CheckpointSigner:
        """Return a signer with a fresh random key."""
        return cls(name, Ed25519PrivateKey.generate())

    @classmethod
    def from_skey(cls, skey: str) -> Ed25519CheckpointSigner:
        """Parse ``PRIVATE+KEY+<name>+<hex key id>+<base64(0x01 || seed)>`` strictly."""
        if not isinstance(skey, str) or not skey.startswith(_SKEY_PREFIX):
            raise CheckpointError("malformed signer key")
        parts = skey[len(_SKEY_PREFIX) :].split("+", 2)
        if len(parts) != 3:
            raise CheckpointError("malformed signer key")
        name, hex_id, b64_seed = parts
        if not _is_valid_name(name) or not _KEY_ID_RE.fullmatch(hex_id):
            raise CheckpointError("malformed signer key")
        try:
            blob = _b64decode_canonical(b64_seed)
        except CheckpointError:
            raise CheckpointError("malformed signer key") from None
        if len(blob) != 1 + _ED25519_KEY_SIZE or blob[0] != SIGNATURE_TYPE_ED25519:
            raise CheckpointError("signer key is not an Ed25519 key")
        signer = cls(name, Ed25519PrivateKey.from_private_bytes(blob[1:]))
        if signer.key_id != bytes.fromhex(hex_id):
            raise CheckpointError("signer key id does not match its key")
        return signer

    def export_skey(self) -> str:
        """Return the secret signer-key text. Handle like the key itself."""
        seed = self._private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        blob = bytes([SIGNATURE_TYPE_ED25519]) + seed
        return f"{_SKEY_PREFIX}{self._name}+{self._key_id.hex()}+{_b64(blob)}"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Ed25519CheckpointSigner:
        """Read a key file written by :meth:`save`.

        Refuses anything but a regular file with no group or other permission bits (``chmod
        600``). The mode is checked on the opened descriptor, so a swapped path cannot slip
        through. OS errors (missing file, no permission) propagate as :class:`OSError`.
        """
        # O_NONBLOCK: opening a FIFO planted at the path must not hang the service.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise CheckpointError("checkpoint key file is not a regular file")
            if info.st_mode & 0o077:
                raise CheckpointError("checkpoint key file is accessible to group or others (chmod 600)")
        except BaseException:
            os.close(fd)
            raise
        with os.fdopen(fd, "rb") as handle:
            raw = handle.read(_MAX_KEY_FILE_BYTES + 1)
        if len(raw) > _MAX_KEY_FILE_BYTES:
            raise CheckpointError("checkpoint key file is too large")
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise CheckpointError("malformed checkpoint key file") from None
        return cls.from_skey(text.removesuffix("\n"))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key file with mode 0600; refuse to overwrite an existing file."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags, 0o600)
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)  # the umask may have stripped the owner bits
            handle.write((self.export_skey() + "\n").encode("ascii"))
            handle.flush()
            os.fsync(handle.fileno())

    @property
    def name(self) -> str:
        """The key name."""
        return self._name

    @property
    def key_id(self) -> bytes:
        """The 4-byte key id."""
        return self._key_id

    @property
    def public_key(self) -> bytes:
        """The 32-byte Ed25519 public key."""
        return self._public_key

    def verifier_key(self) -> VerifierKey:
        """Return the matching verifier key."""
        return VerifierKey(self._name, self._key_id, self._public_key)

    def sign(self, message: bytes) -> bytes:
        """Return the 64-byte Ed25519 signature over ``message``."""
        return self._private_key.sign(message)

    def __repr__(self) -> str:
        return f"Ed25519CheckpointSigner(name={self._name!r}, key_id={self._key_id.hex()!r}, key=<redacted>)"

    def __reduce__(self) -> NoReturn:
        raise TypeError("checkpoint signers cannot be pickled")


# --------------------------------------------------------------------------------------------
# Signed notes
# --------------------------------------------------------------------------------------------


def sign_note(text: str, signer: CheckpointSigner, *more_signers: CheckpointSigner) -> str:
    """Return ``text`` as a signed note with one signature line per signer, in order.

    ``text`` must be non-empty UTF-8, end with a newline and hold no control characters but
    newlines.
    """
    raw = _check_text(text, "note text")
    if not text.endswith("\n"):
        raise CheckpointError("note text must end with a newline")
    lines: list[str] = []
    seen: set[tuple[str, bytes]] = set()
    for each in (signer, *more_signers):
        name, kid = each.name, each.key_id
        if not _is_valid_name(name):
            raise CheckpointError("invalid key name")
        if not isinstance(kid, bytes) or len(kid) != _KEY_ID_SIZE:
            raise CheckpointError("key id must be 4 bytes")
        if (name, kid) in seen:
            raise CheckpointError("the same key signs twice")
        seen.add((name, kid))
        signature = each.sign(raw)
        if not isinstance(signature, bytes) or not signature:
            raise CheckpointError("signer returned no signature")
        lines.append(f"{_SIG_PREFIX}{name} {_b64(kid + signature)}\n")
    return text + "\n" + "".join(lines)


@dataclass(frozen=True, slots=True)
class _SignatureLine:
    name: str
    key_id: bytes
    signature: bytes


def _split_note(note: str) -> tuple[str, list[_SignatureLine]]:
    raw = _check_text(note, "note")
    if len(raw) > MAX_NOTE_BYTES:
        raise CheckpointError("note too large")
    # The text ends at the last blank line; signature lines cannot contain one.
    split = note.rfind("\n\n")
    if split < 0:
        raise CheckpointError("note has no signature block")
    text, block = note[: split + 1], note[split + 2 :]
    if not block.endswith("\n"):
        raise CheckpointError("note must end with a newline after its signatures")
    signatures: list[_SignatureLine] = []
    for line in block[:-1].split("\n"):
        if not line.startswith(_SIG_PREFIX):
            raise CheckpointError("malformed signature line")
        name, sep, b64 = line[len(_SIG_PREFIX) :].partition(" ")
        if not sep or not _is_valid_name(name) or not b64:
            raise CheckpointError("malformed signature line")
        blob = _b64decode_canonical(b64)
        if len(blob) <= _KEY_ID_SIZE:
            raise CheckpointError("malformed signature line")
        signatures.append(_SignatureLine(name, blob[:_KEY_ID_SIZE], blob[_KEY_ID_SIZE:]))
        if len(signatures) > MAX_SIGNATURES:
            raise CheckpointError("too many signatures")
    return text, signatures


def verify_note(note: str, vkey: str | VerifierKey) -> str:
    """Verify ``note`` against one trusted key and return its text.

    Per the signed-note spec: lines whose (name, key id) differ from the key are ignored; every
    line that matches must verify (one bad signature rejects the whole note); at least one must
    match. Raises :class:`CheckpointError` for a malformed note or key, a bad signature, or no
    signature by the key.
    """
    key = vkey if isinstance(vkey, VerifierKey) else parse_vkey(vkey)
    text, signatures = _split_note(note)
    try:
        public_key = Ed25519PublicKey.from_public_bytes(key.public_key)
    except ValueError:
        raise CheckpointError("invalid Ed25519 public key") from None
    message = text.encode("utf-8")
    verified = False
    for line in signatures:
        if line.name != key.name or line.key_id != key.key_id:
            continue
        if len(line.signature) != _ED25519_SIG_SIZE:
            raise CheckpointError("signature does not verify")
        try:
            public_key.verify(line.signature, message)
        except InvalidSignature:
            raise CheckpointError("signature does not verify") from None
        verified = True
    if not verified:
        raise CheckpointError("note is not signed by the trusted key")
    return text


def verify_checkpoint(note: str, vkey: str | VerifierKey, *, origin: str | None = None) -> Checkpoint:
    """Verify a signed checkpoint and return it parsed.

    The checkpoint's origin must equal ``origin``, or, when that is ``None``, the key name (the
    spec's SHOULD: a log signs under its origin).
    """
    key = vkey if isinstance(vkey, VerifierKey) else parse_vkey(vkey)
    checkpoint = parse_checkpoint(verify_note(note, key))
    expected = key.name if origin is None else origin
    if checkpoint.origin != expected:
        raise CheckpointError("checkpoint origin is not the expected log")
    return checkpoint
