"""One Bedside audit event as a FHIR R4 `AuditEvent`, shaped after IHE Basic Audit Log Patterns (BALP).

A pure mapping: no I/O, no clock, no imports from `service/` or `crypto/`. The same event always maps to
the same dict, made only of dicts, lists, strings and booleans, ready for `json.dumps`. Only codes and
identifiers are carried over; nothing a person wrote.

How it follows BALP 1.1.4 (`IHE.BasicAudit.Read`, `Query`, `Create`, `Update`, `Delete`):
- agents: the user (`requestor`, type from BALP's user-agent codes, roles in `.role`, no network: "users
  are not network devices"); the JWT issuer as the authorization server that vouched for the user
  (`extra-security-role-type#authserver`, as in `IHE.BasicAudit.AuthZconsent`); the client, which holds
  the network address; the server, which is also `source.observer`. Client and server carry DICOM
  `110153 Source Role ID` / `110152 Destination Role ID`, reversed for reads as BALP does.
- entities: the resource acted on (`System Object`, role `Domain Resource`, or `Query` for a search),
  the patient (`Person`, role `Patient`), the request id as BALP's `XrequestId` transaction entity, and
  a Bedside log entry carrying the Merkle `seq` and `leaf_hash` so an export ties back to the log.
- searches are action `E` (Execute), as BALP's Query profile and the FHIR action codes have them.
- the token the user presented: its `jti` in the user agent's `policy`, as `urn:ietf:params:oauth:jti:<jti>`
  (percent-encoded where a URI needs it), as BALP's OAuth access-token patterns record it.
- the issuer key that verified the token: its `kid` in an extension (`urn:bedside:signing-key`,
  `valueString`) of the authorization-server agent, whose key it is. BALP has no element for it.

BALP says nothing of a proxy. Bedside records the patient a proxy acts for with the HL7 extension
`auditevent-OnBehalfOf` on the user agent and, since that patient is the subject of what the proxy does,
as a patient entity too.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final
from urllib.parse import quote

from schemas.fhir_common import FHIR_CODE, FHIR_STRING, LITERAL_REFERENCE, coding, instant, is_instant, matches

DetailValue = str | int | bool | list[str] | tuple[str, ...] | None

# Code systems. Bedside's own are URNs, so they never pretend to resolve.
AUDIT_EVENT_TYPE: Final = "http://terminology.hl7.org/CodeSystem/audit-event-type"
DICOM: Final = "http://dicom.nema.org/resources/ontology/DCM"
RESTFUL_INTERACTION: Final = "http://hl7.org/fhir/restful-interaction"
ACT_REASON: Final = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
PARTICIPATION_TYPE: Final = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ROLE_CLASS: Final = "http://terminology.hl7.org/CodeSystem/v3-RoleClass"
SECURITY_ROLE_TYPE: Final = "http://terminology.hl7.org/CodeSystem/extra-security-role-type"
SECURITY_SOURCE_TYPE: Final = "http://terminology.hl7.org/CodeSystem/security-source-type"
AUDIT_ENTITY_TYPE: Final = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE: Final = "http://terminology.hl7.org/CodeSystem/object-role"
BALP_ENTITY_TYPE: Final = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
ON_BEHALF_OF: Final = "http://hl7.org/fhir/StructureDefinition/auditevent-OnBehalfOf"
JTI_URN: Final = "urn:ietf:params:oauth:jti:"  # BALP's prefix for a token's jti in agent.policy
_URI_SAFE: Final = "!$&'()*+,;=:@/"  # RFC 3986 sub-delims and path characters; the rest is percent-encoded
BEDSIDE_ACTION: Final = "urn:bedside:audit-action"
BEDSIDE_ROLE: Final = "urn:bedside:role"
BEDSIDE_RESOURCE_TYPE: Final = "urn:bedside:resource-type"
BEDSIDE_ENTITY_TYPE: Final = "urn:bedside:audit-entity-type"
BEDSIDE_SIGNING_KEY: Final = "urn:bedside:signing-key"  # extension: the kid of the key that verified the token

OUTCOMES: Final = {"success": "0", "denied": "4", "failure": "8"}

# verb of "subject:verb" -> (AuditEvent.action, FHIR restful interaction where one really applies).
# A verb not listed (a future action) is an Execute with no interaction: valid, if less specific.
_VERBS: Final[dict[str, tuple[str, str | None]]] = {
    "read": ("R", "read"),
    "status": ("R", None),
    "export": ("R", None),
    "list": ("E", "search-type"),
    "query": ("E", "search-type"),
    "search": ("E", "search-type"),
    "create": ("C", "create"),
    "add": ("C", "create"),
    "send": ("C", "create"),
    "grant": ("C", None),
    "update": ("U", "update"),
    "revoke": ("U", None),
    "roles": ("U", None),  # issuer:roles, the roles an issuer may authenticate
    "rotate": ("U", None),
    "rewrap": ("U", None),
    "retire": ("U", None),
    "delete": ("D", "delete"),
    "shred": ("D", None),
}

# DICOM Security Alert sub-types that match a Bedside action exactly.
_SECURITY_SUBTYPES: Final = {
    "break_glass:open": ("110127", "Emergency Override Started"),
    "key:rotate": ("110129", "Security Configuration"),
    "key:rewrap": ("110129", "Security Configuration"),
    "key:retire": ("110129", "Security Configuration"),
    "key:shred": ("110129", "Security Configuration"),
}

# Bedside role -> v3 RoleClass, so a consumer that knows no Bedside code still reads the role.
_ROLE_CLASSES: Final = {
    "patient": ("PAT", "patient"),
    "proxy": ("AGNT", "agent"),
    "physician": ("PROV", "healthcare provider"),
    "staff": ("EMP", "employee"),
    "compliance": ("EMP", "employee"),
    "admin": ("EMP", "employee"),
}

_PURPOSE_DISPLAYS: Final = {"TREAT": "treatment", "ETREAT": "Emergency Treatment", "HOPERAT": "healthcare operations"}

# Resource types that become literal references ("Consent/7"); any other type ("AuditLog") is named by
# an identifier instead. Only types Bedside can plausibly touch: an unlisted one still maps, less linked.
FHIR_RESOURCE_TYPES: Final = frozenset(
    {
        "AuditEvent",
        "Basic",
        "Binary",
        "Bundle",
        "CareTeam",
        "Communication",
        "CommunicationRequest",
        "Consent",
        "Device",
        "DocumentReference",
        "Encounter",
        "Endpoint",
        "Group",
        "HealthcareService",
        "List",
        "Location",
        "Organization",
        "Patient",
        "Person",
        "Practitioner",
        "PractitionerRole",
        "Provenance",
        "RelatedPerson",
        "Task",
    }
)

# FHIR primitive shapes (R4 datatypes): a string is non-empty and has no whitespace but space, CR, LF
# and tab; a code has no leading, trailing or doubled whitespace; an id is at most 64 of [A-Za-z0-9-.].
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_ACTION = re.compile(r"[a-z][a-z0-9_]*:[a-z][a-z0-9_]*")
_DETAIL_KEY = re.compile(r"[a-z][a-z0-9_]{0,40}")
_HEX = re.compile(r"(?:[0-9a-f]{2})+")


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditEventFields:
    """One recorded audit event with its place in the Merkle log. Construction checks the shapes the
    FHIR mapping needs, and a `ValueError` names the field, never its value."""

    seq: int
    leaf_hash: str
    event_id: str
    occurred_at: datetime
    tenant: str
    action: str
    outcome: str
    actor: str | None = None
    actor_role: str | None = None
    issuer: str | None = None
    act_for: str | None = None
    token_id: str | None = None
    key_id: str | None = None
    patient: str | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    purpose: str | None = None
    request_id: str | None = None
    source: str | None = None
    details: Mapping[str, DetailValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [name for name, ok in _checks(self) if not ok]
        if bad:
            raise ValueError("audit event fields of the wrong shape: " + ", ".join(bad))


def _checks(event: AuditEventFields) -> list[tuple[str, bool]]:
    def required(value: object, pattern: re.Pattern[str]) -> bool:
        return matches(value, pattern)

    def optional(value: object, pattern: re.Pattern[str]) -> bool:
        return value is None or matches(value, pattern)

    return [
        ("seq", isinstance(event.seq, int) and not isinstance(event.seq, bool) and event.seq >= 0),
        ("leaf_hash", required(event.leaf_hash, _HEX)),
        ("event_id", required(event.event_id, _FHIR_ID)),
        ("occurred_at", is_instant(event.occurred_at)),
        ("tenant", required(event.tenant, FHIR_STRING)),
        ("action", required(event.action, _ACTION)),
        ("outcome", event.outcome in OUTCOMES),
        ("actor", optional(event.actor, FHIR_STRING)),
        ("actor_role", optional(event.actor_role, FHIR_CODE)),
        ("issuer", optional(event.issuer, FHIR_STRING)),
        ("act_for", optional(event.act_for, FHIR_STRING)),
        ("token_id", optional(event.token_id, FHIR_STRING)),
        ("key_id", optional(event.key_id, FHIR_STRING)),
        ("patient", optional(event.patient, FHIR_STRING)),
        ("resource_type", optional(event.resource_type, FHIR_CODE)),
        ("resource_id", optional(event.resource_id, FHIR_STRING)),
        ("purpose", optional(event.purpose, FHIR_CODE)),
        ("request_id", optional(event.request_id, FHIR_STRING)),
        ("source", optional(event.source, FHIR_STRING)),
        ("details", _are_details(event.details)),
    ]


def _are_details(details: object) -> bool:
    if not isinstance(details, Mapping):
        return False
    for key, value in details.items():
        if not isinstance(key, str) or not _DETAIL_KEY.fullmatch(key):
            return False
        if isinstance(value, list | tuple):
            if not all(isinstance(item, str) for item in value):
                return False
        elif not isinstance(value, str | int | bool | None):
            return False
    return True


def to_fhir_audit_event(event: AuditEventFields, *, observer: str) -> dict[str, Any]:
    """The FHIR R4 `AuditEvent` for `event`, as recorded by the deployment named `observer`."""
    if not matches(observer, FHIR_STRING):
        raise ValueError("observer must be a non-empty name")
    subject = event.action.split(":", 1)[0]
    action, interaction = _VERBS.get(event.action.split(":", 1)[1], ("E", None))

    resource: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": event.event_id,
        "type": _event_type(subject),
        "subtype": _subtypes(event.action, interaction),
        "action": action,
        "recorded": instant(event.occurred_at),
        "outcome": OUTCOMES[event.outcome],
    }
    reason = event.details.get("reason")
    if event.outcome != "success" and matches(reason, FHIR_STRING):
        resource["outcomeDesc"] = reason  # a reason code, as the domain records it; never prose
    if event.purpose is not None:
        resource["purposeOfEvent"] = [_purpose(event.purpose)]
    resource["agent"] = _agents(event, action, observer)
    resource["source"] = {
        "site": event.tenant,
        "observer": {"display": observer},
        "type": [coding(SECURITY_SOURCE_TYPE, "4", "Application Server")],
    }
    resource["entity"] = _entities(event, interaction)
    return resource


def _event_type(subject: str) -> dict[str, str]:
    if subject == "auth":
        return coding(DICOM, "110114", "User Authentication")
    if subject in ("key", "break_glass"):
        return coding(DICOM, "110113", "Security Alert")
    return coding(AUDIT_EVENT_TYPE, "rest", "Restful Operation")


def _subtypes(action: str, interaction: str | None) -> list[dict[str, str]]:
    subtypes = [coding(BEDSIDE_ACTION, action)]
    if interaction is not None:
        subtypes.append(coding(RESTFUL_INTERACTION, interaction, interaction))
    if action in _SECURITY_SUBTYPES:
        subtypes.append(coding(DICOM, *_SECURITY_SUBTYPES[action]))
    return subtypes


def _purpose(code: str) -> dict[str, Any]:
    return {"coding": [coding(ACT_REASON, code, _PURPOSE_DISPLAYS.get(code))]}


def _reference(value: str) -> dict[str, Any]:
    """`Patient/123` as a literal reference; anything else as an identifier, so it stays valid."""
    if LITERAL_REFERENCE.fullmatch(value):
        return {"reference": value}
    return {"identifier": {"value": value}}


def _agents(event: AuditEventFields, action: str, observer: str) -> list[dict[str, Any]]:
    agents: list[dict[str, Any]] = []
    if event.actor is not None:
        agents.append(_user_agent(event, event.actor, action))
    if event.issuer is not None:
        authserver: dict[str, Any] = {}
        if event.key_id is not None:
            authserver["extension"] = [{"url": BEDSIDE_SIGNING_KEY, "valueString": event.key_id}]
        authserver["type"] = {"coding": [coding(SECURITY_ROLE_TYPE, "authserver", "Authorization Server")]}
        authserver["who"] = {"identifier": {"value": event.issuer}}
        authserver["requestor"] = False
        agents.append(authserver)
    # DICOM and BALP name the side the data flows from "Source": the server for a read, else the client.
    source_role = coding(DICOM, "110153", "Source Role ID")
    destination_role = coding(DICOM, "110152", "Destination Role ID")
    client_role, server_role = (destination_role, source_role) if action == "R" else (source_role, destination_role)
    if event.source is not None:
        agents.append(
            {
                "type": {"coding": [client_role]},
                "who": {"display": event.source},
                "requestor": False,
                "network": {"address": event.source, "type": _network_type(event.source)},
            }
        )
    agents.append({"type": {"coding": [server_role]}, "who": {"display": observer}, "requestor": False})
    return agents


def _user_agent(event: AuditEventFields, actor: str, action: str) -> dict[str, Any]:
    # BALP's user-agent types: information recipient for reads and searches, author for changes
    # (its Create/Update/Delete bind the user to author|informant|custodian), and PAT when the user is
    # the patient. "humanuser" says it is a person, not a system.
    if action in ("R", "E"):
        codings = [coding(PARTICIPATION_TYPE, "IRCP", "information recipient")]
    else:
        codings = [coding(PARTICIPATION_TYPE, "AUT", "author (originator)")]
    if event.actor_role == "patient":
        codings.append(coding(ROLE_CLASS, "PAT", "patient"))
    codings.append(coding(SECURITY_ROLE_TYPE, "humanuser", "Human User"))

    agent: dict[str, Any] = {}
    if event.act_for is not None:
        agent["extension"] = [{"url": ON_BEHALF_OF, "valueReference": _reference(event.act_for)}]
    agent["type"] = {"coding": codings}
    if event.actor_role is not None:
        role = [coding(BEDSIDE_ROLE, event.actor_role)]
        if event.actor_role in _ROLE_CLASSES:
            role.append(coding(ROLE_CLASS, *_ROLE_CLASSES[event.actor_role]))
        agent["role"] = [{"coding": role}]
    agent["who"] = _reference(actor)
    agent["requestor"] = True
    if event.token_id is not None:
        # BALP's OAuth access-token patterns put the token's jti in the user agent's policy, as a URN.
        agent["policy"] = [JTI_URN + quote(event.token_id, safe=_URI_SAFE)]
    if event.purpose is not None:
        agent["purposeOfUse"] = [_purpose(event.purpose)]
    return agent


def _network_type(address: str) -> str:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return "1"  # machine name
    return "2"  # IP address


def _entities(event: AuditEventFields, interaction: str | None) -> list[dict[str, Any]]:
    entities: list[dict[str, Any]] = []
    if event.resource_type is not None or event.resource_id is not None:
        if interaction == "search-type" and event.resource_id is None:
            role = coding(OBJECT_ROLE, "24", "Query")
        else:
            role = coding(OBJECT_ROLE, "4", "Domain Resource")
        entities.append(
            {
                "what": _resource_what(event.resource_type, event.resource_id),
                "type": coding(AUDIT_ENTITY_TYPE, "2", "System Object"),
                "role": role,
            }
        )
    patients = [event.patient] if event.patient is not None else []
    if event.act_for is not None and event.act_for != event.patient:
        patients.append(event.act_for)
    for patient in patients:
        entities.append(
            {
                "what": _reference(patient),
                "type": coding(AUDIT_ENTITY_TYPE, "1", "Person"),
                "role": coding(OBJECT_ROLE, "1", "Patient"),
            }
        )
    if event.request_id is not None:
        entities.append(
            {"what": {"identifier": {"value": event.request_id}}, "type": coding(BALP_ENTITY_TYPE, "XrequestId")}
        )
    details = [
        {"type": "bedside-seq", "valueString": str(event.seq)},
        {"type": "bedside-leaf-hash", "valueString": event.leaf_hash},
    ]
    # Detail keys are snake_case, so they can never collide with the hyphenated bedside-* names.
    for key in sorted(event.details):
        detail = _detail(key, event.details[key])
        if detail is not None:
            details.append(detail)
    entities.append({"type": coding(BEDSIDE_ENTITY_TYPE, "log-entry"), "detail": details})
    return entities


def _resource_what(resource_type: str | None, resource_id: str | None) -> dict[str, Any]:
    if resource_type in FHIR_RESOURCE_TYPES:
        if resource_id is not None and _FHIR_ID.fullmatch(resource_id):
            return {"reference": f"{resource_type}/{resource_id}"}
        what: dict[str, Any] = {"type": resource_type}
        if resource_id is not None:
            what["identifier"] = {"value": resource_id}
        return what
    identifier: dict[str, Any] = {}
    if resource_type is not None:
        identifier["type"] = {"coding": [coding(BEDSIDE_RESOURCE_TYPE, resource_type)]}
    if resource_id is not None:
        identifier["value"] = resource_id
    return {"identifier": identifier}


def _detail(key: str, value: DetailValue) -> dict[str, str] | None:
    """One detail as an entity.detail: text as valueString, or, when FHIR's string type cannot hold it
    (a vertical tab, a no-break space), its UTF-8 as valueBase64Binary. Empty and absent values are left
    out: FHIR has no empty string."""
    if value is None:
        return None
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, list | tuple):
        text = json.dumps(list(value), separators=(",", ":"))  # ASCII-escaped, so always a FHIR string
    else:
        text = value
    if not text:
        return None
    if matches(text, FHIR_STRING):
        return {"type": key, "valueString": text}
    return {"type": key, "valueBase64Binary": base64.b64encode(text.encode("utf-8", "surrogatepass")).decode("ascii")}
