"""Values at the edges of what the types hold are 4xx, never a 500."""

from __future__ import annotations

import base64

from tests.api.messaging_helpers import consent, patient, thread
from tests.conftest import Portals

EARLIEST = "0001-01-01T00:00:00+14:00"  # valid RFC 3339, but before the first moment in UTC


async def test_extreme_numbers_times_and_cursors_are_422(client, portals: Portals) -> None:
    await consent(client, portals)
    created = await thread(client, portals)
    me = patient(portals)
    compliance = portals.acme.auth(role="compliance", sub="Practitioner/c1")
    forged = base64.urlsafe_b64encode(f"{EARLIEST}|{created['id']}".encode()).decode().rstrip("=")
    requests = [
        ("GET", f"/v1/threads/{created['id']}/messages", {"after": str(2**63)}, me, None),
        ("GET", f"/v1/threads/{created['id']}/messages", {"before": str(2**70)}, me, None),
        ("GET", "/v1/threads", {"cursor": forged}, me, None),
        ("POST", f"/v1/threads/{created['id']}/read", None, me, {"up_to": 2**63}),
        (
            "POST",
            "/v1/consents",
            None,
            me,
            {
                "patient": "Patient/1",
                "grantee": "Practitioner/8",
                "scope": "messaging",
                "valid_from": EARLIEST,
                "evidence": {"method": "portal", "text_version": "v1"},
            },
        ),
        ("GET", "/v1/audit/events", {"since": EARLIEST}, compliance, None),
        ("GET", "/v1/audit/events", {"cursor": "YTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5"}, compliance, None),
        ("GET", "/v1/audit/proofs/inclusion", {"index": str(2**63), "size": "1"}, compliance, None),
        ("GET", "/v1/audit/proofs/consistency", {"from": "1", "to": str(2**64)}, compliance, None),
    ]
    for method, path, params, headers, body in requests:
        response = await client.request(method, path, params=params, json=body, headers=headers)
        assert response.status == 422, (method, path, params, response.status, await response.text())
