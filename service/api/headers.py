"""The HTTP headers of the API, each declared once. The route table names the ones a route reads or sends,
the OpenAPI document describes them from these declarations, and the code that reads or writes them uses
the same objects (names, forms and fixed values), so the three cannot drift apart."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict

from crypto.webhooks import HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, MAX_ID_LENGTH
from service.errors import FieldProblem, InvalidRequestError


@dataclass(frozen=True, slots=True)
class Header:
    """A request header a route reads, or a response header it sends."""

    name: str
    description: str
    required: bool = False  # a request header the route does not go without
    pattern: str | None = None  # anchored; the form a value must have
    form: str = ""  # the pattern in words, for the 422 of a value not of that form
    value: str | None = None  # the one value a response header ever has
    kind: Literal["string", "integer"] = "string"

    def schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": self.kind}
        if self.pattern is not None:
            schema["pattern"] = self.pattern
        if self.value is not None:
            schema["const"] = self.value
        return schema

    def matches(self, value: str) -> bool:
        return self.pattern is None or re.fullmatch(self.pattern, value) is not None

    def read(self, request: web.Request) -> str | None:
        """The value sent, or None; one not of the declared form is a 422 that names the header."""
        value = request.headers.get(self.name)
        if value is not None and not self.matches(value):
            raise InvalidRequestError([FieldProblem((self.name,), "format", self.form)])
        return value

    def text(self, request: web.Request) -> str | None:
        """The value of a header that carries text as percent-encoded UTF-8 (RFC 3986), decoded, or None.

        A header carries bytes, and which charset they are in is anyone's guess (aiohttp reads them as
        Latin-1, so UTF-8 sent raw would turn "ä" into "Ã¤"): a value with anything but printable ASCII in
        it, or escapes that are not UTF-8, is a 422 that names the header, never text stored garbled."""
        value = self.read(request)
        if value is None:
            return None
        try:
            if value.isascii() and value.isprintable():
                return unquote(value, errors="strict")
        except UnicodeDecodeError:
            pass
        raise InvalidRequestError([FieldProblem((self.name,), "encoding", "percent-encoded UTF-8 (RFC 3986)")])

    def fixed(self) -> dict[str, str]:
        """The response header with its one value, to send."""
        if self.value is None:
            raise ValueError(f"{self.name} has no fixed value")
        return {self.name: self.value}


def only(request: web.Request, headers: Iterable[Header]) -> CIMultiDict[str]:
    """The request's `headers` and no others, every occurrence of each (a repeated header stays visible)."""
    return CIMultiDict((header.name, value) for header in headers for value in request.headers.getall(header.name, ()))


# -- read by routes ----------------------------------------------------------------------------------------

X_REQUEST_ID = Header(
    "X-Request-Id",
    "The client's own id for the request, kept for correlation when it has this form (another value is "
    "ignored, not refused): in the logs and the audit events as client_request_id. The answer's X-Request-Id "
    "is always the id the service made (32 hex digits), as in problem bodies, the logs and the audit log",
    pattern=r"^[A-Za-z0-9._\-]{8,64}$",
)
X_FORWARDED_FOR = Header(
    "X-Forwarded-For",
    "Written by the proxies in front of the service, not by API clients: read only from a peer in "
    "BEDSIDE_TRUSTED_PROXIES, for the client's address (service/domain/client_address.py)",
)
IDEMPOTENCY_KEY = Header(
    "Idempotency-Key",
    "Makes a retry safe: the same key with the same body answers with the first response (with "
    "Idempotent-Replayed), the same key with another body is a 422. Keys are kept 24 hours, per caller",
    pattern=r"^[A-Za-z0-9_\-.:]{1,200}$",
    form="1 to 200 of A-Z a-z 0-9 _ - . :",
)
BREAK_GLASS_REASON = Header(
    "Break-Glass-Reason",
    "Why a physician outside the thread must read it, percent-encoded UTF-8 (RFC 3986; 10 to 500 printable "
    "characters once decoded): opens a break-glass grant, recorded with the reason, sealed, for compliance to "
    "review. Checked whoever sends it; opens nothing for anyone else",
)
FILE_NAME = Header(
    "Bedside-File-Name",
    "The file's name, percent-encoded UTF-8 (RFC 3986), never in the URL: 1 to 255 printable characters, no / or \\",
    required=True,
)
WEBHOOK_ID = Header(
    HEADER_ID,
    f"Standard Webhooks: the message id, 1 to {MAX_ID_LENGTH} of A-Z a-z 0-9 _ -; the same id with the same body "
    "answers with the first reply (200)",
    required=True,
)
WEBHOOK_TIMESTAMP = Header(
    HEADER_TIMESTAMP,
    "Standard Webhooks: Unix seconds when signed, in canonical decimal; within five minutes of now",
    required=True,
)
WEBHOOK_SIGNATURE = Header(
    HEADER_SIGNATURE,
    "Standard Webhooks: space-separated signatures (v1,<base64 HMAC-SHA256> under the endpoint's inbound "
    "secret) of `{webhook-id}.{webhook-timestamp}.{body}`; one that verifies is enough",
    required=True,
)
WEBHOOK_HEADERS = (WEBHOOK_ID, WEBHOOK_TIMESTAMP, WEBHOOK_SIGNATURE)

# -- sent -------------------------------------------------------------------------------------------------

IDEMPOTENT_REPLAYED = Header(
    "Idempotent-Replayed",
    "Present when this is the stored answer to an earlier request with the same Idempotency-Key",
    value="true",
)
RETRY_AFTER = Header("Retry-After", "Seconds to wait before trying again", kind="integer")
WWW_AUTHENTICATE = Header(
    "WWW-Authenticate",
    'The bearer challenge (RFC 6750): error="invalid_token" when a token was sent but refused. Also on the 429 '
    "that answers instead of that 401 once the address is limited (RFC 9110 section 11.6.1); not on the 429 of "
    "too many uploads",
)
NO_STORE = Header("Cache-Control", "Not to be stored by any cache", value="no-store")
CONTENT_DISPOSITION = Header(
    "Content-Disposition", "attachment, with the file name percent-encoded as UTF-8 (RFC 6266, RFC 8187)"
)
NO_SNIFF = Header("X-Content-Type-Options", "Browsers take the stored type as it is", value="nosniff")
SANDBOX = Header(
    "Content-Security-Policy",
    "Nothing in the file runs, even if opened in a browser",
    value="sandbox; default-src 'none'",
)
