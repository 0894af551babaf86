"""One event of the consent ledger as a FHIR R4 `Consent`.

A pure mapping: no I/O, no clock, no imports from `service/` or `crypto/`. The same event always maps to
the same dict, made only of dicts, lists, strings and booleans, ready for `json.dumps`. Only codes,
references and identifiers are carried over; nothing a person wrote.

Each ledger event (a grant or a revoke) is one Consent whose `id` is the event's id. How it reads:

- status: the caller's `status_now`, from the R4 consent-state codes. The ledger reports a grant in
  force now `active`, and a grant revoked, expired or superseded `inactive` ("terminated or replaced"),
  as the HL7 Scalable Consent Management IG marks a revoked consent.
- scope: `patient-privacy` for every Bedside scope, proxies included: a proxy consent lets a
  RelatedPerson see and act on the patient's messages, which is a privacy consent, not a consent to
  treatment (`treatment`), research or an advance directive (`adr`).
- category: LOINC 59284-0 (Patient Consent), and 64292-6 (Release of information consent) for
  `disclosure` and `public_share`, which release an item beyond the care relationship. Displays are
  LOINC's current names ("Consent Document", ...), which R4's example value set predates.
- performer ("who is agreeing to the policy and rules", the grantor): the patient, or the proxy when a
  proxy recorded the event on the patient's behalf. Staff and physicians record what the patient agreed
  to on paper or before a witness, so they are not performers: whoever recorded the event is the HL7
  extension `consent-Transcriber` ("who transcribed the consent into the system"), a verbal consent's
  witness is `consent-Witness`, and a verbal consent is a `verification` with the grantor
  (`verifiedWith` admits only Patient or RelatedPerson, so the witness cannot go there).
- source: a paper form's `document_ref` as `sourceReference` (a literal reference when it is one,
  else an identifier), or else the portal's consent text version as a `DocumentReference` identifier.
- policyRule: v3 ActCode OPTIN for a grant, OPTINR (opt-in with restrictions) for a proxy grant that
  keeps sensitive content back, OPTOUT for a revoke.
- provision: `permit` for a grant, `deny` for a revoke, on the root rule. R4's element text says "not
  permitted in root rule" (no invariant enforces it), but the root is where consent engines (HL7's LEAP
  CDS) read the base decision and where R5 moved it (`Consent.decision`). period = valid_from/until;
  one actor, the grantee, as an information recipient (v3 ParticipationType IRCP), or as a delegatee
  (v3 RoleCode DELEGATEE) for a proxy; actions: messaging and proxy `access` + `use` (a proxy reads and
  writes messages for the patient; `correct` is for amending records), disclosure and public_share
  `disclose`; purpose as v3 ActReason; the named item as `data` with meaning `instance`.
- public_share has no actor: `actor.reference` is required, "public" is nobody in particular, and a
  rule that names no actor is not limited to any one.
- include_sensitive: a proxy grant without it carries the security label v3 Confidentiality N on its
  permit. R4 reads a provision's confidentiality label as a high-water mark (a label of "R" "applies to
  all resources that are labeled R or lower"), so the permit covers normal content and nothing
  restricted (R) or very restricted (V). A nested `deny` labelled R would, read the same way, deny all.
- revoke: a Consent of its own: `deny`, with the grant's actor, actions and data, and the status the
  caller reports (the ledger says `inactive`; what stops is the grant, which it reports `inactive` too).
  No R4 element names the consent a revocation ends (the core `replaces` extension is for canonical
  resources), so the Bedside extension below does, as `Consent/<id>`, with the reason code.
- identifier: the event id as `urn:uuid`, the ledger's SHA-256 of the canonical event (the hash its audit
  event carries into the Merkle log) and the event's version on its line (patient, grantee, scope, item).

The Bedside extension `urn:bedside:extension:consent-event` holds what R4 has no element for: the
recorder's Bedside role, the evidence method, and for a revoke the revoked consent and the reason.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from schemas.fhir_common import FHIR_CODE, FHIR_STRING, LITERAL_REFERENCE, coding, instant, is_instant, matches

# Code systems and extensions. Bedside's own are URNs, so they never pretend to resolve.
CONSENT_SCOPE: Final = "http://terminology.hl7.org/CodeSystem/consentscope"
LOINC: Final = "http://loinc.org"
CONSENT_ACTION: Final = "http://terminology.hl7.org/CodeSystem/consentaction"
ACT_CODE: Final = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ACT_REASON: Final = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
PARTICIPATION_TYPE: Final = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ROLE_CODE: Final = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"
CONFIDENTIALITY: Final = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
TRANSCRIBER: Final = "http://hl7.org/fhir/StructureDefinition/consent-Transcriber"
WITNESS: Final = "http://hl7.org/fhir/StructureDefinition/consent-Witness"
URI: Final = "urn:ietf:rfc:3986"
BEDSIDE_CONSENT_EVENT: Final = "urn:bedside:extension:consent-event"
BEDSIDE_CONSENT_HASH: Final = "urn:bedside:consent-hash"
BEDSIDE_CONSENT_VERSION: Final = "urn:bedside:consent-version"
BEDSIDE_CONSENT_FORM: Final = "urn:bedside:consent-form"
BEDSIDE_CONSENT_TEXT: Final = "urn:bedside:consent-text-version"
BEDSIDE_REVOKE_REASON: Final = "urn:bedside:consent-revoke-reason"
BEDSIDE_ROLE: Final = "urn:bedside:role"
BEDSIDE_TENANT: Final = "urn:bedside:tenant"
BEDSIDE_RESOURCE_TYPE: Final = "urn:bedside:resource-type"

PUBLIC: Final = "public"
SCOPES: Final = frozenset({"messaging", "proxy", "disclosure", "public_share"})
KINDS: Final = frozenset({"grant", "revoke"})
ROLES: Final = frozenset({"patient", "proxy", "physician", "staff", "compliance", "admin"})
EVIDENCE_METHODS: Final = frozenset({"portal", "paper", "verbal"})
EVIDENCE_KEYS: Final = frozenset({"method", "text_version", "document_ref", "witness"})
# R4 ConsentState (http://hl7.org/fhir/consent-state-codes).
STATUSES: Final = frozenset({"draft", "proposed", "active", "rejected", "inactive", "entered-in-error"})

# Reference targets R4 allows, per element.
_ACTOR_TYPES: Final = frozenset(
    {"Device", "Group", "CareTeam", "Organization", "Patient", "Practitioner", "RelatedPerson", "PractitionerRole"}
)
_PERFORMER_TYPES: Final = frozenset({"Organization", "Patient", "Practitioner", "RelatedPerson", "PractitionerRole"})
_PARTY_TYPES: Final = frozenset({"Organization", "Patient", "Practitioner", "RelatedPerson"})  # Transcriber, Witness
_VERIFIED_WITH_TYPES: Final = frozenset({"Patient", "RelatedPerson"})
_SOURCE_TYPES: Final = frozenset({"Consent", "DocumentReference", "Contract", "QuestionnaireResponse"})
# Resource types a shared item can plausibly be; any other ("Thread/t-3") is named by an identifier.
_ITEM_TYPES: Final = frozenset(
    {"Binary", "Communication", "CommunicationRequest", "DiagnosticReport", "DocumentReference", "Media", "Observation"}
)

_CATEGORY_CONSENT: Final = {"coding": [{"system": LOINC, "code": "59284-0", "display": "Consent Document"}]}
_CATEGORY_RELEASE: Final = {
    "coding": [{"system": LOINC, "code": "64292-6", "display": "Release of information consent Document"}]
}  # LOINC's current names; FHIR R4's value set lists the older "Patient Consent", "Release of information consent"

_ACTIONS: Final = {
    "messaging": (("access", "Access"), ("use", "Use")),
    "proxy": (("access", "Access"), ("use", "Use")),
    "disclosure": (("disclose", "Disclose"),),
    "public_share": (("disclose", "Disclose"),),
}
_PURPOSE_DISPLAYS: Final = {
    "TREAT": "treatment",
    "ETREAT": "Emergency Treatment",
    "HOPERAT": "healthcare operations",
    "HPAYMT": "healthcare payment",
    "PUBHLTH": "public health",
}

# FHIR primitive shapes (R4 datatypes), as in `schemas.fhir_audit`.
_PATIENT = re.compile(r"Patient/[A-Za-z0-9\-.]{1,64}")
_SLUG = re.compile(r"[a-z][a-z0-9-]{1,62}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsentFields:
    """One consent ledger event and its status now. Construction checks the shapes the FHIR mapping
    needs, and a `ValueError` names the field, never its value."""

    id: str
    tenant: str
    patient: str
    grantee: str
    scope: str
    item: str
    purpose: str | None
    kind: str
    revokes: str | None
    valid_from: datetime | None
    valid_until: datetime | None
    include_sensitive: bool
    evidence: Mapping[str, str]
    reason: str | None
    recorded_by: str
    recorded_role: str
    recorded_at: datetime
    version: int
    hash: str
    status_now: str

    def __post_init__(self) -> None:
        bad = [name for name, ok in _checks(self) if not ok]
        if bad:
            raise ValueError("consent fields of the wrong shape: " + ", ".join(bad))


def _checks(consent: ConsentFields) -> list[tuple[str, bool]]:
    window = (
        consent.valid_from is None
        or consent.valid_until is None
        or not (is_instant(consent.valid_from) and is_instant(consent.valid_until))
        or consent.valid_until > consent.valid_from
    )
    return [
        ("id", _is_uuid(consent.id)),
        ("tenant", matches(consent.tenant, _SLUG)),
        ("patient", matches(consent.patient, _PATIENT)),
        ("grantee", _grantee_fits(consent.grantee, consent.scope)),
        ("scope", consent.scope in SCOPES),
        ("item", consent.item == "" or matches(consent.item, LITERAL_REFERENCE)),
        ("purpose", consent.purpose is None or matches(consent.purpose, FHIR_CODE)),
        ("kind", consent.kind in KINDS),
        ("revokes", _is_uuid(consent.revokes) if consent.kind == "revoke" else consent.revokes is None),
        ("valid_from", consent.valid_from is None or is_instant(consent.valid_from)),
        ("valid_until", (consent.valid_until is None or is_instant(consent.valid_until)) and window),
        ("include_sensitive", isinstance(consent.include_sensitive, bool)),
        ("evidence", _is_evidence(consent.evidence)),
        ("reason", consent.reason is None or matches(consent.reason, FHIR_CODE)),
        ("recorded_by", matches(consent.recorded_by, LITERAL_REFERENCE)),
        ("recorded_role", consent.recorded_role in ROLES),
        ("recorded_at", is_instant(consent.recorded_at)),
        ("version", type(consent.version) is int and consent.version >= 1),  # an int, not a bool
        ("hash", matches(consent.hash, _SHA256_HEX)),
        ("status_now", consent.status_now in STATUSES),
    ]


def _is_uuid(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        return str(uuid.UUID(value)) == value  # the canonical lowercase form only
    except ValueError:
        return False


def _grantee_fits(grantee: object, scope: object) -> bool:
    if scope == "public_share" or grantee == PUBLIC:
        return scope == "public_share" and grantee == PUBLIC
    return matches(grantee, LITERAL_REFERENCE) and str(grantee).split("/", 1)[0] in _ACTOR_TYPES


def _is_evidence(evidence: object) -> bool:
    if not isinstance(evidence, Mapping) or evidence.get("method") not in EVIDENCE_METHODS:
        return False
    if not set(evidence) <= EVIDENCE_KEYS or not all(matches(v, FHIR_STRING) for v in evidence.values()):
        return False
    return "witness" not in evidence or matches(evidence["witness"], LITERAL_REFERENCE)


def to_fhir_consent(consent: ConsentFields, *, organization: str) -> dict[str, Any]:
    """The FHIR R4 `Consent` for one ledger event of the tenant named `organization` (its display name,
    or an `Organization/..` reference)."""
    if not matches(organization, FHIR_STRING):
        raise ValueError("organization must be a non-empty name")
    grantor = consent.recorded_by if consent.recorded_role == "proxy" else consent.patient
    evidence = consent.evidence

    resource: dict[str, Any] = {
        "resourceType": "Consent",
        "id": consent.id,
        "extension": _extensions(consent),
        "identifier": [
            {"system": URI, "value": f"urn:uuid:{consent.id}"},
            {"system": BEDSIDE_CONSENT_HASH, "value": consent.hash},
            {"system": BEDSIDE_CONSENT_VERSION, "value": str(consent.version)},
        ],
        "status": consent.status_now,
        "scope": {"coding": [coding(CONSENT_SCOPE, "patient-privacy", "Privacy Consent")]},
        "category": [_CATEGORY_CONSENT]
        + ([_CATEGORY_RELEASE] if consent.scope in ("disclosure", "public_share") else []),
        "patient": {"reference": consent.patient},
        "dateTime": instant(consent.recorded_at),
        "performer": [_reference(grantor, _PERFORMER_TYPES)],
        "organization": [_organization(organization, consent.tenant)],
    }
    source = _source(evidence)
    if source is not None:
        resource["sourceReference"] = source
    resource["policyRule"] = {"coding": [_policy_rule(consent)]}
    if evidence["method"] == "verbal":
        resource["verification"] = [
            {
                "verified": True,
                "verifiedWith": _reference(grantor, _VERIFIED_WITH_TYPES),
                "verificationDate": instant(consent.recorded_at),
            }
        ]
    resource["provision"] = _provision(consent)
    return resource


def _reference(value: str, types: frozenset[str]) -> dict[str, Any]:
    """A literal reference when its type may be the element's target; otherwise an identifier, so the
    Consent never points at a type R4 does not allow there."""
    if LITERAL_REFERENCE.fullmatch(value) and value.split("/", 1)[0] in types:
        return {"reference": value}
    return {"identifier": {"value": value}}


def _organization(organization: str, tenant: str) -> dict[str, Any]:
    tenant_identifier = {"system": BEDSIDE_TENANT, "value": tenant}
    if LITERAL_REFERENCE.fullmatch(organization) and organization.startswith("Organization/"):
        return {"reference": organization, "identifier": tenant_identifier}
    return {"type": "Organization", "identifier": tenant_identifier, "display": organization}


def _extensions(consent: ConsentFields) -> list[dict[str, Any]]:
    extensions: list[dict[str, Any]] = [
        {"url": TRANSCRIBER, "valueReference": _reference(consent.recorded_by, _PARTY_TYPES)}
    ]
    witness = consent.evidence.get("witness")
    if witness is not None:
        extensions.append({"url": WITNESS, "valueReference": _reference(witness, _PARTY_TYPES)})
    event: list[dict[str, Any]] = [
        {"url": "recordedRole", "valueCoding": coding(BEDSIDE_ROLE, consent.recorded_role)},
        {"url": "evidenceMethod", "valueCode": consent.evidence["method"]},
    ]
    if consent.revokes is not None:
        event.append({"url": "revokes", "valueReference": {"reference": f"Consent/{consent.revokes}"}})
    if consent.reason is not None:
        event.append({"url": "reason", "valueCoding": coding(BEDSIDE_REVOKE_REASON, consent.reason)})
    extensions.append({"url": BEDSIDE_CONSENT_EVENT, "extension": event})
    return extensions


def _source(evidence: Mapping[str, str]) -> dict[str, Any] | None:
    # R4 has one source[x]: the signed form, when there is one, is the stronger evidence.
    document = evidence.get("document_ref")
    if document is not None:
        if LITERAL_REFERENCE.fullmatch(document) and document.split("/", 1)[0] in _SOURCE_TYPES:
            return {"reference": document}
        return {"type": "DocumentReference", "identifier": {"system": BEDSIDE_CONSENT_FORM, "value": document}}
    text_version = evidence.get("text_version")
    if text_version is not None:
        return {"type": "DocumentReference", "identifier": {"system": BEDSIDE_CONSENT_TEXT, "value": text_version}}
    return None


def _policy_rule(consent: ConsentFields) -> dict[str, str]:
    if consent.kind == "revoke":
        return coding(ACT_CODE, "OPTOUT")  # THO's display for it is misspelt ("op-out"); better none
    if _keeps_sensitive_back(consent):
        return coding(ACT_CODE, "OPTINR", "opt-in with restrictions")
    return coding(ACT_CODE, "OPTIN", "opt-in")


def _keeps_sensitive_back(consent: ConsentFields) -> bool:
    return consent.kind == "grant" and consent.scope == "proxy" and not consent.include_sensitive


def _provision(consent: ConsentFields) -> dict[str, Any]:
    provision: dict[str, Any] = {"type": "permit" if consent.kind == "grant" else "deny"}
    period: dict[str, str] = {}
    if consent.valid_from is not None:
        period["start"] = instant(consent.valid_from)
    if consent.valid_until is not None:
        period["end"] = instant(consent.valid_until)
    if period:
        provision["period"] = period
    if consent.grantee != PUBLIC:
        if consent.scope == "proxy":
            role = coding(ROLE_CODE, "DELEGATEE", "Delegatee")
        else:
            role = coding(PARTICIPATION_TYPE, "IRCP", "information recipient")
        provision["actor"] = [{"role": {"coding": [role]}, "reference": {"reference": consent.grantee}}]
    provision["action"] = [{"coding": [coding(CONSENT_ACTION, *action)]} for action in _ACTIONS[consent.scope]]
    if _keeps_sensitive_back(consent):
        provision["securityLabel"] = [coding(CONFIDENTIALITY, "N", "normal")]
    if consent.purpose is not None:
        provision["purpose"] = [coding(ACT_REASON, consent.purpose, _PURPOSE_DISPLAYS.get(consent.purpose))]
    if consent.item:
        provision["data"] = [{"meaning": "instance", "reference": _item(consent.item)}]
    return provision


def _item(item: str) -> dict[str, Any]:
    resource_type, item_id = item.split("/", 1)
    if resource_type in _ITEM_TYPES:
        return {"reference": item}
    return {"identifier": {"type": {"coding": [coding(BEDSIDE_RESOURCE_TYPE, resource_type)]}, "value": item_id}}
