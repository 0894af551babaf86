"""The path parameters of the API, each declared once. The route table's templates name them, the OpenAPI
document describes them from these declarations (a template naming an undeclared one is refused when the
document is built), and the handlers read them through the same objects, so the three cannot drift apart."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from aiohttp import web

from service.domain.audit import AuditAction, AuditEvent
from service.errors import NotFoundError
from service.keys import PRINCIPAL


@dataclass(frozen=True, slots=True)
class PathParameter:
    """A parameter of a route's path: `{name}` in its template."""

    name: str
    description: str
    is_uuid: bool = False  # read with `path_uuid`: anything but a UUID is a 404

    def schema(self) -> dict[str, Any]:
        if self.is_uuid:
            return {"type": "string", "format": "uuid"}
        return {"type": "string"}

    def text(self, request: web.Request) -> str:
        """The value in the request's path, as it is."""
        return request.match_info[self.name]


_NOT_A_UUID = "a UUID; anything else names nothing (404)"

ID = PathParameter("id", f"The id of what the path names, {_NOT_A_UUID}", is_uuid=True)
DELIVERY_ID = PathParameter("delivery_id", f"The webhook delivery's id, {_NOT_A_UUID}", is_uuid=True)
ENDPOINT_ID = PathParameter("endpoint_id", f"The webhook endpoint's id, {_NOT_A_UUID}", is_uuid=True)
PATIENT_ID = PathParameter("patient_id", "The patient's FHIR id: the part after `Patient/` of the reference")
TEAM_ID = PathParameter("team_id", "The care team's FHIR id: the part after `CareTeam/` of the reference")

PATH_PARAMETERS = {parameter.name: parameter for parameter in (ID, DELIVERY_ID, ENDPOINT_ID, PATIENT_ID, TEAM_ID)}


def path_uuid(request: web.Request, resource_type: str, parameter: PathParameter = ID) -> UUID:
    """A path id that is not a UUID names nothing: 404, like any id that is not found, and audited like
    one (`access:denied`, reason `malformed-id`, recorded by the problem middleware) with the resource
    type and the route's name but no id: the caller's text is attacker-controlled and audit columns are
    indexed, so none of it is recorded."""
    if not parameter.is_uuid:
        raise ValueError(f"{{{parameter.name}}} is not declared a UUID: the document would say otherwise")
    try:
        return uuid.UUID(parameter.text(request))
    except ValueError:
        error = NotFoundError()
        principal = request.get(PRINCIPAL)
        if principal is not None:  # a signed inbound webhook has no principal: nobody to record
            denied = AuditEvent.by(
                principal,
                AuditAction.ACCESS_DENIED,
                resource_type=resource_type,
                details={"route": request.match_info.route.name or ""},
            )
            error.recording(denied.denied("malformed-id"))
        raise error from None
