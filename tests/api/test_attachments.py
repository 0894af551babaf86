"""Attachments over real HTTP, a real database and real keys: streamed uploads sealed in chunks, all or
nothing; downloads verified whole before the first byte, so tampering is an error status, never a file."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import subprocess
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import unquote

import aiohttp
import asyncpg
import pytest
from structlog.testing import capture_logs

from crypto.errors import DecryptionError
from service.app import create_app
from service.domain.attachments import AttachmentReferences
from service.domain.principal import Principal, Role
from service.embedded import find_pg_bindir
from service.errors import InvalidRequestError
from service.keys import ATTACHMENTS
from service.settings import Settings
from service.store.attachments import AttachmentStore
from tests.api.messaging_helpers import ATTACHMENTS_URL as URL
from tests.api.messaging_helpers import consent, held, thread, trickle, upload, uploads_in_flight
from tests.conftest import Dsns, Portals, Services
from tests.support import as_owner, audit_events, canary

PDF, PNG, JPEG, TEXT = "application/pdf", "image/png", "image/jpeg", "text/plain"
KIB, MIB = 1024, 1024 * 1024
LIMIT = 25 * MIB  # the default max_attachment_bytes
CHUNK = 64 * KIB
PORTAL = {"method": "portal", "text_version": "v3"}
BREAK_GLASS = {"Break-Glass-Reason": "Unconscious in the ED, need history"}


# -- what a portal does ------------------------------------------------------------------------------------


def patient(portals: Portals, n: int = 1) -> dict[str, str]:
    return portals.acme.auth(role="patient", sub=f"Patient/{n}")


def physician(portals: Portals, n: int = 7) -> dict[str, str]:
    return portals.acme.auth(role="physician", sub=f"Practitioner/{n}")


async def open_thread(client: Any, portals: Portals, *, consent: bool = True) -> str:
    """Patient/1 consents to messaging with Practitioner/7 and starts a thread with them."""
    if consent:
        grant = {"patient": "Patient/1", "grantee": "Practitioner/7", "scope": "messaging", "evidence": PORTAL}
        response = await client.post("/v1/consents", json=grant, headers=patient(portals))
        assert response.status == 201, await response.text()
    body = {"patient": "Patient/1", "participants": ["Practitioner/7"], "subject": "My lab results"}
    response = await client.post("/v1/threads", json=body, headers=patient(portals))
    assert response.status == 201, await response.text()
    return str((await response.json())["id"])


async def uploaded(client: Any, portals: Portals, thread_id: str, data: Any, content_type: str = PDF) -> str:
    response = await upload(client, patient(portals), thread_id, data, content_type)
    assert response.status == 201, await response.text()
    return str((await response.json())["id"])


# -- deterministic content, generated piece by piece -----------------------------------------------------


def pdf_pieces(total: int, piece: int = 50_000, seed: int = 7) -> Iterator[bytes]:
    """`total` bytes that start like a PDF, in pieces whose size is not a multiple of the chunk size."""
    rng = random.Random(seed)
    sent = 0
    while sent < total:
        size = min(piece, total - sent)
        data = rng.randbytes(size)
        if sent == 0:
            data = (b"%PDF-1.7\n" + data)[:size]
        sent += size
        yield data


async def streamed(pieces: Iterator[bytes]) -> AsyncIterator[bytes]:
    for data in pieces:
        yield data


def pdf(size: int) -> bytes:
    return b"".join(pdf_pieces(size))


async def collect(pieces: AsyncIterator[bytes], into: list[bytes]) -> None:
    """Read `pieces` to the end (or the error), keeping what arrived."""
    async for piece in pieces:
        into.append(piece)


# -- looking underneath, as the database owner -----------------------------------------------------------


async def stored(database: Dsns) -> tuple[int, int]:
    """(attachments, attachment_chunks) rows: committed ones, whoever wrote them."""

    async def count(conn: asyncpg.Connection) -> tuple[int, int]:
        return (
            await conn.fetchval("SELECT count(*) FROM attachments"),
            await conn.fetchval("SELECT count(*) FROM attachment_chunks"),
        )

    return await as_owner(database.owner, count)


_WRITES_IN_FLIGHT = """
    SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
    WHERE c.relname = 'attachment_chunks' AND l.pid <> pg_backend_pid()
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


# -- round trip ------------------------------------------------------------------------------------------


async def test_a_25_mib_file_round_trips_in_bounded_memory(client, portals: Portals, database: Dsns) -> None:
    thread_id = await open_thread(client, portals)
    expected = hashlib.sha256()
    for data in pdf_pieces(LIMIT):
        expected.update(data)

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        response = await upload(client, patient(portals), thread_id, streamed(pdf_pieces(LIMIT)), file_name="ct.pdf")
        created = await response.json()
        upload_growth = tracemalloc.get_traced_memory()[1] - base

        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        download = await client.get(f"{URL}/{created['id']}", headers=physician(portals))
        received, length = hashlib.sha256(), 0
        async for data in download.content.iter_chunked(CHUNK):
            received.update(data)
            length += len(data)
        download_growth = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()

    assert response.status == 201, created
    assert created == {
        "id": created["id"],
        "thread_id": thread_id,
        "content_type": PDF,
        "size": LIMIT,
        "file_name": "ct.pdf",
    }
    assert download.status == 200
    assert download.headers["Content-Type"] == PDF
    assert download.headers["Content-Length"] == str(LIMIT)
    assert download.headers["Content-Disposition"] == "attachment; filename*=UTF-8''ct.pdf"
    assert download.headers["X-Content-Type-Options"] == "nosniff"
    assert download.headers["Cache-Control"] == "no-store"
    assert (length, received.hexdigest()) == (LIMIT, expected.hexdigest())
    # The server (same process) never held the file: not on the way in, not on the way out.
    assert upload_growth < 8 * MIB, upload_growth
    assert download_growth < 8 * MIB, download_growth
    assert await stored(database) == (1, LIMIT // CHUNK)  # the last full chunk is the final one


async def test_small_files_keep_their_type_and_name(client, portals: Portals, database: Dsns) -> None:
    thread_id = await open_thread(client, portals)
    # A multi-byte character straddles the 64 KiB chunk boundary: still valid UTF-8.
    text = ("a" * (CHUNK - 1) + "é" + "fin\n").encode()
    files = [
        (TEXT, text, "résumé 2024.txt", "text/plain; charset=utf-8"),
        (PNG, b"\x89PNG\r\n\x1a\n" + bytes(100), "x-ray.png", PNG),
        (JPEG, b"\xff\xd8\xff\xe0" + bytes(10), "photo.jpg", JPEG),
        (PDF, b"%PDF-", "tiny.pdf", PDF),
    ]
    for content_type, data, name, served_as in files:
        response = await upload(client, patient(portals), thread_id, data, content_type, name)
        assert response.status == 201, await response.text()
        created = await response.json()
        assert (created["size"], created["file_name"]) == (len(data), name)

        download = await client.get(f"{URL}/{created['id']}", headers=patient(portals))
        assert download.status == 200
        assert await download.read() == data
        assert download.headers["Content-Type"] == served_as
        disposition = download.headers["Content-Disposition"]
        assert disposition.startswith("attachment; filename*=UTF-8''")
        assert unquote(disposition.removeprefix("attachment; filename*=UTF-8''")) == name
    assert (await stored(database))[0] == len(files)


# -- all or nothing --------------------------------------------------------------------------------------


async def test_an_upload_past_the_limit_is_413_and_stores_nothing(client, portals: Portals, database: Dsns) -> None:
    thread_id = await open_thread(client, portals)

    streaming = await upload(client, patient(portals), thread_id, streamed(pdf_pieces(LIMIT + 1)))
    assert streaming.status == 413
    assert (await streaming.json())["code"] == "payload-too-large"

    # Declared up front: refused before the body is read.
    declared = await upload(
        client, patient(portals), thread_id, b"%PDF-" + bytes(100), **{"Content-Length": str(LIMIT + 1)}
    )
    assert declared.status == 413
    assert await stored(database) == (0, 0)


async def test_a_file_of_exactly_the_limit_declared_and_a_file_of_one_byte_are_stored(
    settings: Settings, aiohttp_client: Any, portals: Portals, database: Dsns
) -> None:
    client = await limited_client(settings, aiohttp_client, max_attachment_bytes=2 * KIB)
    thread_id = await open_thread(client, portals)
    for content_type, data in ((PDF, pdf(2 * KIB)), (TEXT, b"a")):
        # bytes: the client declares the Content-Length, which is checked before the body is read.
        response = await upload(client, patient(portals), thread_id, data, content_type)
        assert response.status == 201, (len(data), await response.text())
        download = await client.get(f"{URL}/{(await response.json())['id']}", headers=patient(portals))
        assert await download.read() == data
    over = await upload(client, patient(portals), thread_id, pdf(2 * KIB + 1))
    assert over.status == 413
    assert await stored(database) == (2, 2)


async def test_content_that_is_not_its_declared_type_is_415_and_stores_nothing(
    client, portals: Portals, database: Dsns
) -> None:
    thread_id = await open_thread(client, portals)
    cases = [
        (PNG, pdf(3 * CHUNK)),  # a PDF declared as a PNG
        (PDF, b"\x89PNG\r\n\x1a\n" + bytes(1000)),
        (JPEG, b"\xff\xd8"),  # too short for the signature
        (TEXT, b"a" * (3 * CHUNK) + b"\xff" + b"a" * 100),  # invalid UTF-8 after chunks were written
        (TEXT, b"a" * (2 * CHUNK - 1) + "é".encode()[:1]),  # cut in the middle of a character
        (TEXT, b"plain text\x00with a NUL"),
    ]
    for content_type, data in cases:
        response = await upload(client, patient(portals), thread_id, data, content_type)
        assert response.status == 415, (content_type, response.status)
        assert (await response.json())["detail"] == "The content does not match its declared type"
    assert await stored(database) == (0, 0)


async def test_types_other_than_pdf_png_jpeg_and_utf8_text_are_415(client, portals: Portals, database: Dsns) -> None:
    thread_id = await open_thread(client, portals)
    for content_type in ("text/html", "application/octet-stream", "image/svg+xml", "text/plain; charset=latin-1"):
        response = await upload(client, patient(portals), thread_id, b"<html></html>", content_type)
        assert response.status == 415, content_type
        assert (await response.json())["code"] == "unsupported-media-type"
    assert (await upload(client, patient(portals), thread_id, b"%PDF-", None)).status == 415  # no type at all
    assert await stored(database) == (0, 0)


async def test_an_interrupted_upload_stores_nothing(client, portals: Portals, database: Dsns) -> None:
    thread_id = await open_thread(client, portals)
    watcher = await asyncpg.connect(database.owner)
    started = False

    async def crashing_portal() -> AsyncIterator[bytes]:
        nonlocal started
        yield b"%PDF-"
        for _ in range(5):
            yield bytes(60_000)
        for _ in range(250):  # until the server has written chunks in its (open) transaction
            if await watcher.fetchval(_WRITES_IN_FLIGHT):
                started = True
                break
            await asyncio.sleep(0.02)
        raise ConnectionAbortedError("the portal crashed mid-upload")

    try:
        with pytest.raises((aiohttp.ClientError, ConnectionAbortedError)):
            await upload(client, patient(portals), thread_id, crashing_portal())
        for _ in range(250):  # until the server's transaction has ended
            if not await watcher.fetchval(_WRITES_IN_FLIGHT):
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the interrupted upload's transaction never ended")
    finally:
        await watcher.close()

    assert started
    assert await stored(database) == (0, 0)
    await uploaded(client, portals, thread_id, pdf(1000))  # and the service is fine
    assert await stored(database) == (1, 1)


async def test_a_file_name_of_255_characters_is_kept_whole(client, portals: Portals) -> None:
    thread_id = await open_thread(client, portals)
    name = "é" * 251 + ".pdf"  # 255 characters (more bytes: the limit counts characters)
    response = await upload(client, patient(portals), thread_id, b"%PDF-", file_name=name)
    assert response.status == 201, await response.text()
    download = await client.get(f"{URL}/{(await response.json())['id']}", headers=physician(portals))
    disposition = download.headers["Content-Disposition"]
    assert unquote(disposition.removeprefix("attachment; filename*=UTF-8''")) == name


async def test_bad_uploads_are_refused_before_anything_is_stored(client, portals: Portals, database: Dsns) -> None:
    thread_id = await open_thread(client, portals)
    me = patient(portals)
    for name in ("../etc/passwd", "a\\b.pdf", "tab\there.pdf", "x" * 256, ".."):
        response = await upload(client, me, thread_id, b"%PDF-", file_name=name)
        assert response.status == 422, name
        assert (await response.json())["errors"][0]["loc"] == ["file_name"]
    missing = await client.post(
        URL, params={"thread_id": thread_id}, data=b"%PDF-", headers={**me, "Content-Type": PDF}
    )
    assert missing.status == 422
    assert (await missing.json())["errors"][0]["loc"] == ["Bedside-File-Name"]
    # Not percent-encoded (raw UTF-8, which would be stored garbled), or escapes that are not UTF-8.
    for raw in ("Röntgen.pdf", "scan%FF.pdf"):
        garbled = await client.post(
            URL,
            params={"thread_id": thread_id},
            data=b"%PDF-",
            headers={**me, "Content-Type": PDF, "Bedside-File-Name": raw},
        )
        assert garbled.status == 422, raw
        assert (await garbled.json())["errors"][0]["loc"] == ["Bedside-File-Name"]
    assert (await upload(client, me, "not-a-uuid", b"%PDF-")).status == 422
    assert (await upload(client, me, thread_id, b"", TEXT)).status == 422  # an empty file
    assert (await upload(client, me, str(uuid.uuid4()), b"%PDF-")).status == 404

    closed = await client.post(f"/v1/threads/{thread_id}/close", headers=me)
    assert closed.status == 200
    assert (await upload(client, me, thread_id, b"%PDF-")).status == 409
    assert await stored(database) == (0, 0)


# -- slow uploads hold a connection each: bounded per caller and in time --------------------------------------


async def limited_client(settings: Settings, aiohttp_client: Any, **limits: Any) -> Any:
    """The real application with the upload limits given, over HTTP on loopback."""
    return await aiohttp_client(create_app(settings.model_copy(update={"webhook_worker": False, **limits})))


async def test_a_callers_third_upload_at_once_is_429_while_another_callers_upload_goes_through(
    settings: Settings, aiohttp_client: Any, portals: Portals, database: Dsns
) -> None:
    # Room in the process for the two held uploads and the other caller's (the test pool has 4 connections).
    client = await limited_client(settings, aiohttp_client, max_uploads_per_principal=2, max_concurrent_uploads=3)
    thread_id = await open_thread(client, portals)
    release = asyncio.Event()
    slow = [asyncio.create_task(upload(client, patient(portals), thread_id, held(release))) for _ in range(2)]
    try:
        await uploads_in_flight(database.owner, 2)

        third = await upload(client, patient(portals), thread_id, pdf(1000))
        problem = await third.json(content_type=None)
        # The same subject in the same tenant is the same caller; a physician of the thread is another one.
        other = await upload(client, physician(portals), thread_id, pdf(1000))
    finally:
        release.set()
        done = await asyncio.gather(*slow)

    assert third.status == 429
    assert third.content_type == "application/problem+json"
    assert third.headers["Retry-After"] == "5"
    assert (problem["code"], problem["type"]) == ("too-many-uploads", "urn:bedside:problem:too-many-uploads")
    assert other.status == 201, await other.text()
    assert [r.status for r in done] == [201, 201]
    await uploaded(client, portals, thread_id, pdf(1000))  # with both ended, the caller may upload again
    assert await stored(database) == (4, 6)  # the held ones are a chunk and a bit: 2 chunks each


async def test_an_upload_past_the_process_connection_cap_is_503_stores_nothing_and_others_go_on(
    settings: Settings, aiohttp_client: Any, portals: Portals, database: Dsns
) -> None:
    """`BEDSIDE_MAX_CONCURRENT_UPLOADS` uploads of a process may hold a pooled connection at once: one more,
    from another caller, is refused with 503 once its first 64 KiB is in (everyone's doing, not theirs: no
    429), stores nothing, and the held upload is stored when its body comes; then the cap is free again."""
    client = await limited_client(settings, aiohttp_client, max_concurrent_uploads=1)
    thread_id = await open_thread(client, portals)
    release = asyncio.Event()
    holding = asyncio.create_task(upload(client, patient(portals), thread_id, held(release)))
    try:
        await uploads_in_flight(database.owner, 1)

        refused = await upload(client, physician(portals), thread_id, pdf(100_000))
        problem = await refused.json(content_type=None)
        assert await stored(database) == (0, 0)
    finally:
        release.set()
        first = await holding

    assert refused.status == 503
    assert refused.content_type == "application/problem+json"
    assert problem["code"] == "unavailable"
    assert first.status == 201, await first.text()
    assert await stored(database) == (1, 2)
    await uploaded(client, portals, thread_id, pdf(100_000))  # the connection is free again
    assert await stored(database) == (2, 4)


SLOW = "The upload sent too little for too long"


async def _timed_out(response: Any, detail: str) -> None:
    """A 408 upload-timeout problem with this detail, on a connection the service then closes."""
    problem = await response.json(content_type=None)
    assert response.status == 408
    assert response.content_type == "application/problem+json"
    assert response.headers["Connection"] == "close"
    assert (problem["code"], problem["detail"]) == ("upload-timeout", detail)


async def test_an_upload_past_its_deadline_is_408_stores_nothing_and_frees_its_slot(
    settings: Settings, aiohttp_client: Any, portals: Portals, database: Dsns
) -> None:
    # One upload per caller: the next one succeeds only if the late one gave its slot back.
    client = await limited_client(settings, aiohttp_client, max_uploads_per_principal=1, upload_deadline_seconds=1)
    thread_id = await open_thread(client, portals)

    with capture_logs() as logs:
        late = await upload(client, patient(portals), thread_id, trickle(pieces=40, every=0.1))  # 4 s in all
        await _timed_out(late, "The upload did not finish within the time allowed")

    timed_out = [e for e in logs if e["event"] == "attachment.upload_timed_out"]
    assert [(e["thread_id"], e["reason"], set(e) - {"size"}) for e in timed_out] == [
        (thread_id, "deadline", {"event", "log_level", "thread_id", "reason"})
    ]
    assert 5 <= timed_out[0]["size"] < 5 + 40 * 10
    assert await stored(database) == (0, 0)
    await uploads_in_flight(database.owner, 0)  # its transaction is over: no connection is left holding it
    await uploaded(client, portals, thread_id, pdf(1000))
    assert await stored(database) == (1, 1)


async def test_an_upload_that_sends_nothing_for_too_long_is_408_and_stores_nothing(
    settings: Settings, aiohttp_client: Any, portals: Portals, database: Dsns
) -> None:
    client = await limited_client(settings, aiohttp_client, upload_deadline_seconds=60, upload_idle_seconds=0.5)
    thread_id = await open_thread(client, portals)

    silent = await upload(client, patient(portals), thread_id, trickle(pieces=2, every=2))

    await _timed_out(silent, SLOW)
    assert await stored(database) == (0, 0)
    # Pieces closer together than the limit may take longer than it in all.
    await uploaded(client, portals, thread_id, trickle(pieces=4, every=0.2))
    assert await stored(database) == (1, 1)


async def test_a_slow_steady_upload_within_its_limits_is_not_cut_off_by_the_databases_idle_limit(
    settings: Settings, aiohttp_client: Any, portals: Portals, database: Dsns
) -> None:
    """The pool's connections end a transaction idle for twice the statement timeout (here 1 s). An
    upload's transaction is idle while the client sends its next chunk's worth: a steady upload slower
    than that, within its own deadline and limit on silence, is stored, not a 503 (the old answer)."""
    client = await limited_client(
        settings, aiohttp_client, db_statement_timeout_ms=500, upload_deadline_seconds=30, upload_idle_seconds=5
    )
    thread_id = await open_thread(client, portals)

    async def a_chunk_then_a_trickle() -> AsyncIterator[bytes]:
        yield pdf(CHUNK)  # the upload takes its connection: its transaction waits for the rest from here
        async for piece in trickle(pieces=8, every=0.25):  # 2 s in all
            yield piece

    response = await upload(client, patient(portals), thread_id, a_chunk_then_a_trickle())

    assert response.status == 201, await response.text()
    assert await stored(database) == (1, 2)


async def dribble(
    release: asyncio.Event, first: bytes = b"%PDF-", *, sending: asyncio.Event | None = None
) -> AsyncIterator[bytes]:
    """A portal that sends `first`, then a byte every 0.1 s until `release` is set; `sending` is set once
    it has been at it for half a second (by then the service has long had its request)."""
    yield first
    dots = 0
    while not release.is_set():
        await asyncio.sleep(0.1)
        yield b"."
        dots += 1
        if sending is not None and dots == 5:
            sending.set()


async def at_their_limit(client: Any, headers: dict[str, str], thread_id: str) -> None:
    """Wait until the caller has as many uploads in progress as they may: their next one is a 429. (Until
    then, the probe is refused with 415, its content not being a PDF: nothing is stored.)"""
    for _ in range(250):
        probe = await upload(client, headers, thread_id, b"no PDF")
        if probe.status == 429:
            return
        assert probe.status == 415, await probe.text()
        await asyncio.sleep(0.02)
    pytest.fail("the caller's uploads never took their slots")


async def test_uploads_waiting_for_their_first_chunk_take_no_connection_and_no_process_slot(
    settings: Settings, aiohttp_client: Any, portals: Portals, database: Dsns
) -> None:
    """The review's finding: four callers dribbling two uploads each took all 8 of a process's upload slots
    and 8 pooled connections, so everyone else's upload was a 503. An upload now takes neither before its
    first 64 KiB (or its whole body) has arrived: meanwhile it holds only its caller's slot (their third
    upload is a 429), no transaction, and another caller's upload is stored."""
    # A pool larger than the 8 slots, so that on the old code the slots, not the pool, refuse the upload.
    client = await limited_client(settings, aiohttp_client, db_pool_max=12, max_concurrent_uploads=8)
    doctors = ["Practitioner/7", "Practitioner/8", "Practitioner/9"]
    for doctor in doctors:
        await consent(client, portals, doctor)
    shared = (await thread(client, portals, participants=doctors, message=None))["id"]
    await consent(client, portals, "Practitioner/7", n=2)
    own = (await thread(client, portals, n=2, message=None))["id"]
    dribblers = [patient(portals), *(physician(portals, n) for n in (7, 8, 9))]
    release = asyncio.Event()
    sending = [asyncio.Event() for _ in range(2 * len(dribblers))]
    slow = [
        asyncio.create_task(upload(client, caller, shared, dribble(release, sending=sending[i])))
        for i, caller in enumerate(caller for caller in dribblers for _ in range(2))
    ]
    try:
        async with asyncio.timeout(30):  # a failure, not a hang, if a dribbler was answered early
            for event in sending:
                await event.wait()
            for caller in dribblers:
                await at_their_limit(client, caller, shared)
        honest = await upload(client, patient(portals, 2), own, pdf(1000))
        assert honest.status == 201, await honest.text()
        await uploads_in_flight(database.owner, 0)  # and none of the 8 holds a transaction
    finally:
        release.set()
        done = await asyncio.gather(*slow)

    assert [r.status for r in done] == [201] * 8  # once their bodies came, they were stored as ever
    assert await stored(database) == (9, 9)


async def test_an_upload_that_dribbles_after_its_first_chunk_is_408_within_the_idle_limit(
    settings: Settings, aiohttp_client: Any, portals: Portals, database: Dsns
) -> None:
    """Once an upload holds a connection, the service waits at most the idle limit, in all, for each further
    64 KiB. A byte every 0.1 s, far closer together than that limit, is not sending: it is cut about 1 s
    after the first chunk (the old code took all 10 s of it and stored it), nothing stored, and its slot
    and connection free."""
    client = await limited_client(
        settings, aiohttp_client, max_uploads_per_principal=1, upload_deadline_seconds=60, upload_idle_seconds=1
    )
    thread_id = await open_thread(client, portals)
    loop = asyncio.get_running_loop()
    first_sent = 0.0

    async def dribbling_portal() -> AsyncIterator[bytes]:
        nonlocal first_sent
        yield pdf(CHUNK)
        first_sent = loop.time()
        for _ in range(100):  # 10 s
            await asyncio.sleep(0.1)
            yield b"."

    with capture_logs() as logs:
        cut = await upload(client, patient(portals), thread_id, dribbling_portal())
        elapsed = loop.time() - first_sent
        await _timed_out(cut, SLOW)

    assert 0.9 <= elapsed < 4.0, elapsed  # about the idle limit (1 s), not the 10 s of the dribble
    timed_out = [e for e in logs if e["event"] == "attachment.upload_timed_out"]
    assert [(e["thread_id"], e["reason"], set(e) - {"size"}) for e in timed_out] == [
        (thread_id, "idle", {"event", "log_level", "thread_id", "reason"})
    ]
    assert CHUNK <= timed_out[0]["size"] < CHUNK + 40
    assert await stored(database) == (0, 0)
    await uploads_in_flight(database.owner, 0)
    await uploaded(client, portals, thread_id, pdf(1000))  # the caller's one slot is free again
    assert await stored(database) == (1, 1)


async def test_a_steady_slow_upload_is_stored_while_a_dribble_beside_it_is_cut(
    settings: Settings, aiohttp_client: Any, portals: Portals, database: Dsns
) -> None:
    """The same limits tell the two apart: 16 KiB every 0.1 s (64 KiB in 0.4 s, 2.4 s in all, more than
    twice the idle limit) is stored whole; a byte every 0.1 s after the first chunk is a 408."""
    client = await limited_client(settings, aiohttp_client, upload_deadline_seconds=60, upload_idle_seconds=1)
    thread_id = await open_thread(client, portals)
    size = 6 * CHUNK

    async def steady() -> AsyncIterator[bytes]:
        for piece in pdf_pieces(size, piece=16 * KIB):
            yield piece
            await asyncio.sleep(0.1)

    release = asyncio.Event()
    stop = asyncio.get_running_loop().call_later(10, release.set)  # the old code let the dribble go on
    try:
        slow, dribbled = await asyncio.gather(
            upload(client, patient(portals), thread_id, steady()),
            upload(client, physician(portals), thread_id, dribble(release, first=pdf(CHUNK))),
        )
    finally:
        stop.cancel()
        release.set()

    assert slow.status == 201, await slow.text()
    await _timed_out(dribbled, SLOW)
    assert await stored(database) == (1, 6)
    download = await client.get(f"{URL}/{(await slow.json())['id']}", headers=patient(portals))
    assert await download.read() == b"".join(pdf_pieces(size, piece=16 * KIB))


# -- who may --------------------------------------------------------------------------------------------


async def test_only_those_who_may_read_the_thread_download_and_only_writers_upload(
    client, portals: Portals, database: Dsns
) -> None:
    thread_id = await open_thread(client, portals)
    data = pdf(100_000)
    attachment_id = await uploaded(client, portals, thread_id, data)
    url = f"{URL}/{attachment_id}"

    outsiders = [
        patient(portals, 2),
        physician(portals, 99),
        portals.acme.auth(role="compliance", sub="Practitioner/c1"),
        portals.acme.auth(role="admin", sub="Practitioner/admin1"),
        portals.globex.auth(role="patient", sub="Patient/1"),  # another tenant's Patient/1
    ]
    for headers in outsiders:
        assert (await client.get(url, headers=headers)).status == 404
        assert (await upload(client, headers, thread_id, b"%PDF-")).status == 404
    assert (await client.get(f"{URL}/{uuid.uuid4()}", headers=patient(portals))).status == 404
    assert (await client.get(f"{URL}/not-a-uuid", headers=patient(portals))).status == 404

    # Break-glass: the physician reads the thread with a reason, then may read (only read) its files.
    outsider = physician(portals, 99)
    assert (await client.get(f"/v1/threads/{thread_id}", headers={**outsider, **BREAK_GLASS})).status == 200
    download = await client.get(url, headers=outsider)
    assert download.status == 200
    assert await download.read() == data
    assert (await upload(client, outsider, thread_id, b"%PDF-")).status == 404
    assert await stored(database) == (1, 2)

    reads = await audit_events(database.owner, "action = $1", "attachment:read")
    assert ("Practitioner/99", "success", "ETREAT", attachment_id) in [
        (r["actor"], r["outcome"], r["purpose"], r["resource_id"]) for r in reads
    ]
    uploads = await audit_events(database.owner, "action = $1", "attachment:upload")
    assert [(r["actor"], r["outcome"], r["resource_id"]) for r in uploads] == [("Patient/1", "success", attachment_id)]


async def test_an_upload_is_audited_with_its_type_size_chunks_and_consent(
    client, portals: Portals, database: Dsns
) -> None:
    thread_id = await open_thread(client, portals)
    history = await (await client.get("/v1/patients/1/consents", headers=patient(portals))).json()
    attachment_id = await uploaded(client, portals, thread_id, pdf(CHUNK + 100))  # a full chunk and a final one

    (event,) = await audit_events(database.owner, "action = $1", "attachment:upload")
    assert (event["actor"], event["patient"], event["resource_id"]) == ("Patient/1", "Patient/1", attachment_id)
    assert json.loads(event["details"]) == {
        "thread_id": thread_id,
        "content_type": PDF,
        "size": CHUNK + 100,
        "chunks": 2,
        "consent_decision": "permit",
        "consent_ids": [history["in_force"][0]["id"]],
    }
    assert await stored(database) == (1, 2)


async def test_a_revoked_consent_stops_uploads(client, portals: Portals, database: Dsns) -> None:
    thread_id = await open_thread(client, portals)
    history = await (await client.get("/v1/patients/1/consents", headers=patient(portals))).json()
    consent_id = history["in_force"][0]["id"]
    revoked = await client.post(
        f"/v1/consents/{consent_id}/revoke", json={"reason": "patient-request"}, headers=patient(portals)
    )
    assert revoked.status == 200

    response = await upload(client, patient(portals), thread_id, b"%PDF-")
    assert response.status == 403
    assert (await response.json())["code"] == "consent-required"
    assert await stored(database) == (0, 0)


async def test_a_shredded_patients_attachment_is_gone(client, portals: Portals, database: Dsns) -> None:
    thread_id = await open_thread(client, portals)
    attachment_id = await uploaded(client, portals, thread_id, pdf(1000))
    admin = portals.acme.auth(role="admin", sub="Practitioner/admin1")
    shred = {"patient": "Patient/1", "confirm": "Patient/1"}
    assert (await client.post("/v1/admin/keys/shred", json=shred, headers=admin)).status == 200

    response = await client.get(f"{URL}/{attachment_id}", headers=patient(portals))
    assert response.status == 410
    assert (await response.json())["code"] == "content-shredded"
    assert (await upload(client, patient(portals), thread_id, b"%PDF-")).status == 410
    failed = await audit_events(database.owner, "action = $1 AND outcome = $2", "attachment:read", "failure")
    assert [(e["actor"], e["resource_id"], json.loads(e["details"])) for e in failed] == [
        ("Patient/1", str(attachment_id), {"thread_id": thread_id, "reason": "shredded"})
    ]


# -- tampering is an error, never a file ----------------------------------------------------------------

ORIGINAL = pdf(3 * CHUNK + 10_000)  # chunks 0, 1, 2 full; 3 the final one


async def _chunk(conn: asyncpg.Connection, attachment_id: uuid.UUID, idx: int) -> bytes:
    return bytes(
        await conn.fetchval(
            "SELECT data FROM attachment_chunks WHERE attachment_id = $1 AND idx = $2", attachment_id, idx
        )
    )


async def _set_chunk(conn: asyncpg.Connection, attachment_id: uuid.UUID, idx: int, data: bytes) -> None:
    await conn.execute(
        "UPDATE attachment_chunks SET data = $3 WHERE attachment_id = $1 AND idx = $2", attachment_id, idx, data
    )


async def _fix_counts(conn: asyncpg.Connection, attachment_id: uuid.UUID, chunks: int, size: int) -> None:
    # Cover the tracks: the row's counts agree with the tampered chunks, so only the crypto can tell.
    await conn.execute("UPDATE attachments SET chunks = $2, size = $3 WHERE id = $1", attachment_id, chunks, size)


async def flip_a_byte_at(conn: asyncpg.Connection, attachment_id: uuid.UUID, idx: int) -> None:
    data = bytearray(await _chunk(conn, attachment_id, idx))
    data[500] ^= 0x01
    await _set_chunk(conn, attachment_id, idx, bytes(data))


async def flip_a_byte(conn: asyncpg.Connection, attachment_id: uuid.UUID) -> None:
    await flip_a_byte_at(conn, attachment_id, 1)


async def swap_two_chunks(conn: asyncpg.Connection, attachment_id: uuid.UUID) -> None:
    first, second = await _chunk(conn, attachment_id, 1), await _chunk(conn, attachment_id, 2)
    await _set_chunk(conn, attachment_id, 1, second)
    await _set_chunk(conn, attachment_id, 2, first)


async def drop_a_chunk(conn: asyncpg.Connection, attachment_id: uuid.UUID) -> None:
    await conn.execute("DELETE FROM attachment_chunks WHERE attachment_id = $1 AND idx = 1", attachment_id)
    for idx in (2, 3):  # close the gap
        await conn.execute(
            "UPDATE attachment_chunks SET idx = $2 - 1 WHERE attachment_id = $1 AND idx = $2", attachment_id, idx
        )
    await _fix_counts(conn, attachment_id, 3, len(ORIGINAL) - CHUNK)


async def duplicate_a_chunk(conn: asyncpg.Connection, attachment_id: uuid.UUID) -> None:
    for idx in (3, 2):  # make room after chunk 1, then put a copy of it there
        await conn.execute(
            "UPDATE attachment_chunks SET idx = $2 + 1 WHERE attachment_id = $1 AND idx = $2", attachment_id, idx
        )
    await conn.execute(
        "INSERT INTO attachment_chunks (tenant_id, attachment_id, idx, data) "
        "SELECT tenant_id, attachment_id, 2, data FROM attachment_chunks WHERE attachment_id = $1 AND idx = 1",
        attachment_id,
    )
    await _fix_counts(conn, attachment_id, 5, len(ORIGINAL) + CHUNK)


async def truncate_the_end(conn: asyncpg.Connection, attachment_id: uuid.UUID) -> None:
    await conn.execute("DELETE FROM attachment_chunks WHERE attachment_id = $1 AND idx = 3", attachment_id)
    await _fix_counts(conn, attachment_id, 3, 3 * CHUNK)


@pytest.mark.parametrize(
    "tamper",
    [flip_a_byte, swap_two_chunks, drop_a_chunk, duplicate_a_chunk, truncate_the_end],
    ids=lambda t: t.__name__,
)
async def test_a_tampered_attachment_is_an_error_status_not_bytes(
    client, portals: Portals, database: Dsns, tamper: Callable[[asyncpg.Connection, uuid.UUID], Awaitable[None]]
) -> None:
    thread_id = await open_thread(client, portals)
    attachment_id = await uploaded(client, portals, thread_id, ORIGINAL)
    intact = await client.get(f"{URL}/{attachment_id}", headers=patient(portals))
    assert await intact.read() == ORIGINAL
    await as_owner(database.owner, lambda conn: tamper(conn, uuid.UUID(attachment_id)))

    response = await client.get(f"{URL}/{attachment_id}", headers=patient(portals))

    assert response.status == 500
    assert response.content_type == "application/problem+json"
    body = await response.read()
    assert len(body) < 1000
    assert ORIGINAL[CHUNK : CHUNK + 64] not in body
    failures = await audit_events(database.owner, "action = $1 AND outcome = $2", "attachment:read", "failure")
    assert [(r["actor"], r["resource_id"]) for r in failures] == [("Patient/1", attachment_id)]


async def test_tampering_between_verification_and_streaming_cuts_the_transfer_short(
    client, portals: Portals, database: Dsns, monkeypatch: pytest.MonkeyPatch
) -> None:
    thread_id = await open_thread(client, portals)
    size = 40 * CHUNK + 123
    attachment_id = await uploaded(client, portals, thread_id, streamed(pdf_pieces(size)))
    data = pdf(size)
    pages = 0
    original = AttachmentStore.chunks

    async def chunks_then_tamper(self: AttachmentStore, tx: Any, *args: Any) -> Any:
        nonlocal pages
        pages += 1
        if pages == 9:  # pass 1 read 6 pages; pass 2 is on its third
            await as_owner(database.owner, lambda conn: flip_a_byte_at(conn, uuid.UUID(attachment_id), 30))
        return await original(self, tx, *args)

    monkeypatch.setattr(AttachmentStore, "chunks", chunks_then_tamper)
    response = await client.get(f"{URL}/{attachment_id}", headers=patient(portals))
    assert response.status == 200  # verified: the headers went out
    received: list[bytes] = []
    with pytest.raises(aiohttp.ClientPayloadError):
        await collect(response.content.iter_chunked(CHUNK), received)
    got = b"".join(received)
    assert 0 < len(got) < len(data)  # visibly incomplete: never a complete-looking file
    assert got == data[: len(got)]


async def test_the_stream_never_releases_its_last_piece_unproven(client, app, portals: Portals, database: Dsns) -> None:
    thread_id = await open_thread(client, portals)
    attachment_id = uuid.UUID(await uploaded(client, portals, thread_id, ORIGINAL))
    tenant_id = await as_owner(database.owner, lambda conn: conn.fetchval("SELECT id FROM tenants WHERE slug = 'acme'"))
    me = Principal(tenant_id, "acme", "Patient/1", Role.PATIENT, portals.acme.issuer)

    download = await app[ATTACHMENTS].download(me, attachment_id)  # verified whole
    await as_owner(database.owner, lambda conn: truncate_the_end(conn, attachment_id))  # then cut short
    released: list[bytes] = []
    with pytest.raises(DecryptionError):
        await collect(download.chunks, released)
    assert b"".join(released) == ORIGINAL[: 2 * CHUNK]  # chunk 2 was held back: nothing proved it complete


# -- references from messages --------------------------------------------------------------------------


async def test_messages_may_reference_only_complete_attachments_of_their_thread(
    client, portals: Portals, database: Dsns, services: Services
) -> None:
    thread_id = await open_thread(client, portals)
    other_thread = await open_thread(client, portals, consent=False)
    mine = uuid.UUID(await uploaded(client, portals, thread_id, b"%PDF-1"))
    elsewhere = uuid.UUID(await uploaded(client, portals, other_thread, b"%PDF-2"))

    async def incomplete_one(conn: asyncpg.Connection) -> tuple[uuid.UUID, uuid.UUID]:
        tenant_id, attachment_id = await conn.fetchval("SELECT id FROM tenants WHERE slug = 'acme'"), uuid.uuid4()
        await conn.execute(
            "INSERT INTO attachments (tenant_id, id, thread_id, uploaded_by, content_type, file_name) "
            "VALUES ($1, $2, $3, 'Patient/1', 'application/pdf', '\\x00')",
            tenant_id,
            attachment_id,
            uuid.UUID(thread_id),
        )
        return tenant_id, attachment_id

    tenant_id, incomplete = await as_owner(database.owner, incomplete_one)
    references = AttachmentReferences(AttachmentStore())
    async with services.db.transaction(tenant_id) as tx:
        await references.check_attachments(tx, tenant_id, uuid.UUID(thread_id), [mine])
        await references.check_attachments(tx, tenant_id, uuid.UUID(thread_id), [])
        with pytest.raises(InvalidRequestError) as refused:
            await references.check_attachments(
                tx, tenant_id, uuid.UUID(thread_id), [mine, elsewhere, uuid.uuid4(), incomplete, mine]
            )
    assert [(p.loc, p.type) for p in refused.value.problems] == [
        (("attachment_ids", 1), "unknown"),
        (("attachment_ids", 2), "unknown"),
        (("attachment_ids", 3), "unknown"),
        (("attachment_ids", 4), "duplicate"),
    ]

    # And through the API, as MessagingService.send checks it.
    url = f"/v1/threads/{thread_id}/messages"
    sent = await client.post(
        url, json={"body": "See attached", "attachment_ids": [str(mine)]}, headers=patient(portals)
    )
    assert sent.status == 201, await sent.text()
    assert (await sent.json())["attachment_ids"] == [str(mine)]
    foreign = await client.post(url, json={"body": "x", "attachment_ids": [str(elsewhere)]}, headers=patient(portals))
    assert foreign.status == 422
    assert (await foreign.json())["errors"][0]["loc"] == ["attachment_ids", 0]


async def test_a_message_carries_up_to_20_attachments(client, portals: Portals) -> None:
    thread_id = await open_thread(client, portals)
    ids = [await uploaded(client, portals, thread_id, b"%PDF-" + bytes([n])) for n in range(21)]
    url = f"/v1/threads/{thread_id}/messages"
    sent = await client.post(url, json={"body": "All my scans", "attachment_ids": ids[:20]}, headers=patient(portals))
    assert sent.status == 201, await sent.text()
    read = await client.get(f"/v1/messages/{(await sent.json())['id']}", headers=physician(portals))
    assert (await read.json())["attachment_ids"] == ids[:20]
    too_many = await client.post(url, json={"body": "One more", "attachment_ids": ids}, headers=patient(portals))
    assert too_many.status == 422
    assert [e["loc"] for e in (await too_many.json())["errors"]] == [["attachment_ids"]]


async def test_a_recalled_message_takes_its_attachments_with_it(client, portals: Portals, database: Dsns) -> None:
    thread_id = await open_thread(client, portals)
    url = f"/v1/threads/{thread_id}/messages"
    withdrawn = await uploaded(client, portals, thread_id, pdf(1000))
    shared = await uploaded(client, portals, thread_id, pdf(2000))

    async def send(*attachment_ids: str) -> str:
        sent = await client.post(
            url, json={"body": "See attached", "attachment_ids": list(attachment_ids)}, headers=patient(portals)
        )
        assert sent.status == 201, await sent.text()
        return str((await sent.json())["id"])

    recalled_id = await send(withdrawn, shared)
    await send(shared)  # `shared` also belongs to a message that stays
    recall = await client.post(f"/v1/messages/{recalled_id}/recall", headers=patient(portals))
    assert recall.status == 200
    assert (await recall.json())["attachment_ids"] == []

    # The tombstone lists no attachments, however it is read.
    for headers in (patient(portals), physician(portals)):
        one = await (await client.get(f"/v1/messages/{recalled_id}", headers=headers)).json()
        assert (one["body"], one["attachment_ids"]) == (None, [])
        page = await (await client.get(url, headers=headers)).json()
        assert [m["attachment_ids"] for m in page["items"]] == [[], [shared]]

    # An attachment of recalled messages only is gone, for the sender too; one still sent elsewhere is not.
    for headers in (patient(portals), physician(portals)):
        gone = await client.get(f"{URL}/{withdrawn}", headers=headers)
        assert gone.status == 410
        problem = await gone.json()
        assert (problem["code"], problem["type"]) == ("content-recalled", "urn:bedside:problem:content-recalled")
        assert problem["recalled_at"]
        assert (await client.get(f"{URL}/{shared}", headers=headers)).status == 200
    assert (await client.get(f"{URL}/{withdrawn}", headers=physician(portals, 99))).status == 404

    # Nor can a new message bring it back.
    again = await client.post(url, json={"body": "x", "attachment_ids": [withdrawn]}, headers=physician(portals))
    assert again.status == 422
    assert [(e["loc"], e["type"]) for e in (await again.json())["errors"]] == [(["attachment_ids", 0], "recalled")]

    refusals = await audit_events(database.owner, "action = $1 AND outcome = $2", "attachment:read", "denied")
    assert sorted((r["actor"], r["resource_id"], json.loads(r["details"])["reason"]) for r in refusals) == [
        ("Patient/1", withdrawn, "recalled"),
        ("Practitioner/7", withdrawn, "recalled"),
    ]


# -- no PHI anywhere but in its ciphertext ---------------------------------------------------------------


async def test_canaries_in_file_names_and_content_stay_in_their_ciphertext(
    client, portals: Portals, database: Dsns
) -> None:
    name_canary, content_canary = canary("filename"), canary("content")
    name = f"{name_canary}.txt"
    text = (("Results: " + content_canary + "\n") * 4000).encode()  # several chunks, the canary in each
    thread_id = await open_thread(client, portals)

    with capture_logs() as logs:  # raw: before the allow-list could drop anything
        attachment_id = (await (await upload(client, patient(portals), thread_id, text, TEXT, name)).json())["id"]
        download = await client.get(f"{URL}/{attachment_id}", headers=physician(portals))
        assert await download.read() == text
        errors = [
            await upload(client, patient(portals), thread_id, text, TEXT, f"../{name}"),
            await upload(client, patient(portals), thread_id, text, PNG, name),
            await upload(client, patient(portals), thread_id, text + b"\x00" + text, TEXT, name),
            await upload(client, patient(portals), str(uuid.uuid4()), text, TEXT, name),
            await upload(client, physician(portals, 99), thread_id, text, TEXT, name),
            await upload(client, patient(portals), thread_id, text, "text/html", name),
        ]
        error_bodies = [await e.text() for e in errors]
    assert [e.status for e in errors] == [422, 415, 415, 404, 404, 415]

    canaries = (name_canary, content_canary)
    for text_out in (*error_bodies, repr(logs)):
        assert not [c for c in canaries if c in text_out]

    async def raw(conn: asyncpg.Connection) -> list[bytes]:
        names = [bytes(r["file_name"]) for r in await conn.fetch("SELECT file_name FROM attachments")]
        chunks = [bytes(r["data"]) for r in await conn.fetch("SELECT data FROM attachment_chunks")]
        audit = [
            bytes(r["entry"])
            for r in await conn.fetch("SELECT entry FROM audit_outbox UNION ALL SELECT entry FROM audit_leaves")
        ]
        return [*names, *chunks, *audit]

    rows = await as_owner(database.owner, raw)
    assert len(rows) > 5
    assert not [c for c in canaries for row in rows if c.encode() in row]
    dump = await asyncio.to_thread(
        subprocess.run,
        [
            str(find_pg_bindir() / "pg_dump"),
            "--dbname",
            database.owner,
            "--data-only",
            "--table=attachments",
            "--table=attachment_chunks",
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    assert len(dump.stdout) > len(text)  # the ciphertext is in there
    assert not [c for c in canaries if c.encode() in dump.stdout]
