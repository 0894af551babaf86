"""No request is a server error: bad input is answered with a 4xx RFC 9457 problem, never a 500.

`WERE_SERVER_ERRORS` keeps, as plain cases, the requests that were answered with a 500 before the fix made
in the commit that added each one.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import ClientTimeout
from yarl import URL

from tests.conftest import Portals

IDENTITIES: dict[str, dict[str, str]] = {
    "patient": {"role": "patient", "sub": "Patient/1"},
    "physician": {"role": "physician", "sub": "Practitioner/7"},
    "compliance": {"role": "compliance", "sub": "Practitioner/c1"},
    "admin": {"role": "admin", "sub": "Practitioner/admin"},
}

# (caller, method, target as sent, the status now), each once a 500.
WERE_SERVER_ERRORS = (
    pytest.param("admin", "GET", "/v1/admin/care-teams/cardio%00", 404, id="care-team-path-with-nul"),
    pytest.param("patient", "GET", "/v1/threads?patient=%00", 422, id="thread-listing-patient-nul"),
    pytest.param("physician", "GET", "/v1/threads?patient=Patient%2F1%00", 422, id="thread-listing-patient-ref-nul"),
    pytest.param("admin", "GET", "/v1/admin/webhook-endpoints?subscriber=%00", 422, id="endpoint-listing-nul"),
    pytest.param("compliance", "GET", "/v1/audit/events?patient=%00", 422, id="audit-events-patient-nul"),
    pytest.param("compliance", "GET", "/v1/audit/events?resource_id=a%00b", 422, id="audit-events-resource-nul"),
    # Was a 200 whose stream then broke off (the filter failed in the query run while streaming).
    pytest.param("compliance", "GET", "/v1/audit/export?actor=%00", 422, id="audit-export-actor-nul"),
)


@pytest.mark.parametrize(("who", "method", "target", "status"), WERE_SERVER_ERRORS)
async def test_requests_that_were_server_errors_are_problems(
    client: Any, portals: Portals, who: str, method: str, target: str, status: int
) -> None:
    await _audit_log_has_a_checkpoint(client, portals)  # so that an export has rows to stream
    # Sent exactly as written: yarl does not re-quote the target.
    url = URL(f"http://{client.host}:{client.port}{target}", encoded=True)
    headers = portals.acme.auth(**IDENTITIES[who])
    async with client.session.request(method, url, headers=headers, timeout=ClientTimeout(total=30)) as response:
        assert (response.status, response.content_type) == (status, "application/problem+json")
        assert json.loads(await response.text())["status"] == status


async def _audit_log_has_a_checkpoint(client: Any, portals: Portals) -> None:
    for _ in range(200):
        response = await client.get(
            "/v1/audit/checkpoints/latest", headers=portals.acme.auth(**IDENTITIES["compliance"])
        )
        if response.status == 200:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the audit log has no checkpoint yet")
