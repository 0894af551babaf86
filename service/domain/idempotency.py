"""Idempotency keys: a request's keyed fingerprint, and replaying what the first request with its key
stored, checked against this one."""

from __future__ import annotations

import hmac
import json
from typing import Any

from crypto.fingerprint import fingerprint
from service.domain.keyring import PatientKeyring
from service.errors import ConflictError, FieldProblem, InvalidRequestError
from service.store.db import Tx
from service.store.idempotency import StoredResponse

# What migration 0009 left in place of the unkeyed digests stored before fingerprints were keyed: a key
# claimed then can no longer be compared with its retry, and replays (within its day) without the check;
# so does a signed inbound reply received then (whose signature is stale five minutes after it was sent).
SCRUBBED = b"\x00"


class RequestFingerprints:
    """Fingerprints of requests, keyed with the tenant's own data key (`crypto.fingerprint`), so that the
    ones kept with idempotency keys confirm nothing about a guessed request to anyone holding only the
    database or a backup of it."""

    def __init__(self, keyring: PatientKeyring) -> None:
        self._keyring = keyring

    async def of(self, tx: Tx, request: object) -> bytes:
        """The fingerprint of `request`: JSON-encodable parts (ids, dates and enums as their str), in an
        order that is part of what makes the request the one it is."""
        return await self.of_bytes(tx, json.dumps(request, default=str, sort_keys=True, separators=(",", ":")).encode())

    async def of_bytes(self, tx: Tx, request: bytes) -> bytes:
        """The fingerprint of a request's bytes as received (a signed inbound webhook's body)."""
        return fingerprint(await self._keyring.tenant_key(tx), request)


def same_request(stored: bytes, fingerprint: bytes) -> bool:
    """Whether a request with this fingerprint is the one whose fingerprint was stored; always so for one
    stored before fingerprints were keyed (`SCRUBBED`), which can no longer be compared."""
    return stored == SCRUBBED or hmac.compare_digest(stored, fingerprint)


def replayable(stored: StoredResponse, fingerprint: bytes) -> dict[str, Any]:
    """The first request's response, to hand back again. ConflictError (409) while that request has not
    completed; InvalidRequestError (422) if the key was used for a request other than this one."""
    if stored.response is None:
        raise ConflictError("the first request with this key did not complete")
    if not same_request(stored.request_hash, fingerprint):
        raise InvalidRequestError(
            [FieldProblem(("Idempotency-Key",), "reused", "this key was used for a different request")]
        )
    return stored.response
