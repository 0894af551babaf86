"""Attachments at the HTTP edge. The file itself is the raw request body (upload) or response body
(download); only the query and the upload's answer have a schema."""

from __future__ import annotations

from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

# The domain's allow-list (`service.domain.attachments.CONTENT_TYPES`), written again because `schemas` may not
# import `service` nor the domain `schemas` (pyproject's import contracts). tests/api/test_openapi.py fails
# when the two differ, in members or order.
AttachmentType = Literal["application/pdf", "image/png", "image/jpeg", "text/plain"]


class AttachmentUploadQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    thread_id: UUID = Field(description="The thread the file is uploaded into (the caller must be able to write it)")


class AttachmentOut(BaseModel):
    id: str
    thread_id: str
    content_type: AttachmentType
    size: int = Field(description="Bytes of the file")
    file_name: str
