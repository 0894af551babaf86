"""Reading request bodies into schemas: content type, size, JSON, fields. Errors never echo input."""

from __future__ import annotations

import re
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from service.errors import (
    FieldProblem,
    InvalidRequestError,
    MalformedRequestError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from service.keys import SETTINGS
from service.settings import Settings

M = TypeVar("M", bound=BaseModel)

# Pydantic messages of these types can quote part of the input; say the same thing without it.
_SAFE_MESSAGES = {
    "json_invalid": "Invalid JSON",
    "uuid_parsing": "Input should be a valid UUID",
    "datetime_parsing": "Input should be a valid RFC 3339 date-time",
    "datetime_from_date_parsing": "Input should be a valid RFC 3339 date-time",
    "date_parsing": "Input should be a valid date",
    "url_parsing": "Input should be a valid URL",
}


_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def _loc(parts: tuple[int | str, ...]) -> tuple[int | str, ...]:
    # A loc part can be a client-chosen key (an unknown field's name): echo it only when it looks like a
    # field name (a typo such as `bodyy` stays helpful); anything else could be content, and is not echoed.
    return tuple(p if isinstance(p, int) or _FIELD_NAME.fullmatch(p) else "<field>" for p in parts)


def validation_problems(exc: ValidationError) -> list[FieldProblem]:
    """Where and what failed, from pydantic, with no input, context or URL."""
    return [
        FieldProblem(
            loc=_loc(tuple(error["loc"])),
            type=error["type"],
            msg=_SAFE_MESSAGES.get(error["type"], error["msg"]),
        )
        for error in exc.errors(include_input=False, include_url=False, include_context=False)
    ]


def parse_model(raw: bytes, model: type[M]) -> M:
    """Parse JSON bytes into `model`: 400 for bytes that are not JSON, 422 for JSON of the wrong shape."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        problems = validation_problems(exc)
        if any(p.type == "json_invalid" for p in problems):
            raise MalformedRequestError("The request body is not valid JSON") from None
        raise InvalidRequestError(problems) from None


def parse_query(request: web.Request, model: type[M]) -> M:
    """The query string as `model`: unknown or repeated parameters and bad values are a 422."""
    query = request.query
    repeated = [key for key in query if len(query.getall(key)) > 1]
    if repeated:
        raise InvalidRequestError([FieldProblem(_loc((key,)), "repeated", "give once") for key in repeated])
    try:
        return model.model_validate(dict(query))
    except ValidationError as exc:
        raise InvalidRequestError(validation_problems(exc)) from None


def max_json_bytes(settings: Settings) -> int:
    """The largest body `read_json` takes (more is a 413); the route table documents it from here."""
    return settings.max_json_body_bytes


async def read_json(request: web.Request, model: type[M]) -> M:
    """The request body as `model`, after checking its declared type and size."""
    if request.content_type != "application/json":
        raise UnsupportedMediaTypeError("Send the body as application/json")
    limit = max_json_bytes(request.app[SETTINGS])
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLargeError(f"The limit for this body is {limit} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLargeError(f"The limit for this body is {limit} bytes") from None
    return parse_model(raw, model)
