"""Shared steps of the messaging tests: the same things a portal would do."""

from __future__ import annotations

from typing import Any

from tests.conftest import Portals

PORTAL = {"method": "portal", "text_version": "v3"}


def patient(portals: Portals, n: int = 1) -> dict[str, str]:
    return portals.acme.auth(role="patient", sub=f"Patient/{n}")


def physician(portals: Portals, n: int = 7) -> dict[str, str]:
    return portals.acme.auth(role="physician", sub=f"Practitioner/{n}")


async def consent(client: Any, portals: Portals, grantee: str = "Practitioner/7", n: int = 1, **extra: Any) -> dict:
    body = {"patient": f"Patient/{n}", "grantee": grantee, "scope": "messaging", "evidence": PORTAL, **extra}
    response = await client.post("/v1/consents", json=body, headers=patient(portals, n))
    assert response.status == 201, await response.text()
    return await response.json()


async def thread(
    client: Any,
    portals: Portals,
    *,
    participants: list[str] | None = None,
    n: int = 1,
    message: str | None = "Hello",
    **extra: Any,
) -> dict:
    body: dict[str, Any] = {
        "patient": f"Patient/{n}",
        "participants": participants or ["Practitioner/7"],
        "subject": "Question about my medication",
        **extra,
    }
    if message is not None:
        body["message"] = {"body": message}
    response = await client.post("/v1/threads", json=body, headers=patient(portals, n))
    assert response.status == 201, await response.text()
    return await response.json()
