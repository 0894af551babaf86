"""Probes for orchestrators."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class HealthOut(BaseModel):
    status: Literal["ok"]


class ReadyOut(BaseModel):
    status: Literal["ready", "not-ready"]
    database: Literal["ok", "unreachable", "read-only"] = Field(
        description="ok, or why the database cannot serve: unreachable, or read-only (it refuses writes: a hot "
        "standby, an old primary a failover demoted)"
    )
    schema_version: Literal["current", "not-current"]
    audit_backlog: int | None = Field(default=None, description="Audit events committed, not yet in the log")
    audit_backlog_age_seconds: float | None = Field(default=None, description="Age of the oldest of them")
