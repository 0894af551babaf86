"""`/v1/threads`, `/v1/messages`, break-glass review and care teams: thin handlers over MessagingService."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from uuid import UUID

from aiohttp import web

from schemas.messaging import (
    BreakGlassListOut,
    BreakGlassOut,
    BreakGlassQuery,
    CareTeamBody,
    CareTeamMembersBody,
    CareTeamOut,
    MembershipOut,
    MessageBody,
    MessageListOut,
    MessageListQuery,
    MessageOut,
    ReadBody,
    ReceiptOut,
    ThreadBody,
    ThreadListOut,
    ThreadListQuery,
    ThreadOut,
)
from service.api.bodies import parse_query, read_json
from service.api.headers import BREAK_GLASS_REASON, IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED
from service.api.paths import TEAM_ID, path_uuid
from service.domain.messaging import MessageView, ThreadView
from service.errors import FieldProblem, InvalidRequestError
from service.keys import MESSAGING, PRINCIPAL


def message_out(view: MessageView) -> MessageOut:
    record = view.record
    return MessageOut(
        id=record.id,
        thread_id=record.thread_id,
        seq=record.seq,
        sender=record.sender,
        sender_role=record.sender_role,
        body=view.body,
        in_reply_to=record.in_reply_to,
        attachment_ids=list(view.attachment_ids),
        created_at=record.created_at,
        recalled_at=record.recalled_at,
        recalled_by=record.recalled_by,
    )


def thread_out(view: ThreadView, message: MessageView | None = None) -> ThreadOut:
    record = view.record
    return ThreadOut(
        id=record.id,
        patient=record.patient,
        participants=list(record.participants),
        subject=view.subject,
        priority=record.priority,
        sensitive=record.sensitive,
        status=record.status,
        created_by=record.created_by,
        created_at=record.created_at,
        closed_at=record.closed_at,
        last_seq=record.last_seq,
        last_activity=record.last_activity,
        unread=view.unread,
        access=view.access.value,  # type: ignore[arg-type]
        receipts=None
        if view.receipts is None
        else [ReceiptOut(reader=r.reader, up_to=r.up_to, read_at=r.read_at) for r in view.receipts],
        message=None if message is None else message_out(message),
        shredded_at=view.shredded_at,
    )


def _json(
    model: ThreadOut | MessageOut | ThreadListOut | MessageListOut | BreakGlassListOut | CareTeamOut | ReceiptOut,
    status: int = 200,
    replayed: bool = False,
) -> web.Response:
    headers = IDEMPOTENT_REPLAYED.fixed() if replayed else None
    # Serialized by pydantic-core straight to JSON: a page of 50 messages in about a third of the time
    # of model_dump + json.dumps. The same values (its JSON mode serializes both), compact and in UTF-8.
    return web.json_response(text=model.model_dump_json(), status=status, headers=headers)


def decode_cursor(value: str | None) -> tuple[datetime, UUID] | None:
    if value is None:
        return None
    try:
        when, ident = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode().split("|")
        moment = datetime.fromisoformat(when)
        moment.astimezone(UTC)  # a forged cursor whose time cannot be converted is not one of ours
        return moment, UUID(ident)
    except (ValueError, UnicodeDecodeError, OverflowError):
        raise InvalidRequestError([FieldProblem(("cursor",), "cursor", "not a cursor from this listing")]) from None


def encode_cursor(cursor: tuple[datetime, UUID] | None) -> str | None:
    if cursor is None:
        return None
    return base64.urlsafe_b64encode(f"{cursor[0].isoformat()}|{cursor[1]}".encode()).decode().rstrip("=")


async def create_thread(request: web.Request) -> web.Response:
    body = await read_json(request, ThreadBody)
    thread, message = await request.app[MESSAGING].create_thread(
        request[PRINCIPAL],
        patient=body.patient,
        participants=body.participants,
        subject=body.subject,
        priority=body.priority,
        sensitive=body.sensitive,
        first_message=None if body.message is None else body.message.body,
        idempotency_key=IDEMPOTENCY_KEY.read(request),
    )
    return _json(thread_out(thread, message), 201, replayed=thread.replayed)


async def list_threads(request: web.Request) -> web.Response:
    query = parse_query(request, ThreadListQuery)
    page = await request.app[MESSAGING].list_threads(
        request[PRINCIPAL],
        patient=query.patient,
        status=query.status,
        unread_only=query.unread,
        cursor=decode_cursor(query.cursor),
        limit=query.limit,
    )
    return _json(ThreadListOut(items=[thread_out(v) for v in page.items], next_cursor=encode_cursor(page.next_cursor)))


async def get_thread(request: web.Request) -> web.Response:
    view = await request.app[MESSAGING].get_thread(
        request[PRINCIPAL], path_uuid(request, "Thread"), BREAK_GLASS_REASON.text(request)
    )
    return _json(thread_out(view))


async def close_thread(request: web.Request) -> web.Response:
    return _json(
        thread_out(await request.app[MESSAGING].close_thread(request[PRINCIPAL], path_uuid(request, "Thread")))
    )


async def send_message(request: web.Request) -> web.Response:
    thread_id = path_uuid(request, "Thread")
    body = await read_json(request, MessageBody)
    view = await request.app[MESSAGING].send(
        request[PRINCIPAL],
        thread_id,
        body.body,
        attachment_ids=body.attachment_ids,
        in_reply_to=body.in_reply_to,
        idempotency_key=IDEMPOTENCY_KEY.read(request),
    )
    return _json(message_out(view), 201, replayed=view.replayed)


async def list_messages(request: web.Request) -> web.Response:
    query = parse_query(request, MessageListQuery)
    views = await request.app[MESSAGING].messages(
        request[PRINCIPAL],
        path_uuid(request, "Thread"),
        after=query.after,
        before=query.before,
        limit=query.limit,
        break_glass_reason=BREAK_GLASS_REASON.text(request),
    )
    return _json(MessageListOut(items=[message_out(v) for v in views]))


async def get_message(request: web.Request) -> web.Response:
    return _json(message_out(await request.app[MESSAGING].message(request[PRINCIPAL], path_uuid(request, "Message"))))


async def mark_read(request: web.Request) -> web.Response:
    thread_id = path_uuid(request, "Thread")
    body = await read_json(request, ReadBody)
    receipt = await request.app[MESSAGING].mark_read(request[PRINCIPAL], thread_id, body.up_to)
    return _json(ReceiptOut(reader=receipt.reader, up_to=receipt.up_to, read_at=receipt.read_at))


async def recall_message(request: web.Request) -> web.Response:
    return _json(message_out(await request.app[MESSAGING].recall(request[PRINCIPAL], path_uuid(request, "Message"))))


async def list_break_glass(request: web.Request) -> web.Response:
    query = parse_query(request, BreakGlassQuery)
    page = await request.app[MESSAGING].break_glass_grants(
        request[PRINCIPAL], query.reviewed, cursor=decode_cursor(query.cursor), limit=query.limit
    )
    return _json(
        BreakGlassListOut(
            items=[
                BreakGlassOut(
                    id=str(g.record.id),
                    thread_id=str(g.record.thread_id),
                    physician=g.record.physician,
                    reason=g.reason,
                    opened_at=g.record.opened_at,
                    expires_at=g.record.expires_at,
                    reviewed=g.record.reviewed_at is not None,
                    reviewed_at=g.record.reviewed_at,
                    reviewed_by=g.record.reviewed_by,
                    shredded_at=g.shredded_at,
                )
                for g in page.items
            ],
            next_cursor=encode_cursor(page.next_cursor),
        )
    )


async def review_break_glass(request: web.Request) -> web.Response:
    await request.app[MESSAGING].review_break_glass(request[PRINCIPAL], path_uuid(request, "BreakGlass"))
    return web.Response(status=204)


def _team_out(team: str, history: list[tuple[str, datetime, datetime | None]]) -> CareTeamOut:
    return CareTeamOut(
        team=team,
        members=sorted(m for m, _, left in history if left is None),
        history=[MembershipOut(member=m, joined_at=j, left_at=left) for m, j, left in history],
    )


async def create_care_team(request: web.Request) -> web.Response:
    body = await read_json(request, CareTeamBody)
    history = await request.app[MESSAGING].create_team(request[PRINCIPAL], body.team, body.members)
    return _json(_team_out(body.team, history), 201)


async def set_care_team_members(request: web.Request) -> web.Response:
    team = f"CareTeam/{TEAM_ID.text(request)}"
    body = await read_json(request, CareTeamMembersBody)
    return _json(_team_out(team, await request.app[MESSAGING].set_members(request[PRINCIPAL], team, body.members)))


async def get_care_team(request: web.Request) -> web.Response:
    team = f"CareTeam/{TEAM_ID.text(request)}"
    return _json(_team_out(team, await request.app[MESSAGING].team(request[PRINCIPAL], team)))
