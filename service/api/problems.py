"""Domain errors to RFC 9457 problem+json, in one table. Bodies carry codes and fixed text only."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from aiohttp import web

from schemas.common import FieldProblemOut, Problem
from service.api.headers import RETRY_AFTER, WWW_AUTHENTICATE
from service.errors import (
    AlreadyExistsError,
    AuthenticationError,
    AuthenticationThrottledError,
    ConflictError,
    DomainError,
    ForbiddenError,
    InvalidRequestError,
    MalformedRequestError,
    NotFoundError,
    PayloadTooLargeError,
    RecalledError,
    ShreddedError,
    TooManyUploadsError,
    UnavailableError,
    UnsupportedMediaTypeError,
    UploadTimeoutError,
    WebhookSignatureError,
)

PROBLEM_TYPE_PREFIX = "urn:bedside:problem:"
PROBLEM_CONTENT_TYPE = "application/problem+json"

# Most specific first: the first class the error is an instance of decides its status.
STATUS_BY_ERROR: tuple[tuple[type[DomainError], int], ...] = (
    (AuthenticationError, 401),
    (ForbiddenError, 403),  # ConsentRequiredError included: 403 consent-required
    (NotFoundError, 404),
    (ShreddedError, 410),
    (RecalledError, 410),
    (AlreadyExistsError, 409),
    (ConflictError, 409),
    (PayloadTooLargeError, 413),
    (UnsupportedMediaTypeError, 415),
    (MalformedRequestError, 400),
    (InvalidRequestError, 422),
    (UploadTimeoutError, 408),
    (TooManyUploadsError, 429),
    (AuthenticationThrottledError, 429),
    (UnavailableError, 503),
)


@dataclass(frozen=True, slots=True)
class HttpProblem:
    """A problem that is not a domain error: the router's own 404 and 405, 413 from the body limit."""

    status: int
    code: str
    title: str


HTTP_PROBLEMS = {
    400: HttpProblem(400, "bad-request", "Bad request"),
    404: HttpProblem(404, "not-found", "Not found"),
    405: HttpProblem(405, "method-not-allowed", "Method not allowed"),
    413: HttpProblem(413, "payload-too-large", "The request body is too large"),
    415: HttpProblem(415, "unsupported-media-type", "Unsupported media type"),
}
INTERNAL = HttpProblem(500, "internal-error", "Internal error")


def status_for(error: DomainError) -> int:
    for cls, status in STATUS_BY_ERROR:
        if isinstance(error, cls):
            return status
    return 400


def problem_response(
    *,
    status: int,
    code: str,
    title: str,
    request_id: str,
    detail: str | None = None,
    errors: list[FieldProblemOut] | None = None,
    headers: dict[str, str] | None = None,
    shredded_at: datetime | None = None,
    recalled_at: datetime | None = None,
) -> web.Response:
    problem = Problem(
        type=PROBLEM_TYPE_PREFIX + code,
        title=title,
        status=status,
        detail=detail,
        code=code,
        request_id=request_id,
        errors=errors,
        shredded_at=shredded_at,
        recalled_at=recalled_at,
    )
    return web.Response(
        status=status,
        body=json.dumps(problem.model_dump(mode="json", exclude_none=True)).encode(),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
    )


def bearer_challenge(error: DomainError | None) -> str | None:
    """The WWW-Authenticate challenge of a refused bearer token (a portal's, or the metrics token), sent with
    its 401 and with the 429 that answers instead once its source is throttled; None for anything else, a
    refused webhook signature included (no bearer token is involved)."""
    if not isinstance(error, AuthenticationError) or isinstance(error, WebhookSignatureError):
        return None
    # RFC 6750: a missing token gets the bare challenge, a bad one says invalid_token.
    if error.reason == "missing":
        return 'Bearer realm="bedside"'
    return 'Bearer realm="bedside", error="invalid_token"'


def domain_problem(error: DomainError, request_id: str) -> web.Response:
    status = status_for(error)
    headers = {}
    errors = None
    challenge = bearer_challenge(error.refused if isinstance(error, AuthenticationThrottledError) else error)
    if challenge is not None:
        headers[WWW_AUTHENTICATE.name] = challenge
    if error.retry_after is not None:  # a refusal that passes: an outage, a caller's limit
        headers[RETRY_AFTER.name] = str(error.retry_after)
    if isinstance(error, InvalidRequestError):
        errors = [FieldProblemOut(loc=list(p.loc), type=p.type, msg=p.msg) for p in error.problems]
    shredded_at = error.shredded_at if isinstance(error, ShreddedError) else None
    recalled_at = error.recalled_at if isinstance(error, RecalledError) else None
    response = problem_response(
        status=status,
        code=error.code,
        title=error.title,
        detail=error.detail,
        request_id=request_id,
        errors=errors,
        headers=headers,
        shredded_at=shredded_at,
        recalled_at=recalled_at,
    )
    if isinstance(error, UploadTimeoutError):
        # RFC 9110 15.5.9: a 408 means the server has given up on this connection, so it says `close`.
        # The rest of the body, if it still comes, is read and dropped for a while (aiohttp's lingering
        # close), so the client sees this answer rather than a reset.
        response.force_close()
    return response


def http_problem(exc: web.HTTPException, request_id: str) -> web.Response:
    known = HTTP_PROBLEMS.get(exc.status, HttpProblem(exc.status, "http-error", exc.reason))
    headers = {}
    if exc.status == 405 and "Allow" in exc.headers:
        headers["Allow"] = exc.headers["Allow"]
    # The same body as a domain NotFoundError: a missing route and a hidden resource look alike.
    return problem_response(
        status=known.status,
        code=known.code,
        title=known.title,
        detail=known.title,
        request_id=request_id,
        headers=headers,
    )


def internal_problem(request_id: str) -> web.Response:
    return problem_response(status=INTERNAL.status, code=INTERNAL.code, title=INTERNAL.title, request_id=request_id)
