"""Prometheus metrics, labelled by route template and status, never by raw path or content."""

from __future__ import annotations

import hmac
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from service.errors import ConfigurationError

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "<unmatched>"
# Where prometheus_client keeps metric values in files rather than in memory: it reads this variable once,
# when it is first imported, so it must be in a process's environment from the start.
SHARED_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


class HttpMetrics:
    """The request metrics of one application.

    On its own (`shared_dir` None) it has a registry of its own (no process-global state), so two apps in
    one process never mix counts. The server processes of one `serve` share `shared_dir` instead: each
    keeps its values in files there (prometheus_client's multiprocess mode, which their environment turned
    on: see SHARED_DIR_VARIABLE), and `render` adds up every process's files, so a scrape shows the whole
    serve's counts whichever process answers it. The files are named by metric type and process id and
    hold what the labels do: route template, method, status."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, *, shared_dir: Path | None = None, token: str | None = None) -> None:
        self._token = None if token is None else token.encode()
        own: CollectorRegistry | None = None
        if shared_dir is None:
            own = self._exposed = CollectorRegistry(auto_describe=True)
        else:
            if values.ValueClass is values.MutexValue:
                # Counted in memory, these would never reach the files every process renders from.
                raise ConfigurationError(
                    f"shared metrics need {SHARED_DIR_VARIABLE} in the environment before prometheus_client is imported"
                )
            # The metrics themselves stay unregistered: the collector reads their values from the files,
            # this process's among them, and registering them too would report this process twice.
            self._exposed = CollectorRegistry()
            MultiProcessCollector(self._exposed, path=str(shared_dir))  # type: ignore[no-untyped-call]  # unannotated there
        self._requests = Counter(
            "bedside_http_requests",
            "HTTP requests by route template, method and status",
            ("route", "method", "status"),
            registry=own,
        )
        self._latency = Histogram(
            "bedside_http_request_duration_seconds",
            "HTTP request latency by route template and method",
            ("route", "method"),
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=own,
        )

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        method = method if method in KNOWN_METHODS else "OTHER"
        self._requests.labels(route, method, str(status)).inc()
        self._latency.labels(route, method).observe(seconds)

    def allows(self, authorization: str | None) -> bool:
        """Whether a scrape with this `Authorization` header may read the metrics: always without a token
        configured; else only with `Bearer <token>` (compared in constant time)."""
        if self._token is None:
            return True
        scheme, _, credentials = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), self._token)

    def render(self) -> bytes:
        return generate_latest(self._exposed)
