"""The authentication matrix: every way a bearer token can be unacceptable is a 401 that says nothing more.

Each refused case is one row of `REFUSED`: a builder that turns the two trusted portals into the
`Authorization` header a caller sends (None: no header at all). The tokens are real (signed by the portals'
real keys) unless the case is about a token nobody trusted could have made.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from structlog.testing import capture_logs

from service.app import create_app
from service.settings import Settings
from tests.conftest import Portals, Services
from tests.support import AUDIENCE, TestIssuer

LEEWAY = 60
REQUIRED_CLAIMS = ("iss", "sub", "aud", "exp", "iat", "tid", "role")

HeaderBuilder = Callable[[Portals], str | None]


def _b64(data: bytes | dict[str, Any]) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _bearer(token: str) -> str:
    return f"Bearer {token}"


def _token(**overrides: Any) -> HeaderBuilder:
    """A token of acme's portal, signed with its real key, with these claims changed (None removes one)."""

    def build(portals: Portals) -> str:
        return _bearer(portals.acme.token(**overrides))

    return build


def _now() -> int:
    return int(time.time())


def _unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return f"{_b64(header)}.{_b64(claims)}.{_b64(signature) if signature else ''}"


def _alg_none(portals: Portals) -> str:
    claims = portals.acme.claims(role="admin", sub="Practitioner/admin1")
    return _bearer(_unsigned({"alg": "none", "typ": "JWT"}, claims))


def _hs256_keyed_with_public_pem(portals: Portals) -> str:
    # Algorithm confusion: the portal's public key is public, so anyone can compute this HMAC.
    # PyJWT refuses to build such a token, which is why it is built by hand.
    header = {"alg": "HS256", "typ": "JWT", "kid": portals.acme.kid}
    signing_input = f"{_b64(header)}.{_b64(portals.acme.claims(role='admin', sub='Practitioner/admin1'))}"
    mac = hmac.new(portals.acme.public_pem, signing_input.encode(), hashlib.sha256).digest()
    return _bearer(f"{signing_input}.{_b64(mac)}")


def _tampered_payload(portals: Portals) -> str:
    header, _, signature = portals.acme.token(role="patient", sub="Patient/1").split(".")
    forged = _b64(portals.acme.claims(role="admin", sub="Practitioner/admin1"))
    return _bearer(f"{header}.{forged}.{signature}")


def _signed_by_another_key(portals: Portals) -> str:
    impostor = TestIssuer(tenant="acme", issuer=portals.acme.issuer, kid=portals.acme.kid)
    return _bearer(impostor.token())


def _another_algorithm_in_header(portals: Portals) -> str:
    # An allowed algorithm, but not the one the registered key fixes.
    _header, payload, signature = portals.acme.token().split(".")
    return _bearer(f"{_b64({'alg': 'ES256', 'typ': 'JWT', 'kid': portals.acme.kid})}.{payload}.{signature}")


def _acme_issuer_claiming_globex(portals: Portals) -> str:
    return _bearer(portals.acme.token(tid="globex"))


def _globex_issuer_claiming_acme(portals: Portals) -> str:
    return _bearer(portals.globex.token(tid="acme"))


def _acme_key_posing_as_globex_issuer(portals: Portals) -> str:
    # Both portals use the kid "portal-key-1": only the signature tells them apart.
    return _bearer(portals.acme.token(tid="globex", iss=portals.globex.issuer))


def _raw(value: str | None) -> HeaderBuilder:
    return lambda _portals: value


def _junk_token_for(**claims_overrides: str) -> HeaderBuilder:
    """An unsigned token whose claims reach the issuer lookup (the signature is checked only after it)."""

    def build(portals: Portals) -> str:
        claims = portals.acme.claims(**claims_overrides)
        return _bearer(_unsigned({"alg": "EdDSA", "kid": portals.acme.kid}, claims, b"x" * 64))

    return build


# (how the Authorization header is built, the reason code the refusal is logged with; None: not pinned down,
# the case is about not failing with a 500).
REFUSED: list[Any] = [
    pytest.param(_raw(None), "missing", id="missing-header"),
    pytest.param(_raw("Basic dXNlcjpwYXNzd29yZA=="), "malformed", id="basic-scheme"),
    pytest.param(_raw("Token abc.def.ghi"), "malformed", id="unknown-scheme"),
    pytest.param(_raw("Bearer"), "malformed", id="bearer-without-token"),
    pytest.param(_raw("Bearer garbage"), "malformed", id="malformed-garbage"),
    pytest.param(_raw("Bearer abc.def"), "malformed", id="malformed-two-segments"),
    pytest.param(_raw("Bearer a.b.c"), "malformed", id="malformed-bad-base64"),
    pytest.param(
        _raw("Bearer " + _b64(b"\xff\xfe") + "." + _b64(b"{}") + ".c2ln"), "malformed", id="malformed-header-not-json"
    ),
    # Near aiohttp's 8190-byte header line limit: longer lines never reach the application.
    pytest.param(_raw("Bearer " + "A" * 8000), "malformed", id="malformed-long-garbage"),
    pytest.param(lambda p: _bearer(p.acme.token(iat=_now() - 400, exp=_now() - LEEWAY - 30)), "expired", id="expired"),
    pytest.param(
        lambda p: _bearer(p.acme.token(nbf=_now() + LEEWAY + 60, exp=_now() + 600)),
        "not-yet-valid",
        id="not-yet-valid-nbf",
    ),
    pytest.param(
        lambda p: _bearer(p.acme.token(iat=_now() + LEEWAY + 60, exp=_now() + 600)),
        "not-yet-valid",
        id="not-yet-valid-iat",
    ),
    pytest.param(_token(aud="another-service"), "wrong-audience", id="wrong-audience"),
    pytest.param(_token(aud=[]), "missing-claim", id="empty-audience-list"),
    pytest.param(_token(iss="https://portal.unknown.test"), "unknown-issuer", id="unknown-issuer"),
    pytest.param(_acme_issuer_claiming_globex, "unknown-issuer", id="acme-issuer-claims-tenant-globex"),
    pytest.param(_globex_issuer_claiming_acme, "unknown-issuer", id="globex-issuer-claims-tenant-acme"),
    pytest.param(_acme_key_posing_as_globex_issuer, "bad-signature", id="acme-key-signs-as-globex-issuer"),
    pytest.param(_token(tid="initech"), "unknown-issuer", id="unknown-tenant"),
    pytest.param(_alg_none, "algorithm-not-allowed", id="alg-none"),
    pytest.param(_hs256_keyed_with_public_pem, "algorithm-not-allowed", id="hs256-keyed-with-public-pem"),
    pytest.param(_another_algorithm_in_header, "unknown-key", id="another-allowed-algorithm-in-header"),
    pytest.param(_tampered_payload, "bad-signature", id="tampered-payload"),
    pytest.param(_signed_by_another_key, "bad-signature", id="signature-by-another-key"),
    pytest.param(lambda p: _bearer(p.acme.token(headers={"kid": "no-such-kid"})), "unknown-key", id="unknown-kid"),
    pytest.param(_token(role="superuser"), "unknown-role", id="unknown-role"),
    # A token made for something else is never a login, however complete: a key endorsement, say.
    pytest.param(_token(purpose="issuer-key-endorsement"), "unexpected-purpose", id="login-token-with-a-purpose"),
    pytest.param(_token(purpose=""), "unexpected-purpose", id="login-token-with-an-empty-purpose"),
    pytest.param(
        lambda p: _bearer(p.acme.endorse(TestIssuer(tenant="acme", issuer=p.acme.issuer))),
        "missing-claim",
        id="key-endorsement",
    ),
    pytest.param(_token(role=["admin"]), "unknown-role", id="role-not-a-string"),
    *[pytest.param(_token(**{claim: None}), "missing-claim", id=f"missing-{claim}") for claim in REQUIRED_CLAIMS],
    pytest.param(_token(iat=_now(), exp=_now() + 3600 + 600), "lifetime-too-long", id="lifetime-over-one-hour"),
    pytest.param(
        lambda p: _bearer(p.acme.token(iat=(now := _now()), exp=now + 3601)),
        "lifetime-too-long",
        id="lifetime-one-second-over-one-hour",
    ),
    pytest.param(_token(role="proxy", sub="RelatedPerson/9"), "invalid-act-for", id="proxy-without-act-for"),
    pytest.param(
        _token(role="proxy", sub="RelatedPerson/9", act_for="Practitioner/1"),
        "invalid-act-for",
        id="proxy-for-non-patient",
    ),
    pytest.param(
        _token(role="patient", sub="Patient/1", act_for="Patient/2"), "invalid-act-for", id="patient-with-act-for"
    ),
    pytest.param(_token(role="patient", sub="alice"), "invalid-subject", id="subject-not-a-reference"),
    pytest.param(_token(role="patient", sub="Practitioner/1"), "invalid-subject", id="patient-subject-of-wrong-type"),
    pytest.param(_token(role="physician", sub="Patient/1"), "invalid-subject", id="physician-subject-of-wrong-type"),
    pytest.param(_token(role="patient", sub=123), "invalid-claims", id="subject-not-a-string"),
    pytest.param(_junk_token_for(tid="acme\x00"), None, id="tenant-with-nul-character"),
    pytest.param(_junk_token_for(tid="\ud800"), None, id="tenant-with-lone-surrogate"),
    pytest.param(_junk_token_for(iss="https://portal.acme.test\x00"), None, id="issuer-with-nul-character"),
    pytest.param(_junk_token_for(iss="\udfff"), None, id="issuer-with-lone-surrogate"),
]


def _expected_challenge(authorization: str | None) -> str:
    challenge = 'Bearer realm="bedside"'
    return challenge if authorization is None else challenge + ', error="invalid_token"'


@pytest.mark.parametrize(("build", "reason"), REFUSED)
async def test_unacceptable_credentials_are_refused_with_a_bare_401(client, portals: Portals, build, reason) -> None:
    authorization = build(portals)
    headers = {} if authorization is None else {"Authorization": authorization}

    with capture_logs() as events:
        response = await client.get("/v1/me", headers=headers)
        text = await response.text()

    assert response.status == 401, text
    assert response.content_type == "application/problem+json"
    assert response.headers["WWW-Authenticate"] == _expected_challenge(authorization)
    problem = json.loads(text)
    assert problem["code"] == "unauthenticated"
    assert problem["type"] == "urn:bedside:problem:unauthenticated"
    assert problem["status"] == 401
    if authorization is not None:
        token = authorization.partition(" ")[2]
        # Neither the token nor any segment of it long enough to be recognisable is echoed.
        for part in {token, *token.split(".")}:
            assert len(part) < 8 or part not in text
    # The refusal is for the reason the case is about, not an accident of how the token was built.
    denied = [event["reason"] for event in events if event["event"] == "auth.denied"]
    assert len(denied) == 1, events
    if reason is not None:
        assert denied == [reason]


def test_every_required_claim_has_a_missing_case() -> None:
    ids = {param.id for param in REFUSED}
    assert {f"missing-{claim}" for claim in REQUIRED_CLAIMS} <= ids


async def _me(client, authorization: str) -> tuple[int, dict[str, Any]]:
    response = await client.get("/v1/me", headers={"Authorization": authorization})
    return response.status, await response.json()


async def test_token_expired_within_the_leeway_is_still_accepted(client, portals: Portals) -> None:
    now = _now()
    status, body = await _me(client, _bearer(portals.acme.token(iat=now - 600, exp=now - 30)))
    assert status == 200, body
    assert body["subject"] == "Patient/1"


async def test_token_issued_slightly_in_the_future_is_accepted(client, portals: Portals) -> None:
    now = _now()
    status, body = await _me(client, _bearer(portals.acme.token(iat=now + 20, nbf=now + 20, exp=now + 600)))
    assert status == 200, body


async def test_lifetime_of_exactly_one_hour_is_accepted(client, portals: Portals) -> None:
    now = _now()
    status, body = await _me(client, _bearer(portals.acme.token(iat=now, exp=now + 3600)))
    assert status == 200, body


@pytest.mark.parametrize("role", ["staff", "compliance", "admin"])
async def test_roles_without_a_subject_type_accept_any_fhir_reference(client, portals: Portals, role) -> None:
    status, body = await _me(client, _bearer(portals.acme.token(role=role, sub="CareTeam/x-1")))
    assert status == 200, body
    assert body["role"] == role


async def test_each_tenant_is_authenticated_by_its_own_issuer(client, portals: Portals) -> None:
    for portal in (portals.acme, portals.globex):
        status, body = await _me(client, _bearer(portal.token()))
        assert status == 200, body
        assert (body["tenant"], body["issuer"]) == (portal.tenant, portal.issuer)


def _second_key(portal: TestIssuer, kid: str) -> TestIssuer:
    return TestIssuer(
        tenant=portal.tenant, issuer=portal.issuer, kid=kid, private_key=ed25519.Ed25519PrivateKey.generate()
    )


async def test_rotated_key_under_another_kid_works_alongside_the_first(
    client, portals: Portals, services: Services
) -> None:
    rotated = _second_key(portals.acme, "portal-key-2")
    await services.issuers.add_key("acme", rotated.issuer, rotated.public_pem, kid=rotated.kid)

    for portal in (portals.acme, rotated):
        status, body = await _me(client, _bearer(portal.token()))
        assert status == 200, (portal.kid, body)


def _without_kid(portal: TestIssuer) -> str:
    return jwt.encode(portal.claims(), portal.private_key, algorithm=portal.algorithm)


async def test_token_without_kid_is_checked_against_every_key_of_the_issuer(
    client, portals: Portals, services: Services
) -> None:
    rotated = _second_key(portals.acme, "portal-key-2")
    await services.issuers.add_key("acme", rotated.issuer, rotated.public_pem, kid=rotated.kid)

    for portal in (portals.acme, rotated):
        token = _without_kid(portal)
        assert "kid" not in jwt.get_unverified_header(token)
        status, body = await _me(client, _bearer(token))
        assert status == 200, (portal.kid, body)


async def test_token_without_kid_signed_by_an_unregistered_key_is_refused(client, portals: Portals) -> None:
    stranger = _second_key(portals.acme, "unused")
    response = await client.get("/v1/me", headers={"Authorization": _bearer(_without_kid(stranger))})
    assert response.status == 401


async def test_the_audience_is_the_configured_one(client, portals: Portals) -> None:
    status, body = await _me(client, _bearer(portals.acme.token(aud=[AUDIENCE, "another-service"])))
    assert status == 200, body


async def test_the_configured_audience_and_skew_govern_bearer_tokens(
    settings: Settings, aiohttp_client: Any, portals: Portals
) -> None:
    # One checker serves the authenticator and the issuer service; both take the deployment's settings.
    client = await aiohttp_client(
        create_app(settings.model_copy(update={"audience": "ehr-messaging", "jwt_leeway_seconds": 0}))
    )
    now = _now()
    status, body = await _me(client, _bearer(portals.acme.token(aud="ehr-messaging")))
    assert status == 200, body
    assert (await _me(client, _bearer(portals.acme.token(aud=AUDIENCE))))[0] == 401
    # Expired two seconds ago: inside the default minute of skew, outside none.
    assert (await _me(client, _bearer(portals.acme.token(aud="ehr-messaging", iat=now - 600, exp=now - 2))))[0] == 401
    # Issued ten seconds ahead: refused with no skew allowed.
    late = portals.acme.token(aud="ehr-messaging", iat=now + 10, exp=now + 600)
    assert (await _me(client, _bearer(late)))[0] == 401
