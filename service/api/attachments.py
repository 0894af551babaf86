"""`/v1/attachments`: upload a file into a thread as the raw request body (streamed, sealed in chunks) and
download it (verified first, then streamed). Thin handlers over AttachmentService."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import quote

import structlog
from aiohttp import ClientPayloadError, web
from aiohttp.http_exceptions import HttpProcessingError

from schemas.attachments import AttachmentOut, AttachmentUploadQuery
from service.api.bodies import parse_query
from service.api.headers import CONTENT_DISPOSITION, FILE_NAME, NO_SNIFF, NO_STORE, SANDBOX, X_REQUEST_ID
from service.api.paths import path_uuid
from service.api.streaming import stream_body
from service.errors import FieldProblem, InvalidRequestError, MalformedRequestError
from service.keys import ATTACHMENTS, PRINCIPAL, REQUEST_ID

log = structlog.get_logger("bedside.attachments")


async def _body(request: web.Request, piece_bytes: int) -> AsyncIterator[bytes]:
    """The request body in pieces of at most `piece_bytes`, as they arrive (never the whole of it).
    aiohttp's `client_max_size` does not apply to streamed reads: the domain enforces the limit."""
    try:
        async for piece in request.content.iter_chunked(piece_bytes):
            yield piece
    except (ClientPayloadError, HttpProcessingError, ConnectionError):
        # The client went away or broke the framing mid-body: the upload's transaction rolls back.
        raise MalformedRequestError("The upload ended before its body was complete") from None


def _file_name(request: web.Request) -> str:
    # The file name travels in a header, never in the URL: proxies and load balancers log URLs. Its value
    # is percent-encoded UTF-8 (RFC 3986), so any name fits in a header.
    name = FILE_NAME.text(request)
    if not name:
        raise InvalidRequestError([FieldProblem((FILE_NAME.name,), "required", "the file name, percent-encoded UTF-8")])
    return name


async def upload_attachment(request: web.Request) -> web.Response:
    query = parse_query(request, AttachmentUploadQuery)
    file_name = _file_name(request)
    attachments = request.app[ATTACHMENTS]
    view = await attachments.upload(
        request[PRINCIPAL],
        thread_id=query.thread_id,
        file_name=file_name,
        content_type=request.content_type,
        charset=request.charset,
        declared_size=request.content_length,
        body=_body(request, attachments.chunk_bytes),
    )
    record = view.record
    out = AttachmentOut(
        id=str(record.id),
        thread_id=str(record.thread_id),
        content_type=record.content_type,  # type: ignore[arg-type]
        size=record.size,
        file_name=view.file_name,
    )
    return web.json_response(out.model_dump(mode="json"), status=201)


def content_disposition(file_name: str) -> str:
    """RFC 6266 / RFC 8187: `attachment` with the name percent-encoded as UTF-8 (no quoting pitfalls)."""
    return f"attachment; filename*=UTF-8''{quote(file_name, safe='')}"


async def download_attachment(request: web.Request) -> web.StreamResponse:
    # Everything that can fail with an error status (access, shredding, integrity) fails in here,
    # before a single header is sent.
    download = await request.app[ATTACHMENTS].download(request[PRINCIPAL], path_uuid(request, "Attachment"))
    record = download.record
    response = web.StreamResponse(
        headers={
            CONTENT_DISPOSITION.name: content_disposition(download.file_name),
            **NO_SNIFF.fixed(),
            **NO_STORE.fixed(),
            **SANDBOX.fixed(),
            X_REQUEST_ID.name: request[REQUEST_ID],
        }
    )
    response.content_type = record.content_type
    if record.content_type == "text/plain":
        response.charset = "utf-8"
    # A declared length: a transfer cut short below is visibly incomplete to every HTTP client.
    response.content_length = record.size
    chunks, attachment_id = download.chunks, str(record.id)
    return await stream_body(request, response, chunks, event="attachment.download", attachment_id=attachment_id)
