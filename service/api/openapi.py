"""The OpenAPI 3.1 document, generated from the route table and the pydantic schemas: query parameters from
the models the handlers parse them with, path parameters and headers from their declarations
(`service.api.paths`, `service.api.headers`), the upload's media types and size limit from what the domain
accepts and the settings."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from schemas.common import Problem
from service.api.headers import RETRY_AFTER, WWW_AUTHENTICATE, X_REQUEST_ID, Header
from service.api.paths import PATH_PARAMETERS
from service.api.routes import Route
from service.settings import Settings

_PATH_PARAM = re.compile(r"\{([a-zA-Z_][a-zA-Z0-9_]*)(?::[^}]*)?\}")
_REF = "#/components/schemas/{model}"
_STATUS_TEXT = {
    400: "Malformed request",
    401: "Missing or invalid bearer token",
    403: "Not allowed",
    404: "Not found, or not the caller's to see",
    408: "The body came too slowly (a deadline for all of it, a limit on waiting for each 64 KiB); connection closed",
    410: "The content was crypto-shredded or recalled (shredded_at or recalled_at says when)",
    409: "Conflict",
    413: "Body too large",
    415: "Unsupported media type",
    422: "Validation failed",
    429: (
        "Too many requests: this caller's uploads in progress, or failed authentications from this address; "
        "try again after Retry-After seconds"
    ),
    503: "Unavailable for now (the database or the audit log): try again after Retry-After seconds",
}
# Every operation: the request id, read by the outermost middleware and sent back in every answer.
_REQUEST_ID_PARAMETER = {"$ref": f"#/components/parameters/{X_REQUEST_ID.name}"}
_REQUEST_ID_HEADER = {"$ref": f"#/components/headers/{X_REQUEST_ID.name}"}


def _request_header(header: Header) -> dict[str, Any]:
    return {
        "name": header.name,
        "in": "header",
        "required": header.required,
        "description": header.description,
        "schema": header.schema(),
    }


def _response_headers(*headers: Header) -> dict[str, Any]:
    sent: dict[str, Any] = {X_REQUEST_ID.name: _REQUEST_ID_HEADER}
    sent.update({h.name: {"description": h.description, "schema": h.schema()} for h in headers})
    return sent


def _path_parameter(route: Route, name: str) -> dict[str, Any]:
    declared = PATH_PARAMETERS.get(name)
    if declared is None:
        raise ValueError(f"{route.name}: {{{name}}} is not declared in service.api.paths")
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": declared.description,
        "schema": declared.schema(),
    }


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    """The query parameters `model` validates, with its types and bounds; an optional one without the null
    that stands for "not sent"."""
    schema = model.model_json_schema(mode="validation")
    if "$defs" in schema:
        raise ValueError(f"{model.__name__}: a query model takes plain fields only")
    required = set(schema.get("required", ()))
    parameters = []
    for name, field in schema["properties"].items():
        rest = {key: value for key, value in field.items() if key not in ("title", "description", "anyOf")}
        if rest.get("default", 0) is None:  # not sent
            del rest["default"]
        variants = [v for v in field.get("anyOf", ()) if v != {"type": "null"}]
        if len(variants) > 1:
            raise ValueError(f"{model.__name__}.{name}: one type per query parameter")
        schema_of = {**rest, **(variants[0] if variants else {})}
        parameter = {"name": name, "in": "query", "required": name in required, "schema": schema_of}
        if "description" in field:
            parameter["description"] = field["description"]
        parameters.append(parameter)
    return parameters


def _problem_response(
    status: int, schema: dict[str, Any], *headers: Header, description: str | None = None
) -> dict[str, Any]:
    return {
        "description": description or _STATUS_TEXT.get(status, "Problem"),
        "headers": _response_headers(*headers),
        "content": {"application/problem+json": {"schema": schema}},
    }


def build_openapi(routes: tuple[Route, ...], *, version: str, settings: Settings) -> dict[str, Any]:
    """An OpenAPI 3.1 document for `routes`, as served with `settings` (which set the upload limit)."""
    models: set[type[BaseModel]] = {Problem}
    for route in routes:
        models.update(m for m in (route.body, route.response) if m is not None)
        models.update(model for _, model in route.other_responses)
    ordered = sorted(models, key=lambda m: m.__name__)
    refs, definitions = models_json_schema(
        [(model, mode) for model in ordered for mode in ("validation", "serialization")],
        ref_template=_REF,
    )
    problem = refs[(Problem, "serialization")]
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        path = _PATH_PARAM.sub(r"{\1}", route.path)
        operation: dict[str, Any] = {
            "operationId": route.name,
            "summary": route.summary,
            "tags": [route.tag],
            "responses": {},
        }
        parameters = [_path_parameter(route, name) for name in _PATH_PARAM.findall(route.path)]
        if route.query is not None:
            parameters += _query_parameters(route.query)
        parameters += [_request_header(header) for header in route.headers]
        operation["parameters"] = [*parameters, _REQUEST_ID_PARAMETER]
        # The largest body the route takes, if it takes one: in the body's description, as `x-max-bytes`,
        # and in its 413's description.
        limit: int | None = None
        if route.body is not None:
            limit = route.max_body_bytes(settings)
            operation["requestBody"] = {
                "required": True,
                "description": f"A JSON document of at most {limit} bytes (more: 413)",
                "x-max-bytes": limit,
                "content": {"application/json": {"schema": refs[(route.body, "validation")]}},
            }
        if route.raw_body is not None:
            limit = route.raw_body.max_bytes(settings)
            operation["requestBody"] = {
                "required": True,
                "description": f"{route.raw_body.description}. At most {limit} bytes (more: 413)",
                "x-max-bytes": limit,
                "content": {
                    media_type: {"schema": {"type": "string", "format": "binary", "maxLength": limit}}
                    for media_type in route.raw_body.media_types
                },
            }
        success: dict[str, Any] = {
            "description": {200: "OK", 201: "Created", 202: "Accepted"}.get(route.status, "No content"),
            "headers": _response_headers(*route.response_headers),
        }
        if route.status == 204:
            pass
        elif route.response is not None:
            success["content"] = {route.media_type: {"schema": refs[(route.response, "serialization")]}}
        elif route.file_types is not None:
            success["content"] = {t: {"schema": {"type": "string", "format": "binary"}} for t in route.file_types}
        elif route.media_type != "application/json":
            success["content"] = {route.media_type: {"schema": {"type": "string"}}}
        else:
            success["content"] = {route.media_type: {"schema": {"type": "object"}}}
        operation["responses"][str(route.status)] = success
        statuses = set(route.errors)
        if not route.public:
            # Any of them may meet an outage: authentication and the audit log need the database.
            statuses.update({401, 503})
        if route.body is not None:
            statuses.update({400, 413, 415, 422})
        if 401 in statuses:
            statuses.add(429)  # a source whose authentications keep failing is limited
        for status in sorted(statuses):
            # RFC 6750's challenge answers a bearer token (a portal's, or the metrics token), not a refused
            # webhook signature: with its 401, and with the 429 that answers instead once its source is limited.
            challenge = (WWW_AUTHENTICATE,) if status in (401, 429) and not route.signed else ()
            retry = (RETRY_AFTER,) if status in (429, 503) else ()
            too_large = f"Body too large: more than {limit} bytes" if status == 413 and limit is not None else None
            operation["responses"][str(status)] = _problem_response(
                status, problem, *challenge, *retry, description=too_large
            )
        for status, model in route.other_responses:
            operation["responses"][str(status)] = {
                "description": "Not ready (the body says what is not)" if status == 503 else "See body",
                "headers": _response_headers(),
                "content": {"application/json": {"schema": refs[(model, "serialization")]}},
            }
        if not route.public:
            operation["security"] = [{"bearer": []}]
        paths.setdefault(path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Bedside",
            "version": version,
            "description": "Encrypted-at-rest patient-physician secure messaging for EHR portals.",
        },
        "paths": paths,
        "components": {
            "schemas": definitions.get("$defs", {}),
            "parameters": {X_REQUEST_ID.name: _request_header(X_REQUEST_ID)},
            "headers": {X_REQUEST_ID.name: {"description": X_REQUEST_ID.description, "schema": X_REQUEST_ID.schema()}},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }
