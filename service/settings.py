"""Configuration from `BEDSIDE_*` environment variables, validated once at start."""

from __future__ import annotations

import ipaddress
import re
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.domain.attachments import DEFAULT_MAX_UPLOADS
from service.domain.principal import Role, parse_roles

_SLUG = re.compile(r"^[a-z][a-z0-9-]{1,62}$")


class Settings(BaseSettings):
    """Everything Bedside reads from its environment. Frozen: built once, passed down."""

    model_config = SettingsConfigDict(env_prefix="BEDSIDE_", frozen=True, extra="forbid")

    # No URL means embedded mode: Bedside starts its own PostgreSQL under `data_dir`.
    database_url: SecretStr | None = None
    data_dir: Path = Path(".bedside")
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # `bedside serve` runs this many server processes on one listening socket: one Python process uses
    # at most one core. Each has its own pool of up to `db_pool_max` connections.
    processes: int = Field(default=1, ge=1, le=64)

    audience: str = Field(default="bedside", min_length=1, max_length=200)
    jwt_leeway_seconds: int = Field(default=60, ge=0, le=60)
    jwt_max_lifetime_seconds: int = Field(default=3600, ge=60, le=3600)
    issuer_cache_seconds: float = Field(default=30.0, ge=0, le=3600)
    # The roles a tenant admin may give an issuer they register through the API (comma-separated role names;
    # empty: admins register no new issuers). Issuers the operator registers are not bound by it.
    admin_issuer_roles: Annotated[frozenset[Role], NoDecode] = frozenset()

    # The networks of the proxies (load balancers) in front of the service, comma-separated: a request from
    # one of them counts as coming from the client that X-Forwarded-For names (`domain/client_address.py`).
    # Empty: the TCP peer is the client, and X-Forwarded-For is ignored.
    trusted_proxies: Annotated[tuple[IPv4Network | IPv6Network, ...], NoDecode] = ()

    # A bearer token `GET /metrics` then requires (compared in constant time). Unset, /metrics is open: for
    # a deployment whose scrapers reach it only on a private network.
    metrics_token: SecretStr | None = None

    # Failed authentications, per source (an IPv4 address, an IPv6 /64) and process: each is audited until
    # `auth_failure_burst` are spent (the budget comes back at `auth_failure_per_minute`), and while the
    # process's own budget over all sources lasts (`auth_failure_global_burst`, back at
    # `auth_failure_global_per_minute`); past either, failures are answered 429 and counted, and the counts
    # are audited as one summary per source every `auth_failure_summary_seconds` (and on stop). At most
    # `auth_failure_max_sources` sources are tracked.
    auth_failure_burst: int = Field(default=20, ge=1, le=100_000)
    auth_failure_per_minute: float = Field(default=20.0, gt=0, le=100_000)
    auth_failure_global_burst: int = Field(default=200, ge=1, le=1_000_000)
    auth_failure_global_per_minute: float = Field(default=600.0, gt=0, le=1_000_000)
    auth_failure_max_sources: int = Field(default=10_000, ge=1, le=1_000_000)
    auth_failure_summary_seconds: float = Field(default=60.0, gt=0, le=3600)

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

    # How often expired idempotency keys (kept 24 hours) are purged; 0 turns the purge off in this process.
    idempotency_purge_interval_seconds: float = Field(default=600.0, ge=0, le=86_400)

    # Messaging: how long a sender may recall an unread message; how long a break-glass grant lasts.
    recall_window_seconds: int = Field(default=900, ge=0, le=86_400)
    break_glass_minutes: int = Field(default=60, ge=1, le=24 * 60)

    # Attachments: the largest file accepted (streamed and sealed in chunks, never held whole in memory).
    max_attachment_bytes: int = Field(default=25 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    # An upload holds a database connection (and its transaction) from its first 64 KiB until its body has
    # arrived, so slow ones are bounded: uploads in progress per caller (tenant and subject) in this process,
    # waiting for their first 64 KiB included; the time its body may take in all (300 s: 25 MiB at 100 KB/s
    # takes 262 s); how slow it may be: before its first 64 KiB, the longest it may send nothing; after, the
    # longest the service waits, in all, for each further 64 KiB (a floor of about 2.2 kB/s).
    max_uploads_per_principal: int = Field(default=2, ge=1, le=100)
    # Uploads holding a pooled connection at once in this process (past it, 503); unset: 8, or half the
    # pool if that is fewer (see `upload_connections`). Always fewer than the pool, so uploads never hold
    # every connection the other requests need.
    max_concurrent_uploads: int | None = Field(default=None, ge=1, le=499)
    upload_deadline_seconds: float = Field(default=300.0, gt=0, le=86_400)
    upload_idle_seconds: float = Field(default=30.0, gt=0, le=3600)

    # Tenant policy: how far ahead a proxy consent may run (18 months).
    proxy_consent_max_days: int = Field(default=548, ge=1, le=3650)

    # Webhooks. Delivery: whether this process runs a delivery worker (any number may: leases keep them
    # apart), the retry schedule (Standard Webhooks'), its jitter (a fraction added), the longest
    # Retry-After honoured, the per-attempt timeout, the lease (longer than the timeout), how often each
    # worker returns the expired leases of workers that died, and how long an endpoint may fail
    # continuously before it is disabled (5 days).
    webhook_worker: bool = True
    webhook_retry_schedule_seconds: tuple[float, ...] = Field(
        default=(5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400), min_length=1, max_length=50
    )
    webhook_retry_jitter: float = Field(default=0.2, ge=0, le=1)
    webhook_retry_after_max_seconds: float = Field(default=86_400, ge=0, le=7 * 86_400)
    webhook_timeout_seconds: float = Field(default=15.0, gt=0, le=60)
    # 1 s to 1 hour: the range the database's claim function (migration 0011) accepts.
    webhook_lease_seconds: float = Field(default=60.0, ge=1, le=3600)
    webhook_reap_interval_seconds: float = Field(default=10.0, gt=0, le=3600)
    webhook_poll_interval_seconds: float = Field(default=0.25, gt=0, le=60)
    webhook_concurrency: int = Field(default=32, ge=1, le=1000)
    webhook_disable_after_seconds: float = Field(default=5 * 86_400, gt=0)
    webhook_secret_overlap_seconds: float = Field(default=86_400, ge=0, le=30 * 86_400)
    # Where webhooks may go: https to globally routable addresses only, plus these networks (CIDRs, for
    # on-premises receivers and tests), and http to loopback only when allowed (development).
    webhook_allow_networks: tuple[str, ...] = ()
    webhook_allow_http_loopback: bool = False
    # Inbound replies: the largest body, and how far a signature's timestamp may be from now.
    inbound_max_body_bytes: int = Field(default=256 * 1024, ge=1024, le=4 * 1024 * 1024)
    inbound_tolerance_seconds: int = Field(default=300, ge=1, le=3600)

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

    @field_validator("admin_issuer_roles", mode="before")
    @classmethod
    def _role_list(cls, value: object) -> object:
        return parse_roles(value) if isinstance(value, str) else value

    @field_validator("metrics_token")
    @classmethod
    def _metrics_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not 32 <= len(value.get_secret_value()) <= 256:
            raise ValueError("the metrics token must be 32 to 256 characters")  # a guessable one protects nothing
        return value

    @field_validator("webhook_retry_schedule_seconds")
    @classmethod
    def _schedule(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 <= delay <= 7 * 86_400 for delay in value):
            raise ValueError("each delay is 0 to 604800 seconds")
        return value

    @field_validator("webhook_allow_networks")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for network in value:
            try:
                ipaddress.ip_network(network)
            except ValueError:
                raise ValueError("each entry is a network in CIDR notation, such as 10.20.0.0/16") from None
        return value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _proxy_networks(cls, value: object) -> object:
        entries = value.split(",") if isinstance(value, str) else value
        if not isinstance(entries, list | tuple):
            return value  # not a list of networks: pydantic says so
        networks = []
        for entry in entries:
            text = entry.strip() if isinstance(entry, str) else entry
            if text == "":
                continue
            try:
                networks.append(ipaddress.ip_network(text))
            except (TypeError, ValueError):
                # A network is no secret: the entry is named, so that the operator finds it in a long list.
                raise ValueError(
                    f"{text!r} is not an IP address or a network in CIDR notation (such as 10.0.0.0/8 or "
                    "2001:db8::/32, with no host bits set)"
                ) from None
        return tuple(networks)

    @property
    def webhook_networks(self) -> tuple[IPv4Network | IPv6Network, ...]:
        return tuple(ipaddress.ip_network(n) for n in self.webhook_allow_networks)

    @model_validator(mode="after")
    def _lease_outlasts_timeout(self) -> Settings:
        if self.webhook_lease_seconds < self.webhook_timeout_seconds + 5:
            raise ValueError("BEDSIDE_WEBHOOK_LEASE_SECONDS must exceed the timeout by 5 seconds or more")
        return self

    @model_validator(mode="after")
    def _uploads_leave_connections(self) -> Settings:
        # The effective number, set or not: a pool of one has nothing to leave, whatever the setting says.
        uploads, pool = self.upload_connections, max(self.db_pool_min, self.db_pool_max)
        if uploads >= pool:
            raise ValueError(
                f"BEDSIDE_MAX_CONCURRENT_UPLOADS ({uploads}) must be below the pool's {pool} connections "
                "(BEDSIDE_DB_POOL_MAX, at least 2): each upload holds one while its body arrives"
            )
        return self

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
    def upload_connections(self) -> int:
        """How many uploads of this process may hold a pooled connection at once: the setting, or 8 (half
        the pool, if that is fewer; at least 1)."""
        if self.max_concurrent_uploads is not None:
            return self.max_concurrent_uploads
        return max(1, min(DEFAULT_MAX_UPLOADS, max(self.db_pool_min, self.db_pool_max) // 2))

    @property
    def serve_connections(self) -> int:
        """The most database connections `bedside serve` holds at once: in each of its processes, the
        pool (up to `db_pool_max`, never below `db_pool_min`) and the audit sequencer's own connection."""
        per_process = max(self.db_pool_min, self.db_pool_max) + (1 if self.audit_sequencer else 0)
        return self.processes * per_process

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
