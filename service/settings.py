"""Configuration from `BEDSIDE_*` environment variables, validated once at start."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_SLUG = re.compile(r"^[a-z][a-z0-9-]{1,62}$")


class Settings(BaseSettings):
    """Everything Bedside reads from its environment. Frozen: built once, passed down."""

    model_config = SettingsConfigDict(env_prefix="BEDSIDE_", frozen=True, extra="forbid")

    # No URL means embedded mode: Bedside starts its own PostgreSQL under `data_dir`.
    database_url: SecretStr | None = None
    data_dir: Path = Path(".bedside")
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)

    audience: str = Field(default="bedside", min_length=1, max_length=200)
    jwt_leeway_seconds: int = Field(default=60, ge=0, le=60)
    jwt_max_lifetime_seconds: int = Field(default=3600, ge=60, le=3600)
    issuer_cache_seconds: float = Field(default=30.0, ge=0, le=3600)

    max_json_body_bytes: int = Field(default=1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    shutdown_timeout_seconds: float = Field(default=30.0, ge=0, le=600)

    db_pool_min: int = Field(default=2, ge=1, le=100)
    db_pool_max: int = Field(default=20, ge=1, le=500)
    db_statement_timeout_ms: int = Field(default=15_000, ge=100, le=600_000)

    # Key-encryption keys: a local key file (default: <data_dir>/kek.json) or a PKCS#11 token (HSM).
    kek_provider: Literal["file", "pkcs11"] = "file"
    kek_file: Path | None = None
    # Make the key file when it is missing. Embedded mode does; elsewhere a missing file is an error,
    # because a new KEK could not unwrap any data key already stored.
    kek_file_create: bool = False
    pkcs11_library: str | None = None
    pkcs11_token_label: str | None = None
    pkcs11_pin: SecretStr | None = None
    dek_cache_max_entries: int = Field(default=10_000, ge=1, le=10_000_000)
    dek_cache_max_age_seconds: float = Field(default=300.0, gt=0, le=86_400)
    dek_cache_max_uses: int = Field(default=100_000, ge=1)

    # The audit log: the deployment's name (the checkpoints' origin and key name), its Ed25519 signing key
    # (default: <data_dir>/audit-signing.key; made when missing only if allowed, like the KEK file), and
    # whether this process runs the sequencer (one leader among all processes, by advisory lock).
    audit_origin: str = Field(default="bedside.localhost/audit", pattern=r"^[A-Za-z0-9._/:-]{1,100}$")
    audit_signing_key_file: Path | None = None
    audit_signing_key_create: bool = False
    # Where the signing key lives: a local file, or an Ed25519 key on a PKCS#11 token (the PKCS#11
    # library and PIN settings above; a token of its own is best, see README).
    audit_signer: Literal["file", "pkcs11"] = "file"
    audit_pkcs11_token_label: str | None = None
    audit_sequencer: bool = True
    audit_batch_interval_seconds: float = Field(default=0.25, gt=0, le=10)

    # Messaging: how long a sender may recall an unread message; how long a break-glass grant lasts.
    recall_window_seconds: int = Field(default=900, ge=0, le=86_400)
    break_glass_minutes: int = Field(default=60, ge=1, le=24 * 60)

    # Attachments: the largest file accepted (streamed and sealed in chunks, never held whole in memory).
    max_attachment_bytes: int = Field(default=25 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)

    # Tenant policy: how far ahead a proxy consent may run (18 months).
    proxy_consent_max_days: int = Field(default=548, ge=1, le=3650)

    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or value.get_secret_value() == "":
            return None
        if not value.get_secret_value().startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL")
        return value

    @model_validator(mode="after")
    def _pkcs11_complete(self) -> Settings:
        if self.kek_provider == "pkcs11" and not (self.pkcs11_library and self.pkcs11_token_label and self.pkcs11_pin):
            raise ValueError("kek_provider=pkcs11 needs BEDSIDE_PKCS11_LIBRARY, _TOKEN_LABEL and _PIN")
        audit_label = self.audit_pkcs11_token_label or self.pkcs11_token_label
        if self.audit_signer == "pkcs11" and not (self.pkcs11_library and audit_label and self.pkcs11_pin):
            raise ValueError("audit_signer=pkcs11 needs BEDSIDE_PKCS11_LIBRARY, a token label and _PIN")
        return self

    @property
    def embedded(self) -> bool:
        return self.database_url is None

    @property
    def audit_signing_key_path(self) -> Path:
        return (
            self.audit_signing_key_file
            if self.audit_signing_key_file is not None
            else self.data_dir / "audit-signing.key"
        )

    @property
    def kek_file_path(self) -> Path:
        return self.kek_file if self.kek_file is not None else self.data_dir / "kek.json"


class SettingsError(Exception):
    """The environment holds a value Bedside cannot run with; the message names the variable."""


def load_settings(**overrides: object) -> Settings:
    """Read the environment (plus explicit overrides from the command line) or raise SettingsError.

    The message names each bad variable and why, never its value: a value may be a secret.
    """
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_input=False, include_url=False):
            if error["loc"]:
                name = "BEDSIDE_" + "_".join(str(part) for part in error["loc"]).upper()
                lines.append(f"  {name}: {error['msg']}")
            else:
                lines.append(f"  {error['msg'].removeprefix('Value error, ')}")
        raise SettingsError("invalid configuration:\n" + "\n".join(lines)) from None


def is_slug(value: str) -> bool:
    """Tenant names are slugs: lowercase letter first, then lowercase letters, digits, dashes."""
    return bool(_SLUG.fullmatch(value))
