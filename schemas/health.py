"""Probes for orchestrators."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class HealthOut(BaseModel):
    status: Literal["ok"]


class ReadyOut(BaseModel):
    status: Literal["ready", "not-ready"]
    database: Literal["ok", "unreachable"]
    schema_version: Literal["current", "not-current"]
