"""A database that goes away mid-request (a failover, a restart, an operator ending backends), turns new
connections away or takes no writes is an outage, not a fault of ours: 503 problem+json with Retry-After,
nothing written, and the next request is served on a fresh connection once the server takes it."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
from aiohttp import ClientResponse

from tests.api.messaging_helpers import consent, patient, thread
from tests.conftest import Dsns, Portals
from tests.support import (
    as_owner,
    blocked_by,
    database_connection_limit,
    database_read_only,
    end_service_sessions,
)


async def _assert_unavailable(response: ClientResponse) -> None:
    assert response.status == 503, await response.text()
    assert response.content_type == "application/problem+json"
    assert response.headers["Retry-After"] == "5"
    problem = await response.json(content_type="application/problem+json")
    assert (problem["status"], problem["code"]) == (503, "unavailable")
    assert problem["request_id"] == response.headers["X-Request-Id"]


async def _messages(owner: asyncpg.Connection, thread_id: str) -> int:
    return int(await owner.fetchval("SELECT count(*) FROM messages WHERE thread_id = $1::uuid", thread_id))


async def test_a_send_whose_backend_is_terminated_mid_statement_answers_503_and_writes_nothing(
    client, portals: Portals, database: Dsns
) -> None:
    """The send waits for the thread's row lock when its backend is ended: the server's 57P01
    admin_shutdown, what a fast shutdown or a failover manager's pg_terminate_backend sends to every session,
    which asyncpg reports as the connection closed mid-operation (08003)."""
    await consent(client, portals)
    created = await thread(client, portals)
    url = f"/v1/threads/{created['id']}/messages"
    owner = await asyncpg.connect(database.owner)
    locker = await asyncpg.connect(database.owner)
    sending: asyncio.Task[ClientResponse] | None = None
    try:
        async with locker.transaction():
            await locker.execute("SELECT 1 FROM threads WHERE id = $1::uuid FOR UPDATE", created["id"])
            sending = asyncio.create_task(client.post(url, json={"body": "mid-failover"}, headers=patient(portals)))
            backend = await blocked_by(owner, locker.get_server_pid())
            assert await owner.fetchval("SELECT application_name FROM pg_stat_activity WHERE pid = $1", backend) == (
                "bedside"
            )
            assert await owner.fetchval("SELECT pg_terminate_backend($1)", backend)
            refused = await sending
        await _assert_unavailable(refused)
        assert await _messages(owner, created["id"]) == 1  # only the thread's first message

        again = await client.post(url, json={"body": "after the failover"}, headers=patient(portals))
        assert again.status == 201, await again.text()
        assert await _messages(owner, created["id"]) == 2
    finally:
        if sending is not None and not sending.done():  # a check above failed: the send must not outlive it
            sending.cancel()
            with contextlib.suppress(BaseException):
                await sending
        await locker.close()
        await owner.close()


async def test_a_server_that_turns_new_connections_away_answers_503_until_it_takes_them_again(
    client, portals: Portals, database: Dsns
) -> None:
    """The service's sessions are ended and the server refuses new ones (SQLSTATE 53300
    too_many_connections, here from the database's connection limit, as when max_connections is reached).
    More requests than the pool holds: whether one meets a pooled connection that just died or asks for a
    new one, the answer is 503; once the server accepts connections again, so does the service."""
    await consent(client, portals)
    created = await thread(client, portals)
    url = f"/v1/threads/{created['id']}"
    async with database_connection_limit(database.owner, database.name, 0):
        ended = await end_service_sessions(database.owner)
        assert ended >= 1  # the pool had connections: some requests meet one that has died
        for _ in range(6):  # the suite's pool holds at most 4
            await _assert_unavailable(await client.get(url, headers=patient(portals)))

    served = await client.get(url, headers=patient(portals))
    assert served.status == 200, await served.text()


async def test_a_write_to_a_server_that_refuses_writes_answers_503(client, portals: Portals, database: Dsns) -> None:
    """A failover demoted the server the service's connections reach to a read-only one (25006
    read_only_sql_transaction, as from a hot standby): a send is a 503 to retry, not a 500, and nothing is
    written. Once the server takes writes again, so does the service: a connection opened while it did
    not refuses at most one more write, and is dropped for a new one."""
    await consent(client, portals)
    created = await thread(client, portals)
    url = f"/v1/threads/{created['id']}/messages"
    async with database_read_only(database.owner, database.name):
        await end_service_sessions(database.owner)  # its next connections are opened read-only
        await _assert_unavailable(await client.post(url, json={"body": "refused"}, headers=patient(portals)))
    assert await as_owner(database.owner, lambda conn: _messages(conn, created["id"])) == 1

    statuses = []
    for _ in range(5):  # the suite's pool holds at most 4
        sent = await client.post(url, json={"body": "after the failover"}, headers=patient(portals))
        statuses.append(sent.status)
        if sent.status != 503:
            break
    assert statuses[-1] == 201, statuses


async def test_a_read_whose_only_write_is_its_audit_event_drops_a_read_only_connection(
    client, portals: Portals, database: Dsns
) -> None:
    """A read writes one row, its audit event. On a read-only server that insert is refused with 25006:
    a 503, and the connection is dropped like any other that met the outage, so that reads recover once
    the server takes writes again (a connection kept would refuse every audited read for good)."""
    await consent(client, portals)
    created = await thread(client, portals)
    url = f"/v1/threads/{created['id']}"
    async with database_read_only(database.owner, database.name):
        await end_service_sessions(database.owner)
        for _ in range(5):  # more than the suite's pool holds: every connection it opens now is read-only
            await _assert_unavailable(await client.get(url, headers=patient(portals)))

    statuses = []
    for _ in range(5):
        read = await client.get(url, headers=patient(portals))
        statuses.append(read.status)
        if read.status != 503:
            break
    assert statuses[-1] == 200, statuses
