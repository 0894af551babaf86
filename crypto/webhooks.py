"""Standard Webhooks signatures (https://www.standardwebhooks.com, specification version 1.0.0).

    secret = generate_secret()                                   # "whsec_..." shown once to the physician
    value = sign(msg_id, timestamp, body, [new_secret, old_secret])
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "webhook-signature": value}
    verify(headers, body, [secret], now=int(time.time()))        # raises WebhookVerificationError

What the specification fixes, and this module follows:
- three headers: `webhook-id`, `webhook-timestamp` (integer Unix seconds) and `webhook-signature`;
- the signed content is `{webhook-id}.{webhook-timestamp}.{body}`, the body as the raw bytes sent;
- symmetric: `v1,` + base64(HMAC-SHA256(key, content)), the key random, 24 to 64 bytes, shown as
  `whsec_` + base64(key);
- asymmetric: `v1a,` + base64(Ed25519 signature of content), the signing key shown as `whsk_` +
  base64(32-byte seed) and the public key as `whpk_` + base64(32 raw bytes) (the spec names the prefixes;
  the byte layout is that of its reference library, pinned by its known-answer vector in the tests);
- `webhook-signature` is a space-separated list, so during a rotation every message carries a signature
  under the old and under the new secret, and a receiver accepts it if any one of them verifies; unknown
  versions are skipped, for forward compatibility;
- symmetric signatures are compared in constant time; the timestamp must be within a tolerance of now.

Where the specification leaves a choice, this module takes the strict one: it asks that the id "not be
user controlled, or at the very least not include any `.`", so ids are 1 to 256 of `[A-Za-z0-9_-]`; the
timestamp is canonical decimal (no sign, blanks or leading zeros), so the signed text is the header text;
the signature list is bounded. No message, `repr` or exception ever contains a secret or a signature:
`WebhookVerificationError` carries only a fixed `reason`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "DEFAULT_TOLERANCE_SECONDS",
    "HEADER_ID",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "MAX_ID_LENGTH",
    "MAX_SECRET_BYTES",
    "MAX_SIGNATURES",
    "MIN_SECRET_BYTES",
    "PUBLIC_KEY_PREFIX",
    "SECRET_BYTES",
    "SECRET_PREFIX",
    "SIGNING_KEY_PREFIX",
    "Reason",
    "WebhookKeyError",
    "WebhookVerificationError",
    "generate_secret",
    "generate_signing_key",
    "is_valid_id",
    "parse_public_key",
    "parse_secret",
    "parse_signing_key",
    "public_key_for",
    "sign",
    "signed_headers",
    "verify",
]

HEADER_ID = "webhook-id"
HEADER_TIMESTAMP = "webhook-timestamp"
HEADER_SIGNATURE = "webhook-signature"

SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a password
SIGNING_KEY_PREFIX = "whsk_"
PUBLIC_KEY_PREFIX = "whpk_"

SECRET_BYTES = 32  # what we generate
MIN_SECRET_BYTES = 24  # the spec: "at least 24 bytes (192 bits, 512 maximum)"
MAX_SECRET_BYTES = 64
_ED25519_KEY_BYTES = 32
_HMAC_BYTES = 32
_ED25519_SIGNATURE_BYTES = 64

DEFAULT_TOLERANCE_SECONDS = 300  # the reference libraries' five minutes
MAX_ID_LENGTH = 256
# A rotation needs two or three entries; the bound keeps a hostile header from costing many Ed25519 checks.
MAX_SIGNATURES = 32

_ID = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_ID_LENGTH}}}")
_TIMESTAMP = re.compile(r"0|[1-9][0-9]{0,11}")  # canonical decimal, below 10**12 (year 33658)
_MAX_TIMESTAMP = 10**12 - 1

_V1 = "v1"
_V1A = "v1a"


class Reason(StrEnum):
    """Why a webhook did not verify. Stable codes, safe to log and to count."""

    MISSING_HEADER = "missing-header"  # one of the three headers absent or empty
    BAD_ID = "bad-id"  # webhook-id repeated, too long, or outside [A-Za-z0-9_-]
    BAD_TIMESTAMP = "bad-timestamp"  # webhook-timestamp repeated or not canonical decimal seconds
    STALE = "stale"  # older than the tolerance
    FUTURE = "future"  # newer than the tolerance
    BAD_SIGNATURE = "bad-signature"  # no listed signature verifies under any of our secrets or keys


class WebhookVerificationError(Exception):
    """A webhook did not verify. `reason` is a `Reason`; the message is fixed and quotes nothing."""

    def __init__(self, reason: Reason) -> None:
        super().__init__(f"webhook verification failed: {reason.value}")
        self.reason = reason


class WebhookKeyError(ValueError):
    """A `whsec_`, `whsk_` or `whpk_` string is malformed. The message names the form, never the input."""


def generate_secret() -> str:
    """Return a new symmetric signing secret: `whsec_` + base64 of 32 random bytes (`os.urandom`)."""
    return SECRET_PREFIX + _b64encode(os.urandom(SECRET_BYTES))


def parse_secret(secret: str) -> bytes:
    """Return the key bytes of a `whsec_` secret, strictly.

    Accepted: exactly `whsec_` followed by canonical padded standard base64 of 24 to 64 bytes. Anything
    else (no prefix, whitespace, URL-safe alphabet, missing padding, a key too short) raises
    `WebhookKeyError`.
    """
    key = _decode_prefixed(secret, SECRET_PREFIX)
    if key is None or not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise WebhookKeyError(
            f"a webhook secret is {SECRET_PREFIX!r} + base64 of {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes"
        )
    return key


def generate_signing_key() -> str:
    """Return a new Ed25519 signing key as `whsk_` + base64 of its 32-byte seed. Keep it like a secret."""
    return SIGNING_KEY_PREFIX + _b64encode(Ed25519PrivateKey.generate().private_bytes_raw())


def parse_signing_key(signing_key: str) -> bytes:
    """Return the 32-byte Ed25519 seed of a `whsk_` key, strictly; `WebhookKeyError` otherwise."""
    seed = _decode_prefixed(signing_key, SIGNING_KEY_PREFIX)
    if seed is None or len(seed) != _ED25519_KEY_BYTES:
        raise WebhookKeyError(f"a webhook signing key is {SIGNING_KEY_PREFIX!r} + base64 of 32 bytes")
    return seed


def public_key_for(signing_key: str) -> str:
    """Return the `whpk_` public key (base64 of 32 raw bytes) that verifies what `signing_key` signs."""
    private = Ed25519PrivateKey.from_private_bytes(parse_signing_key(signing_key))
    return PUBLIC_KEY_PREFIX + _b64encode(private.public_key().public_bytes_raw())


def parse_public_key(public_key: str) -> bytes:
    """Return the 32 raw bytes of a `whpk_` Ed25519 public key, strictly; `WebhookKeyError` otherwise."""
    raw = _decode_prefixed(public_key, PUBLIC_KEY_PREFIX)
    if raw is None or len(raw) != _ED25519_KEY_BYTES:
        raise WebhookKeyError(f"a webhook public key is {PUBLIC_KEY_PREFIX!r} + base64 of 32 bytes")
    try:
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise WebhookKeyError("not an Ed25519 public key") from None
    return raw


def is_valid_id(msg_id: str) -> bool:
    """Whether `msg_id` is acceptable as a `webhook-id`: 1 to 256 of `[A-Za-z0-9_-]` (never a `.`)."""
    return isinstance(msg_id, str) and _ID.fullmatch(msg_id) is not None


def sign(
    msg_id: str,
    timestamp: int,
    body: bytes,
    secrets: Sequence[str],
    *,
    ed25519_keys: Sequence[str] = (),
) -> str:
    """Return the `webhook-signature` header value for one delivery attempt.

    One `v1,<HMAC>` per `whsec_` secret, then one `v1a,<Ed25519>` per `whsk_` key, space-separated and
    in the order given: during a rotation pass the new and the old secret. `timestamp` is the attempt's
    Unix time in seconds (a retry is signed again with a new one); `msg_id` stays the same across
    retries. Raises `ValueError` for an unusable id or timestamp or no key at all, `WebhookKeyError`
    for a malformed secret or key.
    """
    hmac_keys = [parse_secret(s) for s in _strings(secrets, "secrets")]
    signing_keys = [
        Ed25519PrivateKey.from_private_bytes(parse_signing_key(k)) for k in _strings(ed25519_keys, "ed25519_keys")
    ]
    if not hmac_keys and not signing_keys:
        raise ValueError("sign needs at least one secret or signing key")
    content = _content(msg_id, timestamp, body)
    parts = [f"{_V1},{_b64encode(_hmac(key, content))}" for key in hmac_keys]
    parts += [f"{_V1A},{_b64encode(key.sign(content))}" for key in signing_keys]
    return " ".join(parts)


def signed_headers(
    msg_id: str,
    timestamp: int,
    body: bytes,
    secrets: Sequence[str],
    *,
    ed25519_keys: Sequence[str] = (),
) -> dict[str, str]:
    """The three Standard Webhooks headers for one delivery attempt (see `sign`)."""
    signature = sign(msg_id, timestamp, body, secrets, ed25519_keys=ed25519_keys)
    return {HEADER_ID: msg_id, HEADER_TIMESTAMP: str(timestamp), HEADER_SIGNATURE: signature}


def verify(
    headers: Mapping[str, str],
    body: bytes,
    secrets: Sequence[str],
    *,
    now: int,
    tolerance: int = DEFAULT_TOLERANCE_SECONDS,
    public_keys: Sequence[str] = (),
) -> int:
    """Check a received webhook; if it is authentic and fresh, return which key verified it.

    `body` is the raw request body, exactly as received (never re-serialized JSON). Header names are
    matched without regard to case; a repeated webhook header is refused. The message is accepted if any
    `v1` entry matches the HMAC under any of `secrets`, or any `v1a` entry verifies under any of
    `public_keys`; unknown versions and malformed entries are skipped. `now` is the receiver's Unix time;
    the timestamp must be within `tolerance` seconds of it either way. Raises `WebhookVerificationError`
    with the first `Reason` that applies, in the order of the `Reason` members. Replays within the
    tolerance are the caller's to stop, with `webhook-id` as the idempotency key.

    The value returned is the position of the key that verified the first matching entry: an index into
    `secrets`, or `len(secrets)` plus an index into `public_keys` (the receiver records which key of a
    rotation the sender used).
    """
    hmac_keys = [parse_secret(s) for s in _strings(secrets, "secrets")]
    verify_keys = [
        Ed25519PublicKey.from_public_bytes(parse_public_key(k)) for k in _strings(public_keys, "public_keys")
    ]
    if not hmac_keys and not verify_keys:
        raise ValueError("verify needs at least one secret or public key")
    if not isinstance(body, bytes):
        raise TypeError("body must be the raw bytes received")
    if isinstance(now, bool) or not isinstance(now, int):
        raise TypeError("now must be an int (Unix seconds)")
    if isinstance(tolerance, bool) or not isinstance(tolerance, int) or tolerance < 0:
        raise ValueError("tolerance must be a non-negative int (seconds)")

    found = _webhook_headers(headers)
    msg_id, timestamp_text, signature_list = (found.get(n) for n in (HEADER_ID, HEADER_TIMESTAMP, HEADER_SIGNATURE))
    if not msg_id or not timestamp_text or not signature_list:
        raise WebhookVerificationError(Reason.MISSING_HEADER)
    if msg_id is _REPEATED or not is_valid_id(msg_id):
        raise WebhookVerificationError(Reason.BAD_ID)
    if timestamp_text is _REPEATED or _TIMESTAMP.fullmatch(timestamp_text) is None:
        raise WebhookVerificationError(Reason.BAD_TIMESTAMP)
    timestamp = int(timestamp_text)
    if now - timestamp > tolerance:
        raise WebhookVerificationError(Reason.STALE)
    if timestamp - now > tolerance:
        raise WebhookVerificationError(Reason.FUTURE)
    if signature_list is _REPEATED:
        raise WebhookVerificationError(Reason.BAD_SIGNATURE)

    entries = [e for e in signature_list.split(" ") if e]
    if len(entries) > MAX_SIGNATURES:
        raise WebhookVerificationError(Reason.BAD_SIGNATURE)
    content = _content(msg_id, timestamp, body)
    expected = [_hmac(key, content) for key in hmac_keys]
    for entry in entries:
        version, _, encoded = entry.partition(",")
        if version == _V1 and expected:
            candidate = _b64decode(encoded, _HMAC_BYTES)
            if candidate is not None and (found_at := _index_equal(candidate, expected)) is not None:
                return found_at
        elif version == _V1A and verify_keys:
            candidate = _b64decode(encoded, _ED25519_SIGNATURE_BYTES)
            if candidate is not None:
                for index, key in enumerate(verify_keys):
                    if _ed25519_ok(key, candidate, content):
                        return len(hmac_keys) + index
    raise WebhookVerificationError(Reason.BAD_SIGNATURE)


# A unique marker for a header that appears more than once, so it can never be mistaken for a value.
_REPEATED = "\x00repeated"


def _webhook_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The three webhook headers by lower-case name; `_REPEATED` for one that appears more than once."""
    wanted = (HEADER_ID, HEADER_TIMESTAMP, HEADER_SIGNATURE)
    found: dict[str, str] = {}
    # items() and not get(): a case-insensitive multi-dict (aiohttp's) yields every occurrence.
    for name, value in headers.items():
        key = name.lower() if isinstance(name, str) and name.isascii() else None
        if key in wanted and isinstance(value, str):
            found[key] = _REPEATED if key in found else value
    return found


def _content(msg_id: str, timestamp: int, body: bytes) -> bytes:
    if not is_valid_id(msg_id):
        raise ValueError(f"webhook id must be 1 to {MAX_ID_LENGTH} of [A-Za-z0-9_-]")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int) or not 0 <= timestamp <= _MAX_TIMESTAMP:
        raise ValueError("timestamp must be an int of Unix seconds")
    if not isinstance(body, bytes):
        raise TypeError("body must be bytes")
    return b"%s.%d.%s" % (msg_id.encode("ascii"), timestamp, body)


def _hmac(key: bytes, content: bytes) -> bytes:
    return hmac.new(key, content, hashlib.sha256).digest()


def _index_equal(candidate: bytes, expected: Iterable[bytes]) -> int | None:
    # compare_digest against every secret, no early exit: timing does not tell which secret matched.
    found: int | None = None
    for index, digest in enumerate(expected):
        if hmac.compare_digest(candidate, digest) and found is None:
            found = index
    return found


def _ed25519_ok(key: Ed25519PublicKey, signature: bytes, content: bytes) -> bool:
    try:
        key.verify(signature, content)
    except InvalidSignature:
        return False
    return True


def _strings(values: Sequence[str], name: str) -> list[str]:
    # A bare str is a Sequence[str] too: iterating it would try every character as a key.
    if isinstance(values, str | bytes):
        raise TypeError(f"{name} must be a sequence of strings, not a single string")
    return list(values)


def _b64encode(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _b64decode(text: str, length: int | None = None) -> bytes | None:
    """Canonical padded standard base64 only (so one value has one spelling), else None."""
    if not isinstance(text, str) or not text.isascii():
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error:
        return None
    if _b64encode(raw) != text or (length is not None and len(raw) != length):
        return None
    return raw


def _decode_prefixed(value: str, prefix: str) -> bytes | None:
    if not isinstance(value, str) or not value.startswith(prefix):
        return None
    return _b64decode(value[len(prefix) :])
