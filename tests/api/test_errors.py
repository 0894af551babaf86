"""Error shapes: every refusal is RFC 9457 problem+json with a stable code and the request's id, and never
echoes what the client sent. Exercised on `POST /v1/admin/issuers`, the route with a request body."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import ClientResponse
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from service.settings import Settings
from tests.conftest import Portals
from tests.support import TestIssuer, canary

ISSUERS = "/v1/admin/issuers"
BODY_LIMIT = 1024


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The suite's settings with a small body limit, so that 413 needs only a small body."""
    return settings.model_copy(update={"max_json_body_bytes": BODY_LIMIT})


def _admin(portals: Portals) -> dict[str, str]:
    return portals.acme.auth(role="admin", sub="Practitioner/admin1")


def _public_pem(private_key: Any) -> str:
    return (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _der(tag: int, content: bytes) -> bytes:
    """One DER TLV; the structures built here stay under 256 bytes."""
    assert len(content) < 256
    return bytes([tag]) + (bytes([len(content)]) if len(content) < 128 else bytes([0x81, len(content)])) + content


def _spki_pem(algorithm_oid: bytes, parameters: bytes = b"", key: bytes = b"\x01" * 32) -> str:
    """A SubjectPublicKeyInfo with any algorithm identifier (DER OID bodies), wrapped as PEM."""
    algorithm = _der(0x30, _der(0x06, algorithm_oid) + (_der(0x06, parameters) if parameters else b""))
    der = _der(0x30, algorithm + _der(0x03, b"\x00" + key))
    return "-----BEGIN PUBLIC KEY-----\n" + base64.encodebytes(der).decode() + "-----END PUBLIC KEY-----\n"


def _weak_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - refused on purpose


EC_PUBLIC_KEY_OID = bytes.fromhex("2a8648ce3d0201")  # 1.2.840.10045.2.1

INVALID_KEYS = [
    pytest.param(lambda: canary("pem"), id="not-pem"),
    pytest.param(lambda: _public_pem(_weak_rsa_key()), id="rsa-1024"),
    pytest.param(lambda: _public_pem(ec.generate_private_key(ec.SECP384R1())), id="p-384"),
    pytest.param(lambda: _public_pem(x25519.X25519PrivateKey.generate()), id="x25519"),
    pytest.param(
        lambda: (
            ed25519.Ed25519PrivateKey.generate()
            .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            .decode()
        ),
        id="private-key",
    ),
    pytest.param(lambda: _spki_pem(bytes([0x2A, 0x03, 0x04])), id="unknown-key-type-oid"),
    pytest.param(
        lambda: _spki_pem(EC_PUBLIC_KEY_OID, bytes([0x2A, 0x03, 0x05]), b"\x04" + b"\x01" * 64), id="unknown-curve"
    ),
]


async def _problem(
    response: ClientResponse, status: int, code: str, *, canaries: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Check the RFC 9457 shape of `response` and return its body."""
    text = await response.text()
    assert response.status == status, text
    assert response.content_type == "application/problem+json"
    problem = json.loads(text)
    assert problem["type"] == f"urn:bedside:problem:{code}"
    assert problem["code"] == code
    assert isinstance(problem["title"], str)
    assert problem["title"]
    assert problem["status"] == status
    assert problem["request_id"] == response.headers["X-Request-Id"]
    for planted in canaries:
        assert planted not in text
    return problem


def _new_portal_key(portals: Portals, kid: str) -> TestIssuer:
    return TestIssuer(tenant="acme", issuer=portals.acme.issuer, kid=kid)


def _key_body(portal: TestIssuer, **overrides: Any) -> dict[str, Any]:
    return {"issuer": portal.issuer, "public_key_pem": portal.public_pem.decode(), "kid": portal.kid, **overrides}


def _endorsed_body(portals: Portals, portal: TestIssuer) -> dict[str, Any]:
    """A new key of acme's portal, endorsed by its current key (as a rotation through the API must be)."""
    return _key_body(portal, endorsement=portals.acme.endorse(portal))


# --- malformed, wrong media type, too large --------------------------------------------------------------


async def test_body_that_is_not_json_is_a_400_that_does_not_echo_it(client, portals: Portals) -> None:
    planted = canary("invalid-json")
    body = f'{{"issuer": "{planted}", "public_key_pem": '.encode()

    response = await client.post(ISSUERS, data=body, headers={**_admin(portals), "Content-Type": "application/json"})

    await _problem(response, 400, "malformed-request", canaries=(planted,))


async def test_body_that_is_not_utf8_is_a_400(client, portals: Portals) -> None:
    response = await client.post(
        ISSUERS, data=b'{"issuer": "\xff\xfe"}', headers={**_admin(portals), "Content-Type": "application/json"}
    )
    await _problem(response, 400, "malformed-request")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/jsonx"])
async def test_body_of_another_media_type_is_a_415(client, portals: Portals, content_type) -> None:
    planted = canary("text-body")
    response = await client.post(
        ISSUERS,
        data=json.dumps({"issuer": planted}).encode(),
        headers={**_admin(portals), "Content-Type": content_type},
    )
    await _problem(response, 415, "unsupported-media-type", canaries=(planted,))


async def test_json_with_a_charset_parameter_is_accepted(client, portals: Portals) -> None:
    portal = _new_portal_key(portals, "charset-key")
    response = await client.post(
        ISSUERS,
        data=json.dumps(_endorsed_body(portals, portal)).encode(),
        headers={**_admin(portals), "Content-Type": "application/json; charset=utf-8"},
    )
    assert response.status == 201, await response.text()


def _oversized(planted: str) -> bytes:
    body = json.dumps({"issuer": planted, "public_key_pem": planted * (2 * BODY_LIMIT // len(planted))}).encode()
    assert len(body) > BODY_LIMIT
    return body


async def test_body_over_the_declared_limit_is_a_413(client, portals: Portals) -> None:
    planted = canary("big-body")
    response = await client.post(
        ISSUERS, data=_oversized(planted), headers={**_admin(portals), "Content-Type": "application/json"}
    )
    await _problem(response, 413, "payload-too-large", canaries=(planted,))


async def test_chunked_body_over_the_limit_is_a_413(client, portals: Portals) -> None:
    # No Content-Length: the limit is enforced while reading.
    planted = canary("chunked-body")
    body = _oversized(planted)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 256):
            yield body[start : start + 256]

    response = await client.post(
        ISSUERS, data=chunks(), headers={**_admin(portals), "Content-Type": "application/json"}
    )
    await _problem(response, 413, "payload-too-large", canaries=(planted,))


# --- well-formed JSON of the wrong shape ---------------------------------------------------------------


async def test_unknown_field_is_a_422_naming_the_field_but_not_its_value(client, portals: Portals) -> None:
    planted = canary("unknown-field")
    body = _key_body(_new_portal_key(portals, "k2"), surprise=planted)

    response = await client.post(ISSUERS, json=body, headers=_admin(portals))

    problem = await _problem(response, 422, "validation-failed", canaries=(planted,))
    assert problem["errors"][0]["loc"] == ["surprise"]
    assert set(problem["errors"][0]) == {"loc", "type", "msg"}


async def test_field_of_the_wrong_type_is_a_422_naming_the_field(client, portals: Portals) -> None:
    planted = canary("kid")
    body = _key_body(_new_portal_key(portals, planted), issuer=123)

    response = await client.post(ISSUERS, json=body, headers=_admin(portals))

    problem = await _problem(response, 422, "validation-failed", canaries=(planted,))
    assert [error["loc"] for error in problem["errors"]] == [["issuer"]]


@pytest.mark.parametrize("body", [[], "text", 1, None, {}], ids=["array", "string", "number", "null", "empty-object"])
async def test_json_that_is_not_the_expected_object_is_a_422(client, portals: Portals, body) -> None:
    response = await client.post(
        ISSUERS, data=json.dumps(body), headers={**_admin(portals), "Content-Type": "application/json"}
    )
    await _problem(response, 422, "validation-failed")


async def test_issuer_with_a_control_character_is_a_422(client, portals: Portals) -> None:
    planted = canary("issuer")
    body = _key_body(_new_portal_key(portals, "k3"), issuer=planted + "\x00")

    response = await client.post(ISSUERS, json=body, headers=_admin(portals))

    problem = await _problem(response, 422, "validation-failed", canaries=(planted,))
    assert problem["errors"][0]["loc"] == ["issuer"]


@pytest.mark.parametrize("make_pem", INVALID_KEYS)
async def test_invalid_public_key_is_a_422(client, portals: Portals, make_pem) -> None:
    pem = make_pem()
    planted = canary("issuer")
    body = {"issuer": planted, "public_key_pem": pem, "kid": "k4"}

    response = await client.post(ISSUERS, json=body, headers=_admin(portals))

    await _problem(response, 422, "validation-failed", canaries=(planted, pem.strip()))


async def test_invalid_public_key_error_names_the_body_field(client, portals: Portals) -> None:
    body = {"issuer": portals.acme.issuer, "public_key_pem": "not a key", "kid": "k5"}

    response = await client.post(ISSUERS, json=body, headers=_admin(portals))

    problem = await _problem(response, 422, "validation-failed")
    assert [error["loc"] for error in problem["errors"]] == [["public_key_pem"]]


# --- who may, and what registering does -----------------------------------------------------------------


async def test_non_admin_gets_404_not_403_on_admin_routes(client, portals: Portals) -> None:
    patient = portals.acme.auth(role="patient", sub="Patient/1")
    body = _key_body(_new_portal_key(portals, "k6"))

    posted = await client.post(ISSUERS, json=body, headers=patient)
    listed = await client.get(ISSUERS, headers=patient)

    await _problem(posted, 404, "not-found")
    await _problem(listed, 404, "not-found")
    admin_view = await client.get(ISSUERS, headers=_admin(portals))
    assert [key["kid"] for key in (await admin_view.json())["items"]] == [portals.acme.kid]


async def test_admin_registers_a_key_whose_tokens_then_authenticate(client, portals: Portals) -> None:
    rotated = _new_portal_key(portals, "portal-key-2")
    assert (await client.get("/v1/me", headers=rotated.auth())).status == 401

    response = await client.post(ISSUERS, json=_endorsed_body(portals, rotated), headers=_admin(portals))

    assert response.status == 201, await response.text()
    assert await response.json() == {
        "issuer": rotated.issuer,
        "kid": "portal-key-2",
        "algorithm": "EdDSA",
        "revoked_at": None,
        "roles": ["patient", "proxy", "physician", "staff", "compliance", "admin"],
        "registered_by": "operator",
    }
    me = await client.get("/v1/me", headers=rotated.auth(role="physician", sub="Practitioner/5"))
    assert me.status == 200, await me.text()
    assert (await me.json())["subject"] == "Practitioner/5"
    listed = await (await client.get(ISSUERS, headers=_admin(portals))).json()
    assert {key["kid"] for key in listed["items"]} == {portals.acme.kid, "portal-key-2"}


async def test_key_registered_without_kid_is_named_by_its_fingerprint(client, portals: Portals) -> None:
    portal = _new_portal_key(portals, "unused")
    body = _endorsed_body(portals, portal)
    del body["kid"]

    response = await client.post(ISSUERS, json=body, headers=_admin(portals))

    assert response.status == 201, await response.text()
    kid = (await response.json())["kid"]
    assert kid not in {"", "unused", portals.acme.kid}
    portal.kid = kid
    assert (await client.get("/v1/me", headers=portal.auth())).status == 200


async def test_same_kid_with_another_key_is_a_409(client, portals: Portals) -> None:
    impostor = _new_portal_key(portals, portals.acme.kid)

    response = await client.post(ISSUERS, json=_endorsed_body(portals, impostor), headers=_admin(portals))

    await _problem(response, 409, "conflict")
    assert (await client.get("/v1/me", headers=impostor.auth())).status == 401
    assert (await client.get("/v1/me", headers=portals.acme.auth())).status == 200


async def test_registering_the_same_key_again_is_an_idempotent_201(client, portals: Portals) -> None:
    rotated = _new_portal_key(portals, "portal-key-2")

    first = await client.post(ISSUERS, json=_endorsed_body(portals, rotated), headers=_admin(portals))
    # Once the key is trusted, sending it again changes nothing: no endorsement is needed for that.
    again = await client.post(ISSUERS, json=_key_body(rotated), headers=_admin(portals))

    assert (first.status, again.status) == (201, 201)
    assert await first.json() == await again.json()
    listed = await (await client.get(ISSUERS, headers=_admin(portals))).json()
    assert [key["kid"] for key in listed["items"]].count("portal-key-2") == 1


# --- the router's own refusals -----------------------------------------------------------------------------


async def test_unknown_route_is_a_404_problem(client) -> None:
    response = await client.get("/v1/no-such-thing")
    await _problem(response, 404, "not-found")


async def test_wrong_method_is_a_405_problem_with_allow(client, portals: Portals) -> None:
    response = await client.delete("/v1/me", headers=portals.acme.auth())
    await _problem(response, 405, "method-not-allowed")
    assert response.headers["Allow"] == "GET"


# --- no request shape is a 500 ------------------------------------------------------------------------------

# 403: a key for an issuer an earlier example registered, without an endorsement by that issuer's key.
ACCEPTABLE = {201, 400, 403, 409, 413, 415, 422}

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
_known_oids = st.sampled_from(
    [
        bytes.fromhex("2b6570"),  # Ed25519
        bytes.fromhex("2b656e"),  # X25519
        bytes.fromhex("2a864886f70d010101"),  # rsaEncryption
        EC_PUBLIC_KEY_OID,
    ]
)
_pem_like = st.one_of(
    st.text(max_size=80),
    st.builds(
        _spki_pem,
        # Well-formed OIDs (arcs below 128 are one byte each): known key types and arbitrary ones.
        _known_oids | st.lists(st.integers(1, 127), min_size=2, max_size=6).map(bytes),
        st.just(b"") | st.lists(st.integers(1, 127), min_size=2, max_size=6).map(bytes),
        st.binary(min_size=1, max_size=80),
    ),
    st.binary(max_size=120).map(
        lambda raw: "-----BEGIN PUBLIC KEY-----\n" + base64.encodebytes(raw).decode() + "-----END PUBLIC KEY-----\n"
    ),
)
_issuer_shaped = st.fixed_dictionaries(
    {"issuer": st.text(max_size=40) | _json_values, "public_key_pem": _pem_like | _json_values},
    optional={"kid": st.text(max_size=20) | _json_values, "extra": _json_values},
).map(lambda body: json.dumps(body).encode())
_bodies = st.one_of(
    st.binary(max_size=2 * BODY_LIMIT),
    _json_values.map(lambda value: json.dumps(value).encode()),
    _issuer_shaped,
)
_content_types = st.sampled_from(
    ["application/json", "application/json", "application/json", "application/json; charset=utf-8", "text/plain"]
)


async def test_no_request_body_produces_a_server_error(client, portals: Portals) -> None:
    # Hypothesis drives synchronous test functions; the client lives on this test's event loop. So the
    # property runs in a worker thread (asyncio.to_thread) and hands each request to the loop with
    # run_coroutine_threadsafe, blocking only that thread: the loop stays free to serve the app. Unlike
    # collecting examples first, this keeps shrinking and the example database working. The property is not
    # a pytest test itself, so the function-scoped fixtures it closes over are created once, on purpose.
    loop = asyncio.get_running_loop()
    admin = _admin(portals)

    async def post(body: bytes, content_type: str) -> tuple[int, str]:
        response = await client.post(ISSUERS, data=body, headers={**admin, "Content-Type": content_type})
        return response.status, await response.text()

    @hypothesis_settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(body=_bodies, content_type=_content_types)
    def no_server_error(body: bytes, content_type: str) -> None:
        status, text = asyncio.run_coroutine_threadsafe(post(body, content_type), loop).result(timeout=30)
        assert status in ACCEPTABLE, text
        if status != 201:
            assert json.loads(text)["status"] == status

    await asyncio.to_thread(no_server_error)
