"""KEK rotation while messages are written and read through the API: nothing is unreadable at any moment."""

from __future__ import annotations

import asyncio

from tests.api.messaging_helpers import consent, patient, physician, thread
from tests.conftest import Portals, Services


async def test_rotation_during_traffic_leaves_everything_readable(client, portals: Portals, services: Services) -> None:
    threads = []
    for n in range(1, 6):
        await consent(client, portals, n=n)
        threads.append((n, (await thread(client, portals, n=n))["id"]))
    stop = asyncio.Event()
    failures: list[str] = []

    async def traffic(n: int, thread_id: str) -> int:
        sent = 0
        while not stop.is_set():
            send = await client.post(
                f"/v1/threads/{thread_id}/messages", json={"body": f"m{sent}"}, headers=patient(portals, n)
            )
            read = await client.get(
                f"/v1/threads/{thread_id}/messages", params={"limit": 200}, headers=physician(portals)
            )
            if send.status != 201 or read.status != 200:
                failures.append(f"{send.status}/{read.status}")
            sent += 1
        return sent

    running = [asyncio.create_task(traffic(n, t)) for n, t in threads]
    await asyncio.sleep(0.2)
    await services.keys.add_kek_version()
    await services.keys.rewrap()
    await asyncio.sleep(0.2)
    stop.set()
    counts = await asyncio.gather(*running)
    assert not failures
    assert min(counts) > 0
    status = await services.keys.status()
    assert status.stale_wraps == 0
    assert [v.kek_version for v in status.wraps] == [2]
    for n, thread_id in threads:  # and afterwards, every message still opens
        read = await client.get(f"/v1/threads/{thread_id}/messages", params={"limit": 200}, headers=patient(portals, n))
        assert read.status == 200
        assert len((await read.json())["items"]) == counts[n - 1] + 1
