"""The OpenAPI 3.1 document, generated from the route table and the pydantic schemas."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from schemas.common import Problem
from service.api.routes import Route

_PATH_PARAM = re.compile(r"\{([a-zA-Z_][a-zA-Z0-9_]*)(?::[^}]*)?\}")
_REF = "#/components/schemas/{model}"
_STATUS_TEXT = {
    400: "Malformed request",
    401: "Missing or invalid bearer token",
    403: "Not allowed",
    404: "Not found, or not the caller's to see",
    410: "The content was crypto-shredded or recalled (shredded_at or recalled_at says when)",
    409: "Conflict",
    413: "Body too large",
    415: "Unsupported media type",
    422: "Validation failed",
    503: "Not ready",
}


def _problem_response(status: int, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "description": _STATUS_TEXT.get(status, "Problem"),
        "content": {"application/problem+json": {"schema": schema}},
    }


def build_openapi(routes: tuple[Route, ...], *, version: str) -> dict[str, Any]:
    """An OpenAPI 3.1 document for `routes`."""
    models: set[type[BaseModel]] = {Problem}
    for route in routes:
        models.update(m for m in (route.body, route.response) if m is not None)
        models.update(model for _, model in route.other_responses)
    ordered = sorted(models, key=lambda m: m.__name__)
    refs, definitions = models_json_schema(
        [(model, mode) for model in ordered for mode in ("validation", "serialization")],
        ref_template=_REF,
    )
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        path = _PATH_PARAM.sub(r"{\1}", route.path)
        operation: dict[str, Any] = {
            "operationId": route.name,
            "summary": route.summary,
            "tags": [route.tag],
            "responses": {},
        }
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in _PATH_PARAM.findall(route.path)
        ]
        parameters += [
            {
                "name": name,
                "in": "query",
                "required": required,
                "description": text,
                "schema": {"type": "string"},
            }
            for name, text, required in route.query
        ]
        if parameters:
            operation["parameters"] = parameters
        if route.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[(route.body, "validation")]}},
            }
        success: dict[str, Any] = {
            "description": {200: "OK", 201: "Created", 202: "Accepted"}.get(route.status, "No content")
        }
        if route.status == 204:
            pass
        elif route.response is not None:
            success["content"] = {route.media_type: {"schema": refs[(route.response, "serialization")]}}
        elif route.media_type != "application/json":
            success["content"] = {route.media_type: {"schema": {"type": "string"}}}
        else:
            success["content"] = {route.media_type: {"schema": {"type": "object"}}}
        operation["responses"][str(route.status)] = success
        statuses = set(route.errors)
        if not route.public:
            statuses.add(401)
        if route.body is not None:
            statuses.update({400, 413, 415, 422})
        for status in sorted(statuses):
            operation["responses"][str(status)] = _problem_response(status, refs[(Problem, "serialization")])
        for status, model in route.other_responses:
            operation["responses"][str(status)] = {
                "description": _STATUS_TEXT.get(status, "See body"),
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
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }
