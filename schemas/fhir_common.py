"""What the FHIR mappings (AuditEvent, Consent) share: value patterns of FHIR's primitive types, the checks
built on them, and the two small builders every resource uses."""

from __future__ import annotations

import re
from datetime import UTC, datetime

# FHIR R4 primitive types (https://hl7.org/fhir/R4/datatypes.html): string and code.
FHIR_STRING = re.compile(r"[ \r\n\t\S]+")
FHIR_CODE = re.compile(r"[^\s]+( [^\s]+)*")
# A literal relative reference: `Type/id`.
LITERAL_REFERENCE = re.compile(r"[A-Z][A-Za-z]{1,63}/[A-Za-z0-9\-.]{1,64}")


def matches(value: object, pattern: re.Pattern[str]) -> bool:
    """`value` is a string of `pattern` that encodes as UTF-8 (no lone surrogates)."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def is_instant(moment: object) -> bool:
    """A timezone-aware datetime that converts to UTC."""
    if not isinstance(moment, datetime) or moment.utcoffset() is None:
        return False
    try:
        moment.astimezone(UTC)
    except OverflowError:
        return False
    return True


def coding(system: str, code: str, display: str | None = None) -> dict[str, str]:
    """A FHIR Coding."""
    value = {"system": system, "code": code}
    if display is not None:
        value["display"] = display
    return value


def instant(moment: datetime) -> str:
    """UTC with a Z, and microseconds only when there are some: the canonical form, which FHIR parsers hand
    back unchanged."""
    return moment.astimezone(UTC).isoformat().removesuffix("+00:00") + "Z"
