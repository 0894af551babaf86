"""Writing a response body after its headers are out: the one place that knows what can still go wrong.

Once `prepare` has sent the status line, no error status can follow. A client that hangs up ends the
stream quietly (logged at info: it is not a server error). Any other failure is logged and the
connection is cut without the body's end (no final chunk, or fewer bytes than the declared length), so
every HTTP client sees an incomplete response rather than a complete-looking one. No exception may
escape either: the error middleware would write a second response into this one's body.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing

import structlog
from aiohttp import web

log = structlog.get_logger("bedside.http")


async def stream_body(
    request: web.Request,
    response: web.StreamResponse,
    pieces: AsyncGenerator[bytes, None],
    *,
    event: str,
    **ids: str,
) -> web.StreamResponse:
    """Send `response`'s headers, then every piece; `event` names the log lines (`<event>_disconnected`,
    `<event>_aborted`), `ids` go with them. `pieces` is closed however the stream ends, releasing what
    it holds (a database transaction, an open cursor)."""
    async with aclosing(pieces):
        await response.prepare(request)  # before the headers are out, an error still gets its own response
        try:
            async for piece in pieces:
                await response.write(piece)
            await response.write_eof()  # the final chunk: a client gone by now is a hang-up like any other
        except ConnectionError:
            log.info(f"{event}_disconnected", **ids)
        except Exception:
            log.error(f"{event}_aborted", exc_info=True, **ids)
            if request.transport is not None:
                request.transport.abort()
    return response
