"""No request is a server error: bad input is answered with a 4xx RFC 9457 problem, never a 500.

`WERE_SERVER_ERRORS` keeps, as plain cases, the requests that were answered with a 500 before the fix made
in the commit that added each one.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from yarl import URL

from tests.conftest import Portals

IDENTITIES: dict[str, dict[str, str]] = {
    "patient": {"role": "patient", "sub": "Patient/1"},
    "physician": {"role": "physician", "sub": "Practitioner/7"},
    "admin": {"role": "admin", "sub": "Practitioner/admin"},
}

# (caller, method, target as sent, the status now), each once a 500.
WERE_SERVER_ERRORS = (
    pytest.param("admin", "GET", "/v1/admin/care-teams/cardio%00", 404, id="care-team-path-with-nul"),
    pytest.param("patient", "GET", "/v1/threads?patient=%00", 422, id="thread-listing-patient-nul"),
    pytest.param("physician", "GET", "/v1/threads?patient=Patient%2F1%00", 422, id="thread-listing-patient-ref-nul"),
    pytest.param("admin", "GET", "/v1/admin/webhook-endpoints?subscriber=%00", 422, id="endpoint-listing-nul"),
)


@pytest.mark.parametrize(("who", "method", "target", "status"), WERE_SERVER_ERRORS)
async def test_requests_that_were_server_errors_are_problems(
    client: Any, portals: Portals, who: str, method: str, target: str, status: int
) -> None:
    # Sent exactly as written: yarl does not re-quote the target.
    url = URL(f"http://{client.host}:{client.port}{target}", encoded=True)
    async with client.session.request(method, url, headers=portals.acme.auth(**IDENTITIES[who])) as response:
        text = await response.text()
        assert response.status == status, text
        assert response.content_type == "application/problem+json"
        assert json.loads(text)["status"] == status
