"""HttpMetrics: one application's counts on its own, and the counts of a serve's processes added up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.api.metrics import SHARED_DIR_VARIABLE, HttpMetrics
from service.errors import ConfigurationError

# A server process of a serve, as far as its metrics go: a fresh interpreter whose environment names the
# shared directory, counting `sys.argv[2]` requests, then rendering what every process counted so far.
_SERVER = """
import sys
from pathlib import Path
from service.api.metrics import HttpMetrics
metrics = HttpMetrics(shared_dir=Path(sys.argv[1]))
for _ in range(int(sys.argv[2])):
    metrics.observe("/v1/me", "GET", 200, 0.003)
sys.stdout.buffer.write(metrics.render())
"""


def _counted(text: str) -> dict[tuple[str, ...], float]:
    """Every sample of requests counted and of latencies observed in `text`, by name and labels."""
    return {
        (sample.name, *(sample.labels[label] for label in ("route", "method", "status") if label in sample.labels)): (
            sample.value
        )
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name in ("bedside_http_requests_total", "bedside_http_request_duration_seconds_count")
    }


def test_requests_are_counted_by_route_template_method_and_status() -> None:
    metrics = HttpMetrics()
    metrics.observe("/v1/me", "GET", 200, 0.003)
    metrics.observe("/v1/me", "GET", 200, 0.004)
    metrics.observe("/v1/me", "BREW", 400, 0.001)  # a method nobody knows is not a label value

    assert _counted(metrics.render().decode()) == {
        ("bedside_http_requests_total", "/v1/me", "GET", "200"): 2,
        ("bedside_http_requests_total", "/v1/me", "OTHER", "400"): 1,
        ("bedside_http_request_duration_seconds_count", "/v1/me", "GET"): 2,
        ("bedside_http_request_duration_seconds_count", "/v1/me", "OTHER"): 1,
    }


def test_two_apps_in_one_process_never_mix_counts() -> None:
    first, second = HttpMetrics(), HttpMetrics()
    first.observe("/healthz", "GET", 200, 0.001)

    assert _counted(first.render().decode()) == {
        ("bedside_http_requests_total", "/healthz", "GET", "200"): 1,
        ("bedside_http_request_duration_seconds_count", "/healthz", "GET"): 1,
    }
    assert _counted(second.render().decode()) == {}


def test_shared_metrics_are_refused_where_prometheus_client_counts_in_memory(tmp_path: Path) -> None:
    """This process imported prometheus_client without the variable (as the suite's in-process apps and a
    single-process serve do): its counts could never reach the shared files, so it says so."""
    assert SHARED_DIR_VARIABLE not in os.environ

    with pytest.raises(ConfigurationError, match=f"need {SHARED_DIR_VARIABLE} in the environment"):
        HttpMetrics(shared_dir=tmp_path)


def test_processes_sharing_a_directory_each_render_all_their_counts(tmp_path: Path) -> None:
    """One process counts two requests and ends; the next counts three and renders five: its own and
    those of the one before, which stay counted after it ended."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEDSIDE_")} | {SHARED_DIR_VARIABLE: str(tmp_path)}

    def server(requests: int) -> str:
        run = [sys.executable, "-c", _SERVER, str(tmp_path), str(requests)]
        return subprocess.run(run, env=env, capture_output=True, text=True, check=True, timeout=60).stdout

    server(2)
    assert _counted(server(3)) == {
        ("bedside_http_requests_total", "/v1/me", "GET", "200"): 5,
        ("bedside_http_request_duration_seconds_count", "/v1/me", "GET"): 5,
    }
