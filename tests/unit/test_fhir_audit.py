"""Audit events exported as FHIR R4 AuditEvents: valid to a FHIR parser, shaped after IHE BALP, deterministic.

Validated with `fhir.resources`' R4B models: the package ships R5 (default), R4B and STU3 but no R4, and
R4B's AuditEvent is R4's.
"""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.fhir_audit import AuditEventFields, to_fhir_audit_event

OBSERVER = "bedside.example/audit"
DICOM = "http://dicom.nema.org/resources/ontology/DCM"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
AUDIT_ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
ON_BEHALF_OF = "http://hl7.org/fhir/StructureDefinition/auditevent-OnBehalfOf"


def _event(**fields: Any) -> AuditEventFields:
    base: dict[str, Any] = {
        "seq": 41,
        "leaf_hash": "5f" * 32,
        "event_id": "3f1c2d9e-0b6a-4c1e-9a7e-2f4b8c1d5e6a",
        "occurred_at": datetime(2025, 3, 4, 5, 6, 7, 890000, tzinfo=timezone(timedelta(hours=2))),
        "tenant": "st-olaf",
        "action": "message:read",
        "outcome": "success",
    }
    return AuditEventFields(**{**base, **fields})


PHYSICIAN_READ = _event(
    actor="Practitioner/1",
    actor_role="physician",
    issuer="https://idp.st-olaf.example/realms/staff",
    patient="Patient/42",
    resource_type="Communication",
    resource_id="m-9",
    purpose="TREAT",
    request_id="req-0001",
    source="203.0.113.9",
)
AUTH_DENIED = _event(action="auth:denied", outcome="denied", source="2001:db8::7", details={"reason": "token_expired"})
PROXY_READ = _event(
    action="thread:read",
    actor="RelatedPerson/mum",
    actor_role="proxy",
    issuer="https://idp.example",
    act_for="Patient/kid",
    resource_type="Thread",
    resource_id="t-3",
    source="198.51.100.4",
)
KEY_SHRED = _event(
    action="key:shred",
    actor="Practitioner/root",
    actor_role="admin",
    issuer="https://idp.example",
    patient="Patient/42",
    resource_type="PatientKey",
    resource_id="k-42-3",
    purpose="HOPERAT",
)
AUDIT_QUERY = _event(
    action="audit:query",
    actor="Practitioner/c1",
    actor_role="compliance",
    issuer="https://idp.example",
    resource_type="AuditLog",
    purpose="HOPERAT",
    request_id="req-0002",
    source="192.0.2.1",
    details={"query": "by_patient", "count": 12, "truncated": False, "actions": ["message:read", "key:rotate"]},
)
FUTURE_ACTION = _event(action="widget:frob", actor="Practitioner/1", actor_role="staff", details={"widget": "w-1"})
FAILURE = _event(
    action="message:send",
    outcome="failure",
    actor="Patient/42",
    actor_role="patient",
    patient="Patient/42",
    resource_type="Communication",
    details={"reason": "storage_unavailable"},
)
EXAMPLES = {
    "physician read": PHYSICIAN_READ,
    "auth denied": AUTH_DENIED,
    "proxy read": PROXY_READ,
    "key shred": KEY_SHRED,
    "audit query": AUDIT_QUERY,
    "future action": FUTURE_ACTION,
    "failure": FAILURE,
}


def _fhir(event: AuditEventFields) -> dict[str, Any]:
    return to_fhir_audit_event(event, observer=OBSERVER)


def _codes(codings: list[dict[str, str]]) -> set[tuple[str, str]]:
    return {(coding["system"], coding["code"]) for coding in codings}


def _requestor(resource: dict[str, Any]) -> dict[str, Any]:
    agents: list[dict[str, Any]] = [agent for agent in resource["agent"] if agent["requestor"]]
    (user,) = agents
    return user


def _agent_of_type(resource: dict[str, Any], system: str, code: str) -> dict[str, Any]:
    agents: list[dict[str, Any]] = [
        agent for agent in resource["agent"] if (system, code) in _codes(agent["type"]["coding"])
    ]
    (agent,) = agents
    return agent


def _entities_with_role(resource: dict[str, Any], code: str) -> list[dict[str, Any]]:
    return [entity for entity in resource["entity"] if entity.get("role", {}).get("code") == code]


def _log_details(resource: dict[str, Any]) -> dict[str, dict[str, str]]:
    (entry,) = [entity for entity in resource["entity"] if entity["type"]["code"] == "log-entry"]
    return {detail["type"]: detail for detail in entry["detail"]}


def _assert_plain_json(value: object) -> None:
    """Only what JSON holds: no None, no empty element (FHIR has none), no float, no other object."""
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


@pytest.mark.parametrize("event", EXAMPLES.values(), ids=EXAMPLES.keys())
def test_every_example_is_a_valid_r4_audit_event_that_round_trips(event: AuditEventFields) -> None:
    resource = _fhir(event)

    model = AuditEvent.model_validate(resource)

    assert json.loads(model.model_dump_json()) == resource
    _assert_plain_json(resource)


@pytest.mark.parametrize("event", EXAMPLES.values(), ids=EXAMPLES.keys())
def test_the_same_event_always_maps_to_the_same_json(event: AuditEventFields) -> None:
    assert json.dumps(_fhir(event)) == json.dumps(_fhir(replace(event)))


def test_physician_read_with_patient_follows_balp_patient_read() -> None:
    resource = _fhir(PHYSICIAN_READ)

    assert resource["id"] == PHYSICIAN_READ.event_id
    assert resource["type"]["code"] == "rest"
    assert ("http://hl7.org/fhir/restful-interaction", "read") in _codes(resource["subtype"])
    assert ("urn:bedside:audit-action", "message:read") in _codes(resource["subtype"])
    assert (resource["action"], resource["outcome"]) == ("R", "0")
    assert resource["recorded"] == "2025-03-04T03:06:07.890000Z"
    assert resource["purposeOfEvent"][0]["coding"][0]["code"] == "TREAT"
    user = _requestor(resource)
    assert user["who"] == {"reference": "Practitioner/1"}
    assert ("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "IRCP") in _codes(user["type"]["coding"])
    assert "network" not in user  # BALP: users are not network devices
    # For a read the data flows from the server: the client is the Destination, the server the Source.
    client = _agent_of_type(resource, DICOM, "110152")
    assert client["network"] == {"address": "203.0.113.9", "type": "2"}
    assert _agent_of_type(resource, DICOM, "110153")["who"] == {"display": OBSERVER}
    issuer = _agent_of_type(resource, "http://terminology.hl7.org/CodeSystem/extra-security-role-type", "authserver")
    assert (issuer["who"]["identifier"]["value"], issuer["requestor"]) == (PHYSICIAN_READ.issuer, False)
    (patient,) = _entities_with_role(resource, "1")
    assert patient["what"] == {"reference": "Patient/42"}
    assert (patient["type"]["system"], patient["type"]["code"]) == (AUDIT_ENTITY_TYPE, "1")
    (data,) = _entities_with_role(resource, "4")
    assert data["what"] == {"reference": "Communication/m-9"}
    assert resource["source"]["site"] == "st-olaf"
    assert resource["source"]["type"][0]["code"] == "4"


def test_denied_authentication_has_no_requestor_and_a_reason_code() -> None:
    resource = _fhir(AUTH_DENIED)

    assert (resource["type"]["system"], resource["type"]["code"]) == (DICOM, "110114")
    assert (resource["action"], resource["outcome"], resource["outcomeDesc"]) == ("E", "4", "token_expired")
    assert not any(agent["requestor"] for agent in resource["agent"])
    assert _agent_of_type(resource, DICOM, "110153")["network"] == {"address": "2001:db8::7", "type": "2"}
    assert "purposeOfEvent" not in resource
    assert not _entities_with_role(resource, "1")


def test_proxy_is_recorded_as_acting_on_behalf_of_the_patient() -> None:
    resource = _fhir(PROXY_READ)

    user = _requestor(resource)
    assert user["extension"] == [{"url": ON_BEHALF_OF, "valueReference": {"reference": "Patient/kid"}}]
    assert ("http://terminology.hl7.org/CodeSystem/v3-RoleClass", "AGNT") in _codes(user["role"][0]["coding"])
    (patient,) = _entities_with_role(resource, "1")
    assert patient["what"] == {"reference": "Patient/kid"}
    (data,) = _entities_with_role(resource, "4")
    assert data["what"]["identifier"]["value"] == "t-3"  # a Bedside thread is no FHIR resource


def test_the_users_token_id_is_the_balp_jti_policy_a_valid_uri_whatever_it_holds() -> None:
    resource = _fhir(replace(PHYSICIAN_READ, token_id="a b/ü:1"))

    AuditEvent.model_validate(resource)
    assert _requestor(resource)["policy"] == ["urn:ietf:params:oauth:jti:a%20b/%C3%BC:1"]
    assert "policy" not in _requestor(_fhir(PHYSICIAN_READ))


def test_the_key_that_verified_the_token_is_an_extension_of_the_issuers_agent() -> None:
    resource = _fhir(replace(PHYSICIAN_READ, key_id="portal-key-2"))

    AuditEvent.model_validate(resource)
    issuer = _agent_of_type(resource, "http://terminology.hl7.org/CodeSystem/extra-security-role-type", "authserver")
    assert issuer["extension"] == [{"url": "urn:bedside:signing-key", "valueString": "portal-key-2"}]
    assert issuer["who"] == {"identifier": {"value": PHYSICIAN_READ.issuer}}
    unnamed = _fhir(PHYSICIAN_READ)
    assert "extension" not in _agent_of_type(
        unnamed, "http://terminology.hl7.org/CodeSystem/extra-security-role-type", "authserver"
    )


def test_key_shred_is_a_security_alert_that_deletes() -> None:
    resource = _fhir(KEY_SHRED)

    assert (resource["type"]["system"], resource["type"]["code"]) == (DICOM, "110113")
    assert (DICOM, "110129") in _codes(resource["subtype"])
    assert resource["action"] == "D"
    assert ("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "AUT") in _codes(
        _requestor(resource)["type"]["coding"]
    )
    assert resource["purposeOfEvent"][0]["coding"][0]["code"] == "HOPERAT"


def test_audit_query_is_a_search_whose_details_are_strings() -> None:
    resource = _fhir(AUDIT_QUERY)

    assert resource["action"] == "E"  # BALP Query: searches are Execute
    assert ("http://hl7.org/fhir/restful-interaction", "search-type") in _codes(resource["subtype"])
    (query,) = _entities_with_role(resource, "24")
    assert query["what"]["identifier"]["type"]["coding"][0]["code"] == "AuditLog"
    # For anything but a read the client is the Source Role ID.
    assert _agent_of_type(resource, DICOM, "110153")["network"]["address"] == "192.0.2.1"
    details = _log_details(resource)
    assert details["count"] == {"type": "count", "valueString": "12"}
    assert details["truncated"] == {"type": "truncated", "valueString": "false"}
    assert json.loads(details["actions"]["valueString"]) == ["message:read", "key:rotate"]
    assert details["query"]["valueString"] == "by_patient"
    assert "outcomeDesc" not in resource


def test_log_entry_entity_ties_the_export_back_to_the_merkle_leaf() -> None:
    details = _log_details(_fhir(PHYSICIAN_READ))

    assert details["bedside-seq"]["valueString"] == "41"
    assert details["bedside-leaf-hash"]["valueString"] == "5f" * 32


def test_request_id_is_the_balp_transaction_entity() -> None:
    resource = _fhir(PHYSICIAN_READ)

    (transaction,) = [entity for entity in resource["entity"] if entity["type"]["code"] == "XrequestId"]
    assert transaction["what"] == {"identifier": {"value": "req-0001"}}


def test_unknown_future_action_maps_generically() -> None:
    resource = _fhir(FUTURE_ACTION)

    assert resource["type"]["code"] == "rest"
    assert resource["subtype"] == [{"system": "urn:bedside:audit-action", "code": "widget:frob"}]
    assert resource["action"] == "E"
    assert _log_details(resource)["widget"]["valueString"] == "w-1"


def test_failure_is_a_serious_failure_with_its_reason_code() -> None:
    resource = _fhir(FAILURE)

    assert (resource["action"], resource["outcome"], resource["outcomeDesc"]) == ("C", "8", "storage_unavailable")
    user = _requestor(resource)
    assert ("http://terminology.hl7.org/CodeSystem/v3-RoleClass", "PAT") in _codes(user["type"]["coding"])


def test_detail_text_a_fhir_string_cannot_hold_travels_as_base64() -> None:
    resource = _fhir(_event(details={"odd": "a\u00a0b", "empty": ""}))

    details = _log_details(resource)
    assert base64.b64decode(details["odd"]["valueBase64Binary"]).decode() == "a\u00a0b"
    assert "empty" not in details  # FHIR has no empty string
    AuditEvent.model_validate(resource)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("occurred_at", datetime(2025, 1, 1, 12, 0)),  # naive
        ("outcome", "maybe"),
        ("action", "free text"),
        ("event_id", "not/an/id"),
        ("actor", ""),
        ("purpose", " TREAT"),
        ("details", {"Free Text": "x"}),
    ],
)
def test_fields_of_the_wrong_shape_are_refused_without_quoting_them(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field) as raised:
        _event(**{field: value})

    assert repr(value) not in str(raised.value)


# Arbitrary valid events. Strings are any text a FHIR string can hold; details any text at all.
_code = st.from_regex(r"\A[A-Za-z0-9_\-]{1,12}\Z")
_reference = st.builds(
    "{}/{}".format,
    st.sampled_from(["Patient", "Practitioner", "RelatedPerson", "CareTeam", "Device"]),
    st.from_regex(r"\A[A-Za-z0-9\-.]{1,20}\Z"),
)
_string_field = st.one_of(st.none(), _reference, st.from_regex(r"\A[ -~]{0,20}[!-~]\Z"))
_detail_key = st.sampled_from(["reason", "query", "count"]) | st.from_regex(r"\A[a-z][a-z0-9_]{0,10}\Z")
_detail_value = st.one_of(
    st.none(),
    st.text(max_size=20),
    st.integers(),
    st.booleans(),
    st.lists(st.text(max_size=10), max_size=4),
)


@st.composite
def _events(draw: st.DrawFn) -> AuditEventFields:
    subject = draw(st.sampled_from(["auth", "access", "key", "audit", "message", "thread", "break_glass", "widget"]))
    verb = draw(st.sampled_from(["denied", "read", "list", "create", "shred", "rotate", "export", "open", "frob"]))
    return AuditEventFields(
        seq=draw(st.integers(min_value=0, max_value=2**63)),
        leaf_hash=draw(st.binary(min_size=32, max_size=32)).hex(),
        event_id=str(draw(st.uuids())),
        occurred_at=draw(
            st.datetimes(
                min_value=datetime(1970, 1, 2),
                max_value=datetime(2200, 1, 1),
                timezones=st.timezones() | st.just(UTC),
            )
        ),
        tenant=draw(st.from_regex(r"\A[a-z0-9][a-z0-9\-]{0,20}\Z")),
        action=f"{subject}:{verb}",
        outcome=draw(st.sampled_from(["success", "denied", "failure"])),
        actor=draw(st.one_of(st.none(), _reference)),
        actor_role=draw(
            st.one_of(st.none(), st.sampled_from(["patient", "proxy", "physician", "staff", "compliance", "admin"]))
        ),
        issuer=draw(_string_field),
        act_for=draw(st.one_of(st.none(), _reference)),
        key_id=draw(_string_field),
        patient=draw(st.one_of(st.none(), _reference)),
        resource_type=draw(st.one_of(st.none(), st.sampled_from(["Communication", "Consent", "AuditLog", "Thread"]))),
        resource_id=draw(_string_field),
        purpose=draw(st.one_of(st.none(), st.sampled_from(["TREAT", "ETREAT", "HOPERAT"]), _code)),
        request_id=draw(_string_field),
        source=draw(st.one_of(st.none(), st.ip_addresses().map(str), st.just("client.example"))),
        details=draw(st.dictionaries(_detail_key, _detail_value, max_size=5)),
    )


@settings(max_examples=200, deadline=None)
@given(_events())
def test_any_valid_event_maps_to_a_valid_audit_event_of_plain_json(event: AuditEventFields) -> None:
    resource = _fhir(event)

    _assert_plain_json(resource)
    text = json.dumps(resource, ensure_ascii=False, allow_nan=False)
    text.encode()  # UTF-8 all the way
    model = AuditEvent.model_validate(resource)
    assert json.loads(model.model_dump_json()) == resource
    assert json.dumps(_fhir(event)) == json.dumps(resource)
