"""Standard Webhooks signatures: interoperable with the reference library, strict, and quiet about secrets."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError as ReferenceVerificationError

from crypto import webhooks
from crypto.webhooks import (
    Reason,
    WebhookKeyError,
    WebhookVerificationError,
    generate_secret,
    generate_signing_key,
    parse_public_key,
    parse_secret,
    parse_signing_key,
    public_key_for,
    sign,
    signed_headers,
    verify,
)

CHEAP = settings(max_examples=100, deadline=None)

# Fixed secrets keep the properties fast and the failures reproducible.
OLD = "whsec_" + base64.b64encode(bytes(range(32))).decode()
NEW = "whsec_" + base64.b64encode(bytes(range(100, 132))).decode()
OTHER = "whsec_" + base64.b64encode(b"\xee" * 32).decode()
SIGNING_KEY = "whsk_" + base64.b64encode(bytes(range(200, 232))).decode()
PUBLIC_KEY = public_key_for(SIGNING_KEY)

MSG_ID = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"
T0 = 1_674_087_231
BODY = b'{"type":"message.created","timestamp":"2026-01-01T00:00:00Z","data":{"id":"m-1"}}'

ids = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=256)
timestamps = st.integers(0, 10**12 - 1)


def headers_for(msg_id: str, timestamp: int, signature: str) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}


def reason_of(headers: dict[str, str], body: bytes = BODY, secrets: list[str] | None = None, now: int = T0) -> Reason:
    with pytest.raises(WebhookVerificationError) as caught:
        verify(headers, body, secrets if secrets is not None else [NEW], now=now)
    return caught.value.reason


# --- known answers from the specification's reference libraries -------------------------------------------


def test_hmac_signature_matches_the_reference_vector() -> None:
    # libraries/python/tests/test_webhooks.py, test_sign_function
    value = sign(
        "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}', ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]
    )
    assert value == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_ed25519_signature_matches_the_reference_vector() -> None:
    # libraries/go/webhook_asymmetric_test.go, TestAsymmetricWebhookSign: whsk_ is base64 of the 32-byte seed
    key = "whsk_VEVTVFNJR05JTkdLRVlET05PVFVTRVRISVNGT1JBTlk="
    value = sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}', [], ed25519_keys=[key])
    assert value == ("v1a,tQ9V2XOqn7jL/DQenEFpqIugdBVtiMmER5mhSkXBNwM0mkATuDe6KYYUuxqtaiHeYGb7KaaBRdM5WqyeFiL8Ag==")


# --- interoperability with the `standardwebhooks` package ----------------------------------------------------


def test_our_signature_verifies_with_the_reference_library_under_each_rotated_secret() -> None:
    now = int(time.time())  # the reference library reads the clock itself
    headers = signed_headers(MSG_ID, now, BODY, [NEW, OLD])
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(NEW).verify(BODY, headers, json_parse=False)
    Webhook(OLD).verify(BODY, headers, json_parse=False)
    with pytest.raises(ReferenceVerificationError):
        Webhook(OTHER).verify(BODY, headers, json_parse=False)


def test_reference_library_signatures_verify_with_ours_during_rotation() -> None:
    at = datetime.fromtimestamp(T0, tz=UTC)
    signature = " ".join(Webhook(s).sign(MSG_ID, at, BODY.decode()) for s in (NEW, OLD))
    headers = headers_for(MSG_ID, T0, signature)
    verify(headers, BODY, [NEW], now=T0)
    verify(headers, BODY, [OLD], now=T0)
    verify(headers, BODY, [OTHER, OLD], now=T0)
    assert reason_of(headers, secrets=[OTHER]) is Reason.BAD_SIGNATURE


@CHEAP
@given(msg_id=ids, body=st.text(max_size=256), offset=st.integers(-300, 300))
def test_reference_library_and_ours_agree_on_any_text_body(msg_id: str, body: str, offset: int) -> None:
    at = datetime.fromtimestamp(T0, tz=UTC)
    theirs = Webhook(NEW).sign(msg_id, at, body)
    assert sign(msg_id, T0, body.encode(), [NEW]) == theirs
    verify(headers_for(msg_id, T0, theirs), body.encode(), [NEW], now=T0 + offset)


# --- round trips -----------------------------------------------------------------------------------------------


@CHEAP
@given(msg_id=ids, timestamp=timestamps, body=st.binary(max_size=512))
def test_round_trip_for_any_id_timestamp_and_raw_body(msg_id: str, timestamp: int, body: bytes) -> None:
    headers = signed_headers(msg_id, timestamp, body, [NEW, OLD], ed25519_keys=[SIGNING_KEY])
    verify(headers, body, [OLD], now=timestamp)
    verify(headers, body, [], public_keys=[PUBLIC_KEY], now=timestamp)


@CHEAP
@given(body=st.binary(max_size=256), data=st.data())
def test_any_changed_body_byte_fails(body: bytes, data: st.DataObject) -> None:
    headers = signed_headers(MSG_ID, T0, body, [NEW], ed25519_keys=[SIGNING_KEY])
    changed = data.draw(st.binary(max_size=256).filter(lambda b: b != body), label="changed")
    assert reason_of(headers, changed) is Reason.BAD_SIGNATURE
    with pytest.raises(WebhookVerificationError):
        verify(headers, changed, [], public_keys=[PUBLIC_KEY], now=T0)


def test_rotation_signs_once_per_secret_then_once_per_signing_key_in_order() -> None:
    value = sign(MSG_ID, T0, BODY, [NEW, OLD], ed25519_keys=[SIGNING_KEY])
    assert [entry.split(",")[0] for entry in value.split(" ")] == ["v1", "v1", "v1a"]
    assert value.split(" ")[1] == sign(MSG_ID, T0, BODY, [OLD])


def test_a_signature_for_the_old_secret_alone_verifies_while_both_are_accepted() -> None:
    headers = signed_headers(MSG_ID, T0, BODY, [OLD])
    verify(headers, BODY, [NEW, OLD], now=T0)
    assert reason_of(headers, secrets=[NEW]) is Reason.BAD_SIGNATURE


def test_verify_names_the_key_that_verified_secrets_first_then_public_keys() -> None:
    # The receiver records which key of a rotation the sender used: an index into the secrets, then past them.
    assert verify(signed_headers(MSG_ID, T0, BODY, [NEW]), BODY, [NEW, OLD], now=T0) == 0
    assert verify(signed_headers(MSG_ID, T0, BODY, [OLD]), BODY, [NEW, OLD], now=T0) == 1
    by_ed25519 = signed_headers(MSG_ID, T0, BODY, [], ed25519_keys=[SIGNING_KEY])
    assert verify(by_ed25519, BODY, [NEW, OLD], public_keys=[PUBLIC_KEY], now=T0) == 2
    stranger = public_key_for(generate_signing_key())
    assert verify(by_ed25519, BODY, [NEW], public_keys=[stranger, PUBLIC_KEY], now=T0) == 2


# --- tampering and replay ----------------------------------------------------------------------------------------


def test_tampered_body_id_or_timestamp_fails() -> None:
    good = signed_headers(MSG_ID, T0, BODY, [NEW])
    assert reason_of(good, BODY + b" ") is Reason.BAD_SIGNATURE
    assert reason_of(good, BODY.replace(b"m-1", b"m-2")) is Reason.BAD_SIGNATURE
    assert reason_of({**good, "webhook-id": MSG_ID + "x"}) is Reason.BAD_SIGNATURE
    assert reason_of({**good, "webhook-timestamp": str(T0 + 1)}) is Reason.BAD_SIGNATURE


def test_replayed_headers_with_another_body_fail() -> None:
    first = signed_headers(MSG_ID, T0, BODY, [NEW])
    verify(first, BODY, [NEW], now=T0)
    assert reason_of(first, b'{"type":"message.created","data":{"id":"m-666"}}') is Reason.BAD_SIGNATURE


def test_a_signature_cannot_be_moved_across_the_id_and_timestamp_boundary() -> None:
    # "a.1.2" + body is signed; "a" with timestamp 1 and body "2..." must not reuse it (ids never hold ".").
    value = sign("a", 1, b"2.x", [NEW])
    assert reason_of(headers_for("a.1", 2, value), b"x", now=2) is Reason.BAD_ID


@pytest.mark.parametrize(
    ("offset", "reason"),
    [(-301, Reason.STALE), (-(10**6), Reason.STALE), (301, Reason.FUTURE), (10**6, Reason.FUTURE)],
)
def test_timestamps_outside_the_tolerance_fail(offset: int, reason: Reason) -> None:
    headers = signed_headers(MSG_ID, T0 + offset, BODY, [NEW])
    assert reason_of(headers, now=T0) is reason


@pytest.mark.parametrize("offset", [-300, 0, 300])
def test_timestamps_at_the_edge_of_the_tolerance_pass(offset: int) -> None:
    verify(signed_headers(MSG_ID, T0 + offset, BODY, [NEW]), BODY, [NEW], now=T0)


def test_the_tolerance_is_configurable() -> None:
    headers = signed_headers(MSG_ID, T0 - 60, BODY, [NEW])
    verify(headers, BODY, [NEW], now=T0, tolerance=60)
    with pytest.raises(WebhookVerificationError):
        verify(headers, BODY, [NEW], now=T0, tolerance=59)


# --- the signature list ------------------------------------------------------------------------------------------


def test_garbage_entries_around_a_valid_signature_are_skipped() -> None:
    valid = sign(MSG_ID, T0, BODY, [NEW])
    garbage = [
        "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",  # well-formed, wrong
        "v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",  # unknown version
        "v1,",
        "v1",
        ",,,",
        "v1,not base64!",
        "v1,Zm9v",  # base64 of the wrong length
        "v1,\u00e9\u00e9\u00e9",
        "v1a,AAAA",
        "v1a," + base64.b64encode(bytes(64)).decode(),
    ]
    verify(headers_for(MSG_ID, T0, " ".join([*garbage, valid, *garbage])), BODY, [NEW], now=T0)
    assert reason_of(headers_for(MSG_ID, T0, " ".join(garbage))) is Reason.BAD_SIGNATURE
    verify(headers_for(MSG_ID, T0, "  " + valid + "  "), BODY, [NEW], now=T0)


def test_a_v1_entry_is_not_checked_as_v1a_or_the_other_way_round() -> None:
    hmac_value = sign(MSG_ID, T0, BODY, [NEW]).removeprefix("v1,")
    ed_value = sign(MSG_ID, T0, BODY, [], ed25519_keys=[SIGNING_KEY]).removeprefix("v1a,")
    assert reason_of(headers_for(MSG_ID, T0, "v1a," + hmac_value)) is Reason.BAD_SIGNATURE
    with pytest.raises(WebhookVerificationError):
        verify(headers_for(MSG_ID, T0, "v1," + ed_value), BODY, [], public_keys=[PUBLIC_KEY], now=T0)


def test_non_canonical_base64_of_a_valid_signature_is_refused() -> None:
    encoded = sign(MSG_ID, T0, BODY, [NEW]).removeprefix("v1,")
    for variant in (encoded.rstrip("="), encoded.replace("+", "-").replace("/", "_"), " " + encoded):
        if variant != encoded:
            assert reason_of(headers_for(MSG_ID, T0, "v1," + variant)) is Reason.BAD_SIGNATURE


def test_too_many_entries_are_refused_even_with_a_valid_one() -> None:
    valid = sign(MSG_ID, T0, BODY, [NEW])
    junk = ["v9,x"] * webhooks.MAX_SIGNATURES
    assert reason_of(headers_for(MSG_ID, T0, " ".join([*junk, valid]))) is Reason.BAD_SIGNATURE


def test_a_list_of_exactly_the_maximum_entries_still_verifies() -> None:
    valid = sign(MSG_ID, T0, BODY, [NEW])
    junk = ["v9,x"] * (webhooks.MAX_SIGNATURES - 1)
    assert verify(headers_for(MSG_ID, T0, " ".join([*junk, valid])), BODY, [NEW], now=T0) == 0


# --- headers ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_a_missing_or_empty_header_fails(name: str) -> None:
    headers = signed_headers(MSG_ID, T0, BODY, [NEW])
    assert reason_of({k: v for k, v in headers.items() if k != name}) is Reason.MISSING_HEADER
    assert reason_of({**headers, name: ""}) is Reason.MISSING_HEADER


def test_header_names_match_without_regard_to_case() -> None:
    headers = signed_headers(MSG_ID, T0, BODY, [NEW])
    verify({k.title(): v for k, v in headers.items()}, BODY, [NEW], now=T0)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("Webhook-Id", Reason.BAD_ID),
        ("WEBHOOK-TIMESTAMP", Reason.BAD_TIMESTAMP),
        ("Webhook-Signature", Reason.BAD_SIGNATURE),
    ],
)
def test_a_repeated_header_fails(name: str, reason: Reason) -> None:
    headers = signed_headers(MSG_ID, T0, BODY, [NEW])
    assert reason_of({**headers, name: headers[name.lower()]}) is reason


@pytest.mark.parametrize(
    "msg_id",
    ["msg.1", "msg 1", "msg/1", "msg:1", "msg\u00e91", "\u0661", "x" * 257, "msg\n"],
)
def test_ids_outside_the_charset_or_too_long_fail(msg_id: str) -> None:
    assert reason_of(headers_for(msg_id, T0, sign(MSG_ID, T0, BODY, [NEW]))) is Reason.BAD_ID
    with pytest.raises(ValueError, match="webhook id"):
        sign(msg_id, T0, BODY, [NEW])


@pytest.mark.parametrize(
    "timestamp",
    ["abc", "+1674087231", "-1", "1674087231.0", " 1674087231", "1674087231 ", "01674087231", "1_674_087_231",
     "\u0661\u0666\u0667", "1e9", "9" * 13],
)  # fmt: skip
def test_timestamps_that_are_not_canonical_integer_seconds_fail(timestamp: str) -> None:
    headers = {**signed_headers(MSG_ID, T0, BODY, [NEW]), "webhook-timestamp": timestamp}
    assert reason_of(headers) is Reason.BAD_TIMESTAMP


def test_the_reasons_are_checked_in_a_fixed_order() -> None:
    stale_and_unsigned = headers_for(MSG_ID, T0 - 3600, "v1,garbage")
    assert reason_of(stale_and_unsigned) is Reason.STALE
    assert reason_of({**stale_and_unsigned, "webhook-id": "bad.id"}) is Reason.BAD_ID


# --- secrets and keys --------------------------------------------------------------------------------------------


def test_generated_secrets_are_whsec_and_32_random_bytes() -> None:
    first, second = generate_secret(), generate_secret()
    assert first.startswith("whsec_")
    assert len(parse_secret(first)) == 32
    assert first != second


def test_parse_secret_accepts_24_to_64_bytes() -> None:
    for size in (24, 32, 64):
        assert parse_secret("whsec_" + base64.b64encode(b"k" * size).decode()) == b"k" * size


@pytest.mark.parametrize(
    "secret",
    [
        "",
        "whsec_",
        base64.b64encode(bytes(32)).decode(),  # no prefix
        "WHSEC_" + base64.b64encode(bytes(32)).decode(),
        "whsec_" + base64.b64encode(bytes(23)).decode(),  # too short
        "whsec_" + base64.b64encode(bytes(65)).decode(),  # too long
        "whsec_" + base64.b64encode(bytes(32)).decode().rstrip("="),  # unpadded
        "whsec_" + base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode(),  # URL-safe alphabet
        "whsec_ " + base64.b64encode(bytes(32)).decode(),
        "whsec_" + base64.b64encode(bytes(32)).decode() + "\n",
        "whsec_" + base64.b64encode(bytes(32)).decode()[:-2] + "B=",  # non-zero trailing bits
        "whsk_" + base64.b64encode(bytes(32)).decode(),
    ],
)
def test_parse_secret_is_strict_and_never_quotes_the_input(secret: str) -> None:
    with pytest.raises(WebhookKeyError) as caught:
        parse_secret(secret)
    payload = secret.removeprefix("whsec_")
    assert not payload or payload not in str(caught.value)


def test_ed25519_keys_round_trip_in_their_spec_forms() -> None:
    signing_key = generate_signing_key()
    public_key = public_key_for(signing_key)
    assert signing_key.startswith("whsk_")
    assert len(parse_signing_key(signing_key)) == 32
    assert public_key.startswith("whpk_")
    assert len(parse_public_key(public_key)) == 32
    headers = signed_headers(MSG_ID, T0, BODY, [], ed25519_keys=[signing_key])
    verify(headers, BODY, [], public_keys=[public_key], now=T0)
    with pytest.raises(WebhookVerificationError):
        verify(headers, BODY, [], public_keys=[PUBLIC_KEY], now=T0)


@pytest.mark.parametrize("bad", [SIGNING_KEY, "whpk_" + base64.b64encode(bytes(31)).decode(), NEW, "whpk_"])
def test_parse_public_key_is_strict(bad: str) -> None:
    with pytest.raises(WebhookKeyError):
        parse_public_key(bad)


def test_keys_of_the_wrong_kind_are_refused_where_they_are_used() -> None:
    with pytest.raises(WebhookKeyError):
        sign(MSG_ID, T0, BODY, [SIGNING_KEY])
    with pytest.raises(WebhookKeyError):
        sign(MSG_ID, T0, BODY, [], ed25519_keys=[NEW])
    with pytest.raises(WebhookKeyError):
        verify(signed_headers(MSG_ID, T0, BODY, [NEW]), BODY, [], public_keys=[SIGNING_KEY], now=T0)


def test_misuse_is_a_programming_error_not_a_verification_failure() -> None:
    headers = signed_headers(MSG_ID, T0, BODY, [NEW])
    with pytest.raises(TypeError):
        verify(headers, BODY, NEW, now=T0)  # a bare string is not a list of secrets
    with pytest.raises(TypeError):
        sign(MSG_ID, T0, BODY, NEW)
    with pytest.raises(ValueError, match="at least one"):
        verify(headers, BODY, [], now=T0)
    with pytest.raises(ValueError, match="at least one"):
        sign(MSG_ID, T0, BODY, [])
    with pytest.raises(TypeError):
        verify(headers, BODY.decode(), [NEW], now=T0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timestamp"):
        sign(MSG_ID, -1, BODY, [NEW])
    with pytest.raises(ValueError, match="tolerance"):
        verify(headers, BODY, [NEW], now=T0, tolerance=-1)


def test_errors_say_only_the_reason() -> None:
    headers = signed_headers(MSG_ID, T0, BODY, [NEW])
    with pytest.raises(WebhookVerificationError) as caught:
        verify({**headers, "webhook-id": "evil.id"}, BODY, [NEW], now=T0)
    assert str(caught.value) == "webhook verification failed: bad-id"
    with pytest.raises(WebhookVerificationError) as caught:
        verify(headers, BODY, [OTHER], now=T0)
    text = str(caught.value) + repr(caught.value)
    for secret_part in (OTHER.removeprefix("whsec_"), headers["webhook-signature"], MSG_ID):
        assert secret_part not in text
