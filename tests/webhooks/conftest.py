"""Webhook tests: the service delivers to a real receiver on loopback, on a compressed retry schedule."""

from __future__ import annotations

import pytest

from service.settings import Settings

# The Standard Webhooks schedule, compressed: the same shape in a fraction of a second per step.
FAST_SCHEDULE = (0.2, 0.3, 0.4)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "webhook_allow_http_loopback": True,
            "webhook_retry_schedule_seconds": FAST_SCHEDULE,
            "webhook_retry_jitter": 0.0,
            "webhook_retry_after_max_seconds": 1.0,
            "webhook_poll_interval_seconds": 0.05,
            "webhook_timeout_seconds": 2.0,
            "webhook_lease_seconds": 10.0,
        }
    )
