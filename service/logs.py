"""Structured logging. Events, not prose; an allow-list drops every key it does not know.

Nothing that could carry patient content is on the allow-list: no bodies, header values, tokens or
exception messages (a driver's message can quote a stored value). An exception is logged as its type and
the code locations it passed through, never its text.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Iterable, MutableMapping
from typing import Any, Literal

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

# Keys a log event may carry. Identifiers, counts, durations, codes: never content.
ALLOWED_KEYS = frozenset(
    {
        "event",
        "level",
        "timestamp",
        "logger",
        "request_id",
        "client_request_id",
        "method",
        "route",
        "status",
        "duration_ms",
        "tenant",
        "tenant_id",
        "role",
        "principal",
        "issuer",
        "reason",
        "code",
        "error_type",
        "error_at",
        "host",
        "port",
        "url",
        "data_dir",
        "version",
        "versions",
        "migration",
        "count",
        "pid",
        "processes",
        "thread_id",
        "message_id",
        "attachment_id",
        "consent_id",
        "endpoint_id",
        "delivery_id",
        "attempt",
        "status_code",
        "error_class",
        "outcome",
        "worker",
        "kek_version",
        "dek_id",
        "sequence",
        "size",
        "backlog",
        "dropped_keys",
    }
)


def drop_unknown_keys(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Keep only allow-listed keys; count (never name) what was dropped so a mistake is visible."""
    dropped = [key for key in event_dict if key not in ALLOWED_KEYS and key != "exc_info"]
    for key in dropped:
        del event_dict[key]
    if dropped:
        event_dict["dropped_keys"] = len(dropped)
    return event_dict


def summarize_exception(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Replace `exc_info` with the exception's type and innermost code location, never its message."""
    exc_info = event_dict.pop("exc_info", None)
    if not exc_info:
        return event_dict
    if exc_info is True:
        exc_info = sys.exc_info()
    if isinstance(exc_info, BaseException):
        exc: BaseException | None = exc_info
    elif isinstance(exc_info, tuple):
        exc = exc_info[1]
    else:
        exc = None
    if exc is None:
        return event_dict
    event_dict["error_type"] = type(exc).__qualname__
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        event_dict["error_at"] = f"{last.filename.rsplit('/', 1)[-1]}:{last.lineno}:{last.name}"
    return event_dict


def redacting_processors() -> list[Processor]:
    """The processors every event passes before it is rendered; tests run them too."""
    return [
        structlog.contextvars.merge_contextvars,
        summarize_exception,
        drop_unknown_keys,
    ]


def configure_logging(
    fmt: Literal["auto", "json", "console"] = "auto",
    level: str = "info",
    stream: Any = None,
) -> None:
    """Configure structlog once per process (the CLI calls this; create_app does not)."""
    out = stream if stream is not None else sys.stderr
    if fmt == "auto":
        fmt = "console" if getattr(out, "isatty", lambda: False)() else "json"
    renderer: Processor = (
        structlog.dev.ConsoleRenderer(colors=False) if fmt == "console" else structlog.processors.JSONRenderer()
    )
    processors: list[Processor] = [
        *redacting_processors(),
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    # aiohttp and asyncio log through the standard library: keep them quiet, they can quote requests.
    logging.basicConfig(level=logging.WARNING, stream=out, format="%(levelname)s %(name)s %(message)s")
    logging.getLogger("aiohttp.access").disabled = True
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)


def get_logger(name: str) -> Any:
    """A structlog logger; call sites use event names and allow-listed keys."""
    return structlog.get_logger(name)


def bind_request(values: MutableMapping[str, Any] | Iterable[tuple[str, Any]]) -> None:
    structlog.contextvars.bind_contextvars(**dict(values))


def clear_request() -> None:
    structlog.contextvars.clear_contextvars()
