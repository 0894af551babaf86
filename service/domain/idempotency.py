"""Replaying a request by its `Idempotency-Key`: what the first request stored, checked against this one."""

from __future__ import annotations

from typing import Any

from service.errors import ConflictError, FieldProblem, InvalidRequestError
from service.store.idempotency import StoredResponse


def replayable(stored: StoredResponse, fingerprint: bytes) -> dict[str, Any]:
    """The first request's response, to hand back again. ConflictError (409) while that request has not
    completed; InvalidRequestError (422) if the key was used for a request other than this one."""
    if stored.response is None:
        raise ConflictError("the first request with this key did not complete")
    if stored.request_hash != fingerprint:
        raise InvalidRequestError(
            [FieldProblem(("Idempotency-Key",), "reused", "this key was used for a different request")]
        )
    return stored.response
