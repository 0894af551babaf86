"""Consent ledger events exported as FHIR R4 Consents: valid to a FHIR parser, deterministic, and saying
what the ledger says (who agreed, who recorded it, to whom, what, for how long, and what a revoke ends).

Validated with `fhir.resources`' R4B models: the package ships R5 (default), R4B and STU3 but no R4, and
R4B's Consent is R4's.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from fhir.resources.R4B.consent import Consent
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.fhir_consent import ConsentFields, to_fhir_consent

ORGANIZATION = "St Olaf Hospital"
CONSENT_ACTION = "http://terminology.hl7.org/CodeSystem/consentaction"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
LOINC = "http://loinc.org"
TRANSCRIBER = "http://hl7.org/fhir/StructureDefinition/consent-Transcriber"
WITNESS = "http://hl7.org/fhir/StructureDefinition/consent-Witness"
BEDSIDE_EVENT = "urn:bedside:extension:consent-event"
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"

RECORDED_AT = datetime(2025, 3, 4, 5, 6, 7, 890000, tzinfo=timezone(timedelta(hours=2)))
GRANT_ID = "0b6f3d1e-5c2a-4e8f-9a1b-7c3d2e1f0a9b"
MESSAGE = "Communication/6a0e2c4d-1f3b-4a5c-8d7e-9f0a1b2c3d4e"


def _consent(**fields: Any) -> ConsentFields:
    base: dict[str, Any] = {
        "id": GRANT_ID,
        "tenant": "st-olaf",
        "patient": "Patient/42",
        "grantee": "Practitioner/1",
        "scope": "messaging",
        "item": "",
        "purpose": None,
        "kind": "grant",
        "revokes": None,
        "valid_from": None,
        "valid_until": None,
        "include_sensitive": False,
        "evidence": {"method": "portal", "text_version": "2025-01"},
        "reason": None,
        "recorded_by": "Patient/42",
        "recorded_role": "patient",
        "recorded_at": RECORDED_AT,
        "version": 1,
        "hash": "5f" * 32,
        "status_now": "active",
    }
    return ConsentFields(**{**base, **fields})


PORTAL_MESSAGING = _consent()
PAPER_CARE_TEAM = _consent(
    id="1c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f",
    grantee="CareTeam/cardio",
    evidence={"method": "paper", "document_ref": "DocumentReference/scan-2025-0042"},
    recorded_by="Practitioner/clerk-7",
    recorded_role="staff",
)
PROXY_WITHOUT_SENSITIVE = _consent(
    id="2d3e4f5a-6b7c-4d8e-9f0a-1b2c3d4e5f6a",
    grantee="RelatedPerson/mum",
    scope="proxy",
    valid_from=datetime(2025, 3, 4, tzinfo=UTC),
    valid_until=datetime(2026, 3, 4, tzinfo=UTC),
    evidence={"method": "verbal", "witness": "Practitioner/nurse-3"},
    recorded_by="Practitioner/dr-who",
    recorded_role="physician",
)
PROXY_WITH_SENSITIVE = _consent(
    id="3e4f5a6b-7c8d-4e9f-0a1b-2c3d4e5f6a7b",
    grantee="RelatedPerson/mum",
    scope="proxy",
    valid_from=datetime(2025, 3, 4, 12, 30, tzinfo=timezone(timedelta(hours=-5))),
    valid_until=datetime(2025, 9, 4, tzinfo=UTC),
    include_sensitive=True,
)
DISCLOSURE = _consent(
    id="4f5a6b7c-8d9e-4f0a-1b2c-3d4e5f6a7b8c",
    grantee="Organization/insurer",
    scope="disclosure",
    item=MESSAGE,
    purpose="HPAYMT",
    evidence={"method": "paper", "document_ref": "scan 2025/0043"},
    recorded_by="Practitioner/clerk-7",
    recorded_role="staff",
)
PUBLIC_SHARE = _consent(
    id="5a6b7c8d-9e0f-4a1b-2c3d-4e5f6a7b8c9d",
    grantee="public",
    scope="public_share",
    item=MESSAGE,
)
REVOKE = _consent(
    id="6b7c8d9e-0f1a-4b2c-3d4e-5f6a7b8c9d0e",
    kind="revoke",
    revokes=GRANT_ID,
    reason="patient-request",
    evidence={"method": "portal", "text_version": "revocation"},
    recorded_by="RelatedPerson/mum",
    recorded_role="proxy",
    version=2,
    status_now="inactive",
)
EXPIRED = _consent(
    id="7c8d9e0f-1a2b-4c3d-4e5f-6a7b8c9d0e1f",
    grantee="RelatedPerson/dad",
    scope="proxy",
    valid_until=datetime(2025, 1, 1, tzinfo=UTC),
    status_now="inactive",
)
EXAMPLES = {
    "portal messaging grant": PORTAL_MESSAGING,
    "paper care team grant": PAPER_CARE_TEAM,
    "proxy without sensitive": PROXY_WITHOUT_SENSITIVE,
    "proxy with sensitive": PROXY_WITH_SENSITIVE,
    "disclosure": DISCLOSURE,
    "public share": PUBLIC_SHARE,
    "revoke": REVOKE,
    "expired": EXPIRED,
}


def _fhir(consent: ConsentFields) -> dict[str, Any]:
    return to_fhir_consent(consent, organization=ORGANIZATION)


def _codes(codings: list[dict[str, str]]) -> set[tuple[str, str]]:
    return {(coding["system"], coding["code"]) for coding in codings}


def _actions(provision: dict[str, Any]) -> list[str]:
    codes = []
    for action in provision["action"]:
        (coding,) = action["coding"]
        assert coding["system"] == CONSENT_ACTION
        codes.append(coding["code"])
    return codes


def _extension(resource: dict[str, Any], url: str) -> dict[str, Any]:
    extensions: list[dict[str, Any]] = [e for e in resource["extension"] if e["url"] == url]
    (extension,) = extensions
    return extension


def _event(resource: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["url"]: e for e in _extension(resource, BEDSIDE_EVENT)["extension"]}


def _identifiers(resource: dict[str, Any]) -> dict[str, str]:
    return {i["system"]: i["value"] for i in resource["identifier"]}


def _assert_plain_json(value: object) -> None:
    """Only what JSON holds: no None, no empty element (FHIR has none), no number, no other object."""
    if isinstance(value, dict):
        assert value
        for key, item in value.items():
            assert isinstance(key, str)
            _assert_plain_json(item)
    elif isinstance(value, list):
        assert value
        for item in value:
            _assert_plain_json(item)
    else:
        assert isinstance(value, str | bool), type(value)
        assert value != ""


@pytest.mark.parametrize("consent", EXAMPLES.values(), ids=EXAMPLES.keys())
def test_every_example_is_a_valid_r4_consent_that_round_trips(consent: ConsentFields) -> None:
    resource = _fhir(consent)

    model = Consent.model_validate(resource)

    assert json.loads(model.model_dump_json()) == resource
    _assert_plain_json(resource)


@pytest.mark.parametrize("consent", EXAMPLES.values(), ids=EXAMPLES.keys())
def test_the_same_event_always_maps_to_the_same_json(consent: ConsentFields) -> None:
    assert json.dumps(_fhir(consent)) == json.dumps(_fhir(replace(consent)))


@pytest.mark.parametrize("consent", EXAMPLES.values(), ids=EXAMPLES.keys())
def test_every_consent_is_a_privacy_consent_tied_to_its_ledger_event(consent: ConsentFields) -> None:
    resource = _fhir(consent)

    assert resource["id"] == consent.id
    assert resource["status"] == consent.status_now
    assert resource["scope"]["coding"][0]["code"] == "patient-privacy"
    assert (LOINC, "59284-0") in _codes(resource["category"][0]["coding"])
    assert resource["patient"] == {"reference": "Patient/42"}
    assert resource["dateTime"] == "2025-03-04T03:06:07.890000Z"
    assert resource["organization"] == [
        {
            "type": "Organization",
            "identifier": {"system": "urn:bedside:tenant", "value": "st-olaf"},
            "display": ORGANIZATION,
        }
    ]
    assert _identifiers(resource) == {
        "urn:ietf:rfc:3986": f"urn:uuid:{consent.id}",
        "urn:bedside:consent-hash": "5f" * 32,
        "urn:bedside:consent-version": str(consent.version),
    }
    assert _extension(resource, TRANSCRIBER)["valueReference"] == {"reference": consent.recorded_by}
    assert _event(resource)["recordedRole"]["valueCoding"]["code"] == consent.recorded_role


def test_patient_self_recorded_messaging_grant_permits_the_practitioner_to_access_and_use() -> None:
    resource = _fhir(PORTAL_MESSAGING)

    assert resource["performer"] == [{"reference": "Patient/42"}]
    assert resource["sourceReference"] == {
        "type": "DocumentReference",
        "identifier": {"system": "urn:bedside:consent-text-version", "value": "2025-01"},
    }
    assert resource["policyRule"]["coding"] == [{"system": ACT_CODE, "code": "OPTIN", "display": "opt-in"}]
    assert "verification" not in resource
    provision = resource["provision"]
    assert provision["type"] == "permit"
    assert "period" not in provision
    (actor,) = provision["actor"]
    assert actor["reference"] == {"reference": "Practitioner/1"}
    assert actor["role"]["coding"][0]["code"] == "IRCP"
    assert _actions(provision) == ["access", "use"]
    assert "data" not in provision
    assert "securityLabel" not in provision
    assert _event(resource)["evidenceMethod"]["valueCode"] == "portal"


def test_staff_recorded_paper_grant_is_the_patients_consent_transcribed_by_staff() -> None:
    resource = _fhir(PAPER_CARE_TEAM)

    assert resource["performer"] == [{"reference": "Patient/42"}]  # the patient agreed; the clerk typed it in
    assert _extension(resource, TRANSCRIBER)["valueReference"] == {"reference": "Practitioner/clerk-7"}
    assert resource["sourceReference"] == {"reference": "DocumentReference/scan-2025-0042"}
    (actor,) = resource["provision"]["actor"]
    assert actor["reference"] == {"reference": "CareTeam/cardio"}
    assert _event(resource)["recordedRole"]["valueCoding"] == {"system": "urn:bedside:role", "code": "staff"}


def test_verbal_proxy_grant_without_sensitive_content_is_witnessed_verified_and_capped_at_normal() -> None:
    resource = _fhir(PROXY_WITHOUT_SENSITIVE)

    assert resource["scope"]["coding"][0]["code"] == "patient-privacy"
    assert _extension(resource, WITNESS)["valueReference"] == {"reference": "Practitioner/nurse-3"}
    assert resource["verification"] == [
        {
            "verified": True,
            "verifiedWith": {"reference": "Patient/42"},
            "verificationDate": "2025-03-04T03:06:07.890000Z",
        }
    ]
    assert "sourceReference" not in resource
    assert resource["policyRule"]["coding"][0]["code"] == "OPTINR"
    provision = resource["provision"]
    assert provision["type"] == "permit"
    assert provision["period"] == {"start": "2025-03-04T00:00:00Z", "end": "2026-03-04T00:00:00Z"}
    (actor,) = provision["actor"]
    assert actor["reference"] == {"reference": "RelatedPerson/mum"}
    assert (actor["role"]["coding"][0]["system"], actor["role"]["coding"][0]["code"]) == (
        "http://terminology.hl7.org/CodeSystem/v3-RoleCode",
        "DELEGATEE",
    )
    assert _actions(provision) == ["access", "use"]
    # A confidentiality label is a high-water mark: N covers normal content, not R or V.
    assert provision["securityLabel"] == [{"system": CONFIDENTIALITY, "code": "N", "display": "normal"}]


def test_proxy_grant_with_sensitive_content_has_no_label_cap() -> None:
    resource = _fhir(PROXY_WITH_SENSITIVE)

    assert resource["policyRule"]["coding"][0]["code"] == "OPTIN"
    provision = resource["provision"]
    assert "securityLabel" not in provision
    assert provision["period"] == {"start": "2025-03-04T17:30:00Z", "end": "2025-09-04T00:00:00Z"}


def test_disclosure_to_an_organization_names_purpose_and_item() -> None:
    resource = _fhir(DISCLOSURE)

    assert (LOINC, "64292-6") in _codes([c for category in resource["category"] for c in category["coding"]])
    assert resource["sourceReference"] == {
        "type": "DocumentReference",
        "identifier": {"system": "urn:bedside:consent-form", "value": "scan 2025/0043"},
    }
    provision = resource["provision"]
    (actor,) = provision["actor"]
    assert actor["reference"] == {"reference": "Organization/insurer"}
    assert actor["role"]["coding"][0]["code"] == "IRCP"
    assert _actions(provision) == ["disclose"]
    assert provision["purpose"] == [
        {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
            "code": "HPAYMT",
            "display": "healthcare payment",
        }
    ]
    assert provision["data"] == [{"meaning": "instance", "reference": {"reference": MESSAGE}}]


def test_public_share_permits_disclosing_one_item_to_no_one_in_particular() -> None:
    resource = _fhir(PUBLIC_SHARE)

    assert len(resource["category"]) == 2
    provision = resource["provision"]
    assert provision["type"] == "permit"
    assert "actor" not in provision
    assert _actions(provision) == ["disclose"]
    assert provision["data"] == [{"meaning": "instance", "reference": {"reference": MESSAGE}}]


def test_revoke_is_a_deny_that_names_the_consent_it_ends_and_why() -> None:
    resource = _fhir(REVOKE)

    assert resource["status"] == "inactive"
    assert resource["performer"] == [{"reference": "RelatedPerson/mum"}]  # the proxy, for the patient
    assert resource["policyRule"]["coding"] == [{"system": ACT_CODE, "code": "OPTOUT"}]
    provision = resource["provision"]
    assert provision["type"] == "deny"
    (actor,) = provision["actor"]
    assert actor["reference"] == {"reference": "Practitioner/1"}
    assert _actions(provision) == ["access", "use"]
    event = _event(resource)
    assert event["revokes"]["valueReference"] == {"reference": f"Consent/{GRANT_ID}"}
    assert event["reason"]["valueCoding"] == {"system": "urn:bedside:consent-revoke-reason", "code": "patient-request"}
    assert _identifiers(resource)["urn:bedside:consent-version"] == "2"
    assert "revokes" not in _event(_fhir(PORTAL_MESSAGING))


def test_expired_grant_keeps_its_window_and_is_inactive() -> None:
    resource = _fhir(EXPIRED)

    assert resource["status"] == "inactive"
    assert resource["provision"]["type"] == "permit"
    assert resource["provision"]["period"] == {"end": "2025-01-01T00:00:00Z"}


def test_organization_given_as_a_reference_is_linked() -> None:
    resource = to_fhir_consent(PORTAL_MESSAGING, organization="Organization/st-olaf")

    assert resource["organization"] == [
        {"reference": "Organization/st-olaf", "identifier": {"system": "urn:bedside:tenant", "value": "st-olaf"}}
    ]
    Consent.model_validate(resource)


def test_recorders_and_items_r4_cannot_point_at_become_identifiers() -> None:
    resource = _fhir(
        replace(DISCLOSURE, recorded_by="PractitionerRole/front-desk", item="Thread/t-3", status_now="active")
    )

    assert _extension(resource, TRANSCRIBER)["valueReference"] == {
        "identifier": {"value": "PractitionerRole/front-desk"}
    }
    (data,) = resource["provision"]["data"]
    assert data["reference"]["identifier"]["value"] == "t-3"
    Consent.model_validate(resource)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", "not-a-uuid"),
        ("tenant", "St Olaf"),
        ("patient", "Practitioner/1"),
        ("grantee", "public"),  # only public_share is public
        ("scope", "everything"),
        ("item", "free text"),
        ("kind", "maybe"),
        ("revokes", GRANT_ID),  # a grant revokes nothing
        ("valid_from", datetime(2025, 1, 1, 12, 0)),  # naive
        ("valid_until", datetime(2000, 1, 1, tzinfo=UTC)),  # before valid_from
        ("evidence", {"method": "telepathy"}),
        ("evidence", {"method": "portal", "note": "free text"}),
        ("recorded_role", "janitor"),
        ("recorded_at", datetime(2025, 1, 1, 12, 0)),
        ("version", 0),
        ("version", True),
        ("hash", "XYZ"),
        ("status_now", "revoked"),
    ],
)
def test_fields_of_the_wrong_shape_are_refused_without_quoting_them(field: str, value: object) -> None:
    extra: dict[str, Any] = {"valid_from": datetime(2024, 1, 1, tzinfo=UTC)} if field == "valid_until" else {}
    with pytest.raises(ValueError, match=field) as raised:
        _consent(**{field: value, **extra})

    assert repr(value) not in str(raised.value)


def test_public_share_must_name_the_public_and_a_revoke_its_grant() -> None:
    with pytest.raises(ValueError, match="grantee"):
        _consent(scope="public_share", grantee="Practitioner/1", item=MESSAGE)
    with pytest.raises(ValueError, match="revokes"):
        _consent(kind="revoke")


def test_organization_must_be_a_name() -> None:
    with pytest.raises(ValueError, match="organization"):
        to_fhir_consent(PORTAL_MESSAGING, organization="")


# Arbitrary valid consent events, shaped as the ledger allows and sometimes beyond what its domain checks.
_id_part = st.from_regex(r"\A[A-Za-z0-9\-.]{1,20}\Z")
_GRANTEE_TYPES = {
    "messaging": ["Practitioner", "CareTeam"],
    "proxy": ["RelatedPerson", "Patient"],
    "disclosure": ["Organization", "Practitioner", "RelatedPerson"],
}
_text = st.from_regex(r"\A[ -~]{0,30}[!-~]\Z")
_moments = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1), timezones=st.timezones() | st.just(UTC)
)


def _reference(types: list[str]) -> st.SearchStrategy[str]:
    return st.builds("{}/{}".format, st.sampled_from(types), _id_part)


@st.composite
def _evidence(draw: st.DrawFn) -> dict[str, str]:
    evidence = {"method": draw(st.sampled_from(["portal", "paper", "verbal"]))}
    if draw(st.booleans()):
        evidence["text_version"] = draw(_text)
    if draw(st.booleans()):
        evidence["document_ref"] = draw(_text | _reference(["DocumentReference", "Binary"]))
    if draw(st.booleans()):
        evidence["witness"] = draw(_reference(["Practitioner", "PractitionerRole"]))
    return evidence


@st.composite
def _consents(draw: st.DrawFn) -> ConsentFields:
    scope = draw(st.sampled_from(["messaging", "proxy", "disclosure", "public_share"]))
    kind = draw(st.sampled_from(["grant", "revoke"]))
    valid_from = draw(st.none() | _moments)
    valid_until = draw(st.none() | _moments)
    if valid_from is not None and valid_until is not None and valid_until <= valid_from:
        valid_until = None
    return ConsentFields(
        id=str(draw(st.uuids())),
        tenant=draw(st.from_regex(r"\A[a-z][a-z0-9\-]{1,20}\Z")),
        patient=draw(_reference(["Patient"])),
        grantee="public" if scope == "public_share" else draw(_reference(_GRANTEE_TYPES[scope])),
        scope=scope,
        item=draw(st.just("") | _reference(["Communication", "DocumentReference", "Thread"])),
        purpose=draw(st.none() | st.sampled_from(["TREAT", "HPAYMT", "PUBHLTH"]) | st.from_regex(r"\A[A-Z]{2,8}\Z")),
        kind=kind,
        revokes=str(draw(st.uuids())) if kind == "revoke" else None,
        valid_from=valid_from,
        valid_until=valid_until,
        include_sensitive=draw(st.booleans()),
        evidence=draw(_evidence()),
        reason=draw(st.none() | st.sampled_from(["patient-request", "care-ended", "proxy-ended", "other"])),
        recorded_by=draw(_reference(["Patient", "RelatedPerson", "Practitioner", "PractitionerRole", "Device"])),
        recorded_role=draw(st.sampled_from(["patient", "proxy", "physician", "staff", "compliance", "admin"])),
        recorded_at=draw(_moments),
        version=draw(st.integers(min_value=1, max_value=2**63)),
        hash=draw(st.binary(min_size=32, max_size=32)).hex(),
        status_now=draw(st.sampled_from(["draft", "proposed", "active", "rejected", "inactive", "entered-in-error"])),
    )


@settings(max_examples=200, deadline=None)
@given(_consents())
def test_any_valid_event_maps_to_a_valid_consent_of_plain_json(consent: ConsentFields) -> None:
    resource = _fhir(consent)

    _assert_plain_json(resource)
    json.dumps(resource, ensure_ascii=False, allow_nan=False).encode()  # UTF-8 all the way
    model = Consent.model_validate(resource)
    assert json.loads(model.model_dump_json()) == resource
    assert json.dumps(_fhir(consent)) == json.dumps(resource)
    assert resource["provision"]["type"] == ("permit" if consent.kind == "grant" else "deny")
    assert ("actor" in resource["provision"]) == (consent.scope != "public_share")
