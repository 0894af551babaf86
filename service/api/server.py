"""The runner `bedside serve` serves the app with: aiohttp's, except for what its HTTP parser refuses.

aiohttp answers a request its parser refuses (a malformed request line or header, a line or a header
block too long, broken chunked framing) before any middleware runs: text/plain, quoting the offending
bytes back, whatever they held. Here those refusals get what every other error gets: a problem document
with fixed text, a request id, the `http.request` log event and the request metrics, and nothing of what
the client sent.
"""

from __future__ import annotations

import uuid
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from service.api.headers import X_REQUEST_ID
from service.api.metrics import UNMATCHED_ROUTE, HttpMetrics
from service.api.problems import HTTP_PROBLEMS, INTERNAL, HttpProblem, problem_response
from service.keys import METRICS

log = structlog.get_logger("bedside.http")


class _ProblemRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering its own refusals with problem documents."""

    __slots__ = ("_metrics",)

    def __init__(self, manager: web.Server, *, metrics: HttpMetrics, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._metrics = metrics

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,  # the parser's text, quoting the request: never used
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            # Part of a response went out already: as aiohttp does, the connection is dropped instead.
            raise ConnectionError("the response had begun; the connection is closed instead")
        request_id = uuid.uuid4().hex
        if isinstance(exc, HttpProcessingError):
            # The parser refused the request (aiohttp sends 400 for every refusal): no middleware saw it, so
            # it is logged and counted here, as `observe` does for the others.
            problem = HTTP_PROBLEMS.get(status) or HttpProblem(status, "http-error", "HTTP error")
            log.info(
                "http.request",
                request_id=request_id,
                method="OTHER",
                route=UNMATCHED_ROUTE,
                status=problem.status,
                code=problem.code,
                error_type=type(exc).__name__,
            )
            self._metrics.observe(UNMATCHED_ROUTE, "OTHER", problem.status, 0.0)
        else:
            # Something escaped the middleware chain (a 500, or aiohttp's 504 for a timeout), which `observe`
            # has logged and counted already: here only its type and location, and a 500 with no detail.
            problem = INTERNAL
            log.error("http.unhandled", request_id=request_id, exc_info=exc)
        response = problem_response(
            status=problem.status, code=problem.code, title=problem.title, detail=problem.title, request_id=request_id
        )
        response.headers[X_REQUEST_ID.name] = request_id
        response.force_close()  # what follows on this connection cannot be framed
        return response


class _ProblemServer(web.Server):
    def __init__(self, handler: Any, *, metrics: HttpMetrics, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._metrics = metrics

    def __call__(self) -> RequestHandler:
        return _ProblemRequestHandler(self, metrics=self._metrics, loop=self._loop, **self._kwargs)


class ProblemRunner(web.AppRunner):
    """`web.AppRunner` whose connections answer the HTTP parser's refusals as problem documents."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()  # the app's startup, and the server aiohttp would use
        return _ProblemServer(
            server.request_handler,
            metrics=self.app[METRICS],
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )


def app_runner(app: web.Application, *, shutdown_timeout: float) -> web.AppRunner:
    """The runner `bedside serve` uses (and the tests that serve the app as it does)."""
    return ProblemRunner(app, handle_signals=False, access_log=None, shutdown_timeout=shutdown_timeout)
