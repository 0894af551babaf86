"""Admin API for a tenant's data keys: status, rewrap, crypto-shredding."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from schemas.common import StrictBody


class KekVersionOut(BaseModel):
    kek_id: str
    kek_version: int
    wraps: int


class KeyStatusOut(BaseModel):
    kek_id: str
    primary_version: int
    usable_versions: list[int]
    wraps: list[KekVersionOut] = Field(description="Data key wraps of this tenant by KEK version")
    stale_wraps: int = Field(description="Wraps still under an older KEK version")
    live_keys: int
    shredded_keys: int
    rewrap_running: bool


class RewrapOut(BaseModel):
    started: bool = Field(description="False when a rewrap of this tenant was already running")


class ShredBody(StrictBody):
    patient: str = Field(description="Patient/<id> whose data key is destroyed", max_length=100)
    confirm: str = Field(description="Repeat the patient reference: shredding cannot be undone", max_length=100)


class ShredOut(BaseModel):
    patient: str
    dek_id: str
    shredded_at: datetime
