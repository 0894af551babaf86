"""Attachments: files uploaded into a thread, sealed with the thread's patient's data key, in chunks.

Upload, in one transaction: the uploader must be able to write the thread and the thread's messaging
consent must hold; the file name is sealed as a record; the body is cut into fixed-size plaintext chunks
(`crypto.stream`), each sealed and inserted as soon as it is complete, so memory stays bounded whatever
the file's size; the declared type is checked against the content as it streams; the attachment is
marked complete and the audit event written last. A body that is too large, of the wrong type,
interrupted or failing in any other way rolls the whole transaction back: nothing of it is stored.
Holding one transaction (and one pooled connection) for the length of an upload is the price of that
guarantee, so it is held only while data flows (`UploadSlots`, `_in_time`). An upload first waits, with no
connection, for its first chunk's worth of bytes (or its whole body, if smaller), bounded per caller; only
then does it take a process-wide slot and a connection, and from then on each further chunk must come
within the limit on silence, so the transaction sits idle for at most about two such waits. A deadline
bounds the whole body. Only the waits for the client's bytes are timed: a statement is never cancelled
mid-way, and a late upload rolls back through the same path as any other failing one.

Download verifies before it sends. A first pass, in the transaction that decides access and records the
audit event, opens every chunk in order (`StreamOpener`: index, final flag, object and context bound in
each chunk's AAD) and throws the plaintext away; only if the whole attachment is intact do headers and
bytes go out. A tampered, truncated or reordered attachment is therefore an error status, never a
complete-looking file. The cost is reading and decrypting twice. The second pass, which streams, checks
everything again (rows could change between the passes) and holds back the last piece until the end is
proven, so a failure there can only cut the transfer short (the declared Content-Length is not met),
never deliver a complete-looking file.
"""

from __future__ import annotations

import asyncio
import codecs
import uuid
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import structlog

from crypto.errors import DecryptionError
from crypto.keys import DataKey
from crypto.stream import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, StreamOpener, StreamSealer
from service.domain.audit import AuditAction, AuditEvent, AuditRecorder
from service.domain.consents import Decision
from service.domain.keyring import PatientKeyring
from service.domain.messaging import ETREAT, MessagingService, recorded_if_shredded
from service.domain.policy import Access
from service.domain.principal import Principal
from service.errors import (
    ConflictError,
    FieldProblem,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    RecalledError,
    TooManyUploadsError,
    UnavailableError,
    UnsupportedMediaTypeError,
    UploadTimeoutError,
)
from service.store.attachments import AttachmentRecord, AttachmentStore
from service.store.db import Database, Tx

log = structlog.get_logger("bedside.attachments")

# What Bedside stores. `schemas.attachments.AttachmentType` repeats it for the edge (the domain may not import
# `schemas`, nor `schemas` the domain): tests/api/test_openapi.py keeps the two equal.
CONTENT_TYPES = ("application/pdf", "image/png", "image/jpeg", "text/plain")
DEFAULT_MAX_BYTES = 25 * 1024 * 1024
MAX_FILE_NAME_CHARS = 255
MAX_REFERENCES = 20
DEFAULT_MAX_UPLOADS = 8
DEFAULT_UPLOADS_PER_PRINCIPAL = 2
DEFAULT_UPLOAD_DEADLINE_SECONDS = 300.0
DEFAULT_UPLOAD_IDLE_SECONDS = 30.0
# Chunks read per query when verifying or streaming: 8 x 64 KiB of ciphertext held at a time.
READ_PAGE = 8

# What the start of each binary type must be. text/plain is checked as UTF-8 without NUL instead.
_SIGNATURES = {
    "application/pdf": b"%PDF-",
    "image/png": b"\x89PNG\r\n\x1a\n",
    "image/jpeg": b"\xff\xd8\xff",
}
_TEXT_CHARSETS = (None, "utf-8", "us-ascii")


@dataclass(frozen=True, slots=True)
class AttachmentView:
    record: AttachmentRecord
    file_name: str


@dataclass(frozen=True, slots=True)
class AttachmentDownload:
    """A verified attachment, ready to stream: `chunks` yields its plaintext in order and raises
    (`DecryptionError`, `ShreddedError`) if anything changed since the verification."""

    record: AttachmentRecord
    file_name: str
    chunks: AsyncGenerator[bytes, None] = field(repr=False)


def _mismatch() -> UnsupportedMediaTypeError:
    # 415, not 422: RFC 9110 15.5.16 names "inspecting the data directly" as a reason for 415.
    return UnsupportedMediaTypeError("The content does not match its declared type")


class ContentCheck:
    """Whether the content is what its declared type says, fed piece by piece in bounded memory:
    the signature (magic bytes) of a PDF, PNG or JPEG; for text/plain, valid UTF-8 with no NUL, decoded
    incrementally so a character split across pieces is fine. Raises UnsupportedMediaTypeError."""

    __slots__ = ("_head", "_signature", "_text")

    def __init__(self, content_type: str) -> None:
        self._signature = _SIGNATURES.get(content_type)
        self._head = b""
        self._text = codecs.getincrementaldecoder("utf-8")("strict") if content_type == "text/plain" else None

    def update(self, data: bytes) -> None:
        if self._signature is not None and len(self._head) < len(self._signature):
            self._head += data[: len(self._signature) - len(self._head)]
            if not self._signature.startswith(self._head):
                raise _mismatch()
        if self._text is not None:
            if b"\x00" in data:
                raise _mismatch()
            try:
                self._text.decode(data)
            except UnicodeDecodeError:
                raise _mismatch() from None

    def finish(self) -> None:
        if self._signature is not None and self._head != self._signature:
            raise _mismatch()
        if self._text is not None:
            try:
                self._text.decode(b"", final=True)
            except UnicodeDecodeError:
                raise _mismatch() from None


def check_content_type(content_type: str, charset: str | None = None) -> None:
    """415 unless the declared type is one Bedside stores (text only as UTF-8, or ASCII)."""
    if content_type not in CONTENT_TYPES:
        raise UnsupportedMediaTypeError("Send a PDF, PNG, JPEG or UTF-8 plain text file")
    if content_type == "text/plain" and (charset.lower() if charset else None) not in _TEXT_CHARSETS:
        raise UnsupportedMediaTypeError("Send plain text as UTF-8")


def check_file_name(name: str) -> None:
    """1 to 255 printable characters, no path separators, not `.` or `..`. The message never quotes it."""
    if (
        not 1 <= len(name) <= MAX_FILE_NAME_CHARS
        or not name.isprintable()
        or "/" in name
        or "\\" in name
        or name in (".", "..")
    ):
        raise InvalidRequestError(
            [FieldProblem(("file_name",), "file-name", "1 to 255 printable characters, no / or \\")]
        )


def _name_context(attachment_id: UUID, thread_id: UUID) -> dict[str, str]:
    # The keyring adds the tenant itself.
    return {"column": "attachments.file_name", "row": str(attachment_id), "thread": str(thread_id), "schema": "1"}


def _data_context(tenant_id: UUID, attachment_id: UUID, thread_id: UUID, content_type: str) -> dict[str, str]:
    # Chunks are sealed with crypto.stream directly, so the tenant is bound here. The content type is
    # bound too: it decides how a client treats the bytes, so changing it in the row must break them.
    return {
        "tenant": str(tenant_id),
        "column": "attachments.data",
        "row": str(attachment_id),
        "thread": str(thread_id),
        "content_type": content_type,
        "schema": "1",
    }


def _opener(key: DataKey, record: AttachmentRecord) -> StreamOpener:
    return StreamOpener(
        key,
        object_id=str(record.id),
        context=_data_context(record.tenant_id, record.id, record.thread_id, record.content_type),
    )


def _consent_details(decisions: Sequence[Decision]) -> dict[str, Any]:
    return {
        "consent_decision": "permit" if all(d.permit for d in decisions) else "deny",
        "consent_ids": [str(d.consent_id) for d in decisions if d.consent_id is not None],
    }


class UploadSlots:
    """Uploads in progress in this process: per caller (tenant, subject), from the start of the body, and
    in all, from when an upload takes its pooled connection. The caller's count bounds what one caller may
    hold (sockets, a chunk's worth of memory each); the process's count protects the pool. Taking a slot
    never awaits: the check and the count cannot be interleaved with another request's."""

    def __init__(self, total: int, per_principal: int) -> None:
        if total < 1 or per_principal < 1:
            raise ValueError("upload limits must be positive")
        self._total = total
        self._per_principal = per_principal
        self._running = 0
        # Only callers with an upload in progress: an entry goes when its count reaches zero.
        self._by_principal: dict[tuple[UUID, str], int] = {}

    @contextmanager
    def caller(self, principal: Principal) -> Iterator[None]:
        """One of `principal`'s slots while the block runs; TooManyUploadsError (their own doing: 429)
        when they have `per_principal` uploads in progress, whether waiting for data or writing it."""
        key = (principal.tenant_id, principal.subject)
        mine = self._by_principal.get(key, 0)
        if mine >= self._per_principal:
            raise TooManyUploadsError("This caller has too many uploads in progress; retry when one has ended")
        self._by_principal[key] = mine + 1
        try:
            yield
        finally:
            left = self._by_principal[key] - 1
            if left:
                self._by_principal[key] = left
            else:
                del self._by_principal[key]

    @contextmanager
    def connection(self) -> Iterator[None]:
        """One of the process's slots while the block runs (an upload holding a pooled connection);
        UnavailableError (everyone's doing: 503) when `total` are taken."""
        if self._running >= self._total:
            raise UnavailableError("Too many uploads are in progress; retry shortly")
        self._running += 1
        try:
            yield
        finally:
            self._running -= 1


_LATE = "The upload did not finish within the time allowed"
# How long past our own limits an upload's transaction may still sit idle: they end it first.
_IDLE_MARGIN_SECONDS = 10.0
_SLOW = "The upload sent too little for too long"


async def _in_time(body: AsyncIterable[bytes], deadline: float, idle: float, chunk_bytes: int) -> AsyncIterator[bytes]:
    """`body` as long as all of it comes before `deadline` (the event loop's clock) and it is never too
    slow; UploadTimeoutError (`deadline` or `idle`) otherwise. Too slow: until its first `chunk_bytes` have
    come (the upload holds no connection yet), a wait for its next piece lasting `idle`; from then on (a
    connection held, its transaction idle between chunks), the waits for each further `chunk_bytes`
    adding up to `idle`, so a dribble of a few bytes at a time does not count as sending.
    Only the waits count towards `idle`: the consumer's own work between pieces (the database, the pool)
    is not the client's doing. The deadline counts everything, and is asked again before each piece, even
    when the next piece is already buffered and its read would not wait at all."""
    loop = asyncio.get_running_loop()
    pieces = aiter(body)
    received = 0
    left = idle  # of the waits the current chunk may still take
    while True:
        now = loop.time()
        if now >= deadline:
            raise UploadTimeoutError("deadline", _LATE, received=received)
        until = min(deadline, now + left)
        scope = asyncio.timeout_at(until)
        try:
            async with scope:
                piece = await anext(pieces)
        except StopAsyncIteration:
            return
        except TimeoutError:
            if not scope.expired():  # not ours: the body's own
                raise
            if until >= deadline:
                raise UploadTimeoutError("deadline", _LATE, received=received) from None
            raise UploadTimeoutError("idle", _SLOW, received=received) from None
        before, received = received, received + len(piece)
        if received < chunk_bytes or received // chunk_bytes > before // chunk_bytes:
            left = idle  # still before the first chunk (each wait on its own), or a chunk complete
        else:
            left -= loop.time() - now
        yield piece  # outside the scope: the consumer's own work (a chunk's insert) is never cancelled


async def _first_chunk(body: AsyncIterator[bytes], chunk_bytes: int) -> list[bytes]:
    """The pieces of `body` that make its first `chunk_bytes` (the last of them may go beyond), or all of
    it if it is shorter; the rest stays in `body`."""
    pieces: list[bytes] = []
    size = 0
    while size < chunk_bytes:
        piece = await anext(body, None)
        if piece is None:
            break
        pieces.append(piece)
        size += len(piece)
    return pieces


async def _after(first: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """`first`, emptied as it goes (so its pieces are not held past their turn), then `rest`."""
    while first:
        yield first.pop(0)
    async for piece in rest:
        yield piece


class AttachmentReferences:
    """The one check messages need of attachments. Separate from AttachmentService so that
    MessagingService can use it without a construction cycle (AttachmentService needs MessagingService)."""

    def __init__(self, store: AttachmentStore) -> None:
        self._store = store

    async def check_attachments(self, tx: Tx, tenant_id: UUID, thread_id: UUID, ids: Sequence[UUID]) -> None:
        """Only complete attachments of this very thread may be referenced by its messages, each once, and
        none withdrawn with a recalled message. InvalidRequestError (422, `attachment_ids`) naming the
        position of each id that is unknown, incomplete, of another thread or another tenant, repeated, or
        withdrawn (`recalled`)."""
        if not ids:
            return
        if len(ids) > MAX_REFERENCES:
            raise InvalidRequestError([FieldProblem(("attachment_ids",), "count", f"at most {MAX_REFERENCES}")])
        found = await self._store.complete_in_thread(tx, tenant_id, thread_id, ids)
        problems, seen = [], set()
        for index, attachment_id in enumerate(ids):
            if attachment_id in seen:
                problems.append(FieldProblem(("attachment_ids", index), "duplicate", "each attachment once"))
            elif attachment_id not in found:
                problems.append(FieldProblem(("attachment_ids", index), "unknown", "not an attachment of this thread"))
            elif found[attachment_id] is not None:
                # Recalling a message withdrew its attachments; another message must not bring them back.
                problems.append(
                    FieldProblem(("attachment_ids", index), "recalled", "withdrawn with a recalled message")
                )
            seen.add(attachment_id)
        if problems:
            raise InvalidRequestError(problems)


class AttachmentService:
    def __init__(
        self,
        db: Database,
        store: AttachmentStore,
        messaging: MessagingService,
        keyring: PatientKeyring,
        audit: AuditRecorder,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        chunk_bytes: int = DEFAULT_CHUNK_SIZE,
        max_concurrent_uploads: int = DEFAULT_MAX_UPLOADS,
        max_uploads_per_principal: int = DEFAULT_UPLOADS_PER_PRINCIPAL,
        upload_deadline_seconds: float = DEFAULT_UPLOAD_DEADLINE_SECONDS,
        upload_idle_seconds: float = DEFAULT_UPLOAD_IDLE_SECONDS,
    ) -> None:
        if max_bytes < 1 or not 1 <= chunk_bytes <= MAX_CHUNK_SIZE:
            raise ValueError("attachment limits must be positive (chunks at most crypto.stream.MAX_CHUNK_SIZE)")
        if upload_deadline_seconds <= 0 or upload_idle_seconds <= 0:
            raise ValueError("upload time limits must be positive")
        self._db = db
        self._store = store
        self._messaging = messaging
        self._keyring = keyring
        self._audit = audit
        self.max_bytes = max_bytes
        self.chunk_bytes = chunk_bytes
        self._slots = UploadSlots(max_concurrent_uploads, max_uploads_per_principal)
        self._deadline = upload_deadline_seconds
        self._idle = upload_idle_seconds

    async def upload(
        self,
        principal: Principal,
        *,
        thread_id: UUID,
        file_name: str,
        content_type: str,
        body: AsyncIterable[bytes],
        declared_size: int | None = None,
        charset: str | None = None,
    ) -> AttachmentView:
        """Store `body` as an attachment of the thread, all or nothing (see the module docstring).

        UnsupportedMediaTypeError for a type Bedside does not store or content that does not match it;
        InvalidRequestError for a bad file name or an empty file; PayloadTooLargeError past `max_bytes`,
        declared or read; NotFoundError (audited) without write access to the thread; ConsentRequiredError
        (audited); ConflictError for a closed thread; ShreddedError if the patient was shredded;
        TooManyUploadsError when the caller has `max_uploads_per_principal` uploads in progress in this
        process (before any database work; waiting for data counts); UnavailableError when the process has
        `max_concurrent_uploads` holding a connection (asked once the first chunk's worth has arrived);
        UploadTimeoutError (logged, nothing stored) when the body has not all arrived within
        `upload_deadline_seconds` of the start, or came too slowly: before its first chunk is in, nothing
        for `upload_idle_seconds`; after, less than a chunk in `upload_idle_seconds` of waiting.
        """
        check_content_type(content_type, charset)
        check_file_name(file_name)
        if declared_size is not None and declared_size > self.max_bytes:
            raise PayloadTooLargeError(f"The limit for an attachment is {self.max_bytes} bytes")
        with self._slots.caller(principal):
            deadline = asyncio.get_running_loop().time() + self._deadline
            timed = _in_time(body, deadline, self._idle, self.chunk_bytes)
            try:
                # No connection, and no slot of the process's, until there is a chunk to write: a caller
                # who sends slowly (or not at all) holds nothing but their own slot meanwhile.
                first = await _first_chunk(timed, self.chunk_bytes)
                with self._slots.connection():
                    return await self._upload(
                        principal, thread_id, file_name, content_type, _after(first, timed), deadline
                    )
            except UploadTimeoutError as error:
                # Its transaction, if it had begun, has rolled back: nothing is stored. Not audited, as no
                # failed upload is (an upload's event is written with the stored file); logged with ids and
                # counts only.
                log.warning(
                    "attachment.upload_timed_out", thread_id=str(thread_id), size=error.received, reason=error.reason
                )
                raise

    async def _upload(
        self,
        principal: Principal,
        thread_id: UUID,
        file_name: str,
        content_type: str,
        body: AsyncIterable[bytes],
        deadline: float,
    ) -> AttachmentView:
        tenant_id = principal.tenant_id
        attachment_id = uuid.uuid4()
        async with self._db.transaction(tenant_id) as tx:
            # Between chunks the transaction waits for the client, and `_in_time` ends that wait first (a
            # 408, not the database's idle limit with a 503 and a lost connection). A chunk is inserted when
            # the first byte after it arrives, so the transaction may sit idle for the waits of up to two
            # chunks: twice the limit on silence, never past the deadline, and a margin. (A deadline
            # already passed, after a long wait for a connection: the margin, and the next wait for the body
            # is the 408.)
            left = max(0.0, deadline - asyncio.get_running_loop().time())
            await self._store.idle_for(tx, min(left, 2 * self._idle) + _IDLE_MARGIN_SECONDS)
            thread, _ = await self._messaging.access(tx, principal, thread_id, write=True)
            if thread.status != "open":
                raise ConflictError("the thread is closed")
            decisions = await self._messaging.require_consent(tx, principal, thread, AuditAction.ATTACHMENT_UPLOAD)
            sealed_name = await self._keyring.seal_for(
                tx, thread.patient, file_name.encode(), _name_context(attachment_id, thread.id)
            )
            key = await self._keyring.key_for_writing(tx, thread.patient)
            await self._store.create(
                tx, tenant_id, attachment_id, thread.id, principal.subject, content_type, sealed_name
            )
            sealer = StreamSealer(
                key,
                object_id=str(attachment_id),
                context=_data_context(tenant_id, attachment_id, thread.id, content_type),
                chunk_size=self.chunk_bytes,
            )
            check = ContentCheck(content_type)
            size = chunks = 0
            async for piece in body:
                size += len(piece)
                if size > self.max_bytes:
                    raise PayloadTooLargeError(f"The limit for an attachment is {self.max_bytes} bytes")
                check.update(piece)
                for sealed in sealer.update(piece):
                    await self._store.add_chunk(tx, tenant_id, attachment_id, chunks, sealed)
                    chunks += 1
            check.finish()
            if size == 0:
                raise InvalidRequestError([FieldProblem(("body",), "empty", "a file of at least one byte")])
            await self._store.add_chunk(tx, tenant_id, attachment_id, chunks, sealer.finish())
            chunks += 1
            record = await self._store.complete(tx, tenant_id, attachment_id, size, chunks)
            assert record is not None
            await self._audit.record(
                tx,
                AuditEvent.by(
                    principal,
                    AuditAction.ATTACHMENT_UPLOAD,
                    patient=thread.patient,
                    resource_type="Attachment",
                    resource_id=str(attachment_id),
                    details={
                        "thread_id": str(thread.id),
                        "content_type": content_type,
                        "size": size,
                        "chunks": chunks,
                        **_consent_details(decisions),
                    },
                ),
            )
        log.info("attachment.uploaded", attachment_id=str(attachment_id), thread_id=str(thread.id), size=size)
        return AttachmentView(record, file_name)

    async def download(self, principal: Principal, attachment_id: UUID) -> AttachmentDownload:
        """Decide access (anyone who may read the thread, break-glass included), verify the whole
        attachment, record the read; then hand back its plaintext as a stream (see the module docstring).

        NotFoundError (audited) for an unknown attachment or a thread the caller may not read;
        RecalledError (audited) if only recalled messages carry it: it was withdrawn with them;
        ShreddedError (audited as a failed read) if the patient was shredded; `DecryptionError` (an alarm:
        logged, recorded as a failed read, answered 500) if the file name or any chunk is altered, or a
        chunk missing, extra, duplicated or out of order, or the attachment cut short.
        """
        tenant_id = principal.tenant_id
        record: AttachmentRecord | None = None
        patient: str | None = None
        try:
            async with self._db.transaction(tenant_id) as tx:
                record = await self._store.attachment(tx, tenant_id, attachment_id)
                if record is None or not record.complete:
                    await self._deny(principal, attachment_id)
                assert record is not None
                thread, access = await self._messaging.access(tx, principal, record.thread_id, write=False)
                patient = thread.patient
                read = AuditEvent.by(
                    principal,
                    AuditAction.ATTACHMENT_READ,
                    patient=thread.patient,
                    resource_type="Attachment",
                    resource_id=str(record.id),
                    purpose=ETREAT if access is Access.READ else None,
                    details={"thread_id": str(thread.id)},
                )
                withdrawn = await self._store.withdrawn_at(tx, tenant_id, thread.id, record.id)
                if withdrawn is not None:
                    raise RecalledError(withdrawn).recording(read.denied("recalled"))
                with recorded_if_shredded(read):
                    file_name = (
                        await self._keyring.open(tx, record.file_name, _name_context(record.id, record.thread_id))
                    ).decode()
                    key = await self._verify(tx, record)
                await self._audit.record(tx, read)
        except DecryptionError:
            if record is not None:
                await self._integrity_failed(principal, record, patient)
            raise
        return AttachmentDownload(record, file_name, self._plaintext(tenant_id, key, record))

    async def _verify(self, tx: Tx, record: AttachmentRecord) -> DataKey:
        """Open every chunk in order, keeping none of the plaintext; the key if the whole is intact."""
        key: DataKey | None = None
        opener: StreamOpener | None = None
        position = size = 0
        while True:
            page = await self._store.chunks(tx, record.tenant_id, record.id, position, READ_PAGE)
            for chunk in page:
                if chunk.idx != position:
                    raise DecryptionError
                if opener is None:
                    key = await self._keyring.key_for_reading(tx, chunk.data)
                    opener = _opener(key, record)
                size += len(opener.update(chunk.data))
                position += 1
            if len(page) < READ_PAGE:
                break
        if key is None or opener is None:
            raise DecryptionError
        opener.finish()
        if position != record.chunks or size != record.size:
            raise DecryptionError
        return key

    async def _plaintext(self, tenant_id: UUID, key: DataKey, record: AttachmentRecord) -> AsyncGenerator[bytes, None]:
        """The second pass: chunks fetched a page per short transaction (no connection is held while the
        client reads), each opened again, and the key's row checked again (a shred meanwhile stops the
        stream). One piece is held back until the next one opens, and the last until the whole stream is
        proven complete and of the verified size."""
        opener = _opener(key, record)
        position = size = 0
        held: bytes | None = None
        while True:
            async with self._db.transaction(tenant_id) as tx:
                page = await self._store.chunks(tx, tenant_id, record.id, position, READ_PAGE)
                if page:
                    await self._keyring.key_for_reading(tx, page[0].data)
            for chunk in page:
                if chunk.idx != position:
                    raise DecryptionError
                plaintext = opener.update(chunk.data)
                position += 1
                size += len(plaintext)
                if size > record.size:
                    raise DecryptionError
                if held is not None:
                    yield held
                held = plaintext
            if len(page) < READ_PAGE:
                break
        opener.finish()
        if position != record.chunks or size != record.size or held is None:
            raise DecryptionError
        yield held

    async def _integrity_failed(self, principal: Principal, record: AttachmentRecord, patient: str | None) -> None:
        """An alarm: the stored attachment does not open as it was sealed. Logged and recorded as a failed
        read (in a transaction of its own: the read's own rolled back)."""
        log.error("attachment.integrity_failed", attachment_id=str(record.id), thread_id=str(record.thread_id))
        event = AuditEvent.by(
            principal,
            AuditAction.ATTACHMENT_READ,
            patient=patient,
            resource_type="Attachment",
            resource_id=str(record.id),
            details={"thread_id": str(record.thread_id)},
        )
        await self._audit.record_alone(event.failed("integrity"))

    async def _deny(self, principal: Principal, attachment_id: UUID) -> None:
        raise NotFoundError().recording(
            AuditEvent.by(
                principal,
                AuditAction.ACCESS_DENIED,
                resource_type="Attachment",
                resource_id=str(attachment_id),
                details={"attempt": "read"},
            ).denied("policy")
        )
