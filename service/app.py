"""`create_app(settings)`: the one place the application's objects are built and wired."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

from aiohttp import web

from crypto.checkpoint import CheckpointError, CheckpointSigner, Ed25519CheckpointSigner, format_vkey
from crypto.dek_cache import DataKeyCache
from crypto.errors import KeyProviderError
from crypto.kek import KekProvider
from crypto.kek_file import LocalKeyFileProvider
from service import __version__
from service.api.metrics import HttpMetrics
from service.api.middleware import MIDDLEWARES
from service.api.openapi import build_openapi
from service.api.routes import ROUTES, add_routes, route_gates
from service.domain.attachments import AttachmentReferences, AttachmentService
from service.domain.audit import AuditRecorder
from service.domain.audit_log import AuditLog, AuditQueries
from service.domain.auth import Authenticator
from service.domain.auth_failures import AuthFailures, FailureBudget, FailureLimiter
from service.domain.consents import ConsentLedger
from service.domain.health import HealthService
from service.domain.idempotency import RequestFingerprints
from service.domain.inbound import InboundReplies
from service.domain.issuers import IssuerService
from service.domain.keyring import KekClient, PatientKeyring
from service.domain.keys import KeyOperations
from service.domain.messaging import MessagingService
from service.domain.webhooks import DeliveryPolicy, UrlGuard, WebhookDispatcher, WebhookEndpoints
from service.errors import ConfigurationError
from service.keys import (
    ATTACHMENTS,
    AUDIT,
    AUDIT_QUERIES,
    AUTH_FAILURES,
    AUTHENTICATOR,
    CONSENTS,
    HEALTH,
    INBOUND,
    ISSUERS,
    KEY_OPERATIONS,
    MESSAGING,
    METRICS,
    OPENAPI,
    PUBLIC_ROUTES,
    ROUTE_GATES,
    SETTINGS,
    WEBHOOKS,
)
from service.settings import Settings
from service.store.attachments import AttachmentStore
from service.store.audit import AuditStore
from service.store.consents import ConsentStore
from service.store.data_keys import DataKeyStore
from service.store.db import Database, check_application_role
from service.store.idempotency import IdempotencyStore
from service.store.issuers import IssuerStore
from service.store.messaging import MessagingStore
from service.store.migrate import SchemaStore
from service.store.tenants import TenantStore
from service.store.webhooks import WebhookStore
from service.workers.http import HttpTransport, system_resolver
from service.workers.maintenance import DenialSummaries, IdempotencyPurger
from service.workers.sequencer import Sequencer
from service.workers.webhooks import WebhookWorker


def create_app(settings: Settings, *, shared_metrics_dir: Path | None = None) -> web.Application:
    """The aiohttp application for `settings` (which must name a database: embedded mode resolves one
    before calling this). The pool and services are opened on start-up and closed on clean-up.
    `shared_metrics_dir`: where the server processes of one `serve` share their request metrics (see
    `HttpMetrics`); None, the app counts for itself alone."""
    if settings.database_url is None:
        raise ConfigurationError("create_app needs a database URL")
    app = web.Application(middlewares=MIDDLEWARES, client_max_size=settings.max_json_body_bytes)
    app[SETTINGS] = settings
    token = settings.metrics_token
    app[METRICS] = HttpMetrics(shared_dir=shared_metrics_dir, token=None if token is None else token.get_secret_value())
    app[PUBLIC_ROUTES] = add_routes(app, ROUTES)
    app[ROUTE_GATES] = route_gates(ROUTES)
    app[OPENAPI] = build_openapi(ROUTES, version=__version__, settings=settings)
    app.cleanup_ctx.append(_services)
    return app


async def _services(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    assert settings.database_url is not None
    db = await Database.connect(
        settings.database_url.get_secret_value(),
        min_size=settings.db_pool_min,
        max_size=max(settings.db_pool_min, settings.db_pool_max),
        statement_timeout_ms=settings.db_statement_timeout_ms,
    )
    try:
        await check_application_role(db)
        schema = SchemaStore()
        async with db.transaction() as tx:
            status = await schema.status(tx)
        if not status.current:
            raise ConfigurationError(
                status.problem
                or f"the database schema is at migration {status.applied} of {status.known}: "
                "run `bedside migrate` first"
            )
        signer = build_audit_signer(settings)
        audit_store = AuditStore()
        recorder = AuditRecorder(audit_store, db)
        audit_log = AuditLog(audit_store, signer, origin=settings.audit_origin)
        app[AUDIT] = recorder
        app[AUDIT_QUERIES] = AuditQueries(db, audit_store, recorder, vkey=format_vkey(signer.name, signer.public_key))
        kek = KekClient(build_kek_provider(settings))
        keyring = PatientKeyring(
            DataKeyStore(),
            kek,
            DataKeyCache(
                max_entries=settings.dek_cache_max_entries,
                max_age=settings.dek_cache_max_age_seconds,
                max_uses=settings.dek_cache_max_uses,
            ),
        )
        tenant_store, issuer_store, idempotency_store = TenantStore(), IssuerStore(), IdempotencyStore()
        key_operations = KeyOperations(db, tenant_store, DataKeyStore(), kek, keyring, recorder)
        app[KEY_OPERATIONS] = key_operations
        issuers = IssuerService(
            db,
            tenant_store,
            issuer_store,
            recorder,
            cache_seconds=settings.issuer_cache_seconds,
            audience=settings.audience,
            leeway_seconds=settings.jwt_leeway_seconds,
            admin_roles=settings.admin_issuer_roles,
        )
        app[ISSUERS] = issuers
        app[AUTHENTICATOR] = Authenticator(
            issuers,
            max_lifetime_seconds=settings.jwt_max_lifetime_seconds,
            verified_cache_seconds=settings.issuer_cache_seconds,
        )
        budget = FailureBudget(
            burst=settings.auth_failure_burst,
            per_minute=settings.auth_failure_per_minute,
            max_sources=settings.auth_failure_max_sources,
            global_burst=settings.auth_failure_global_burst,
            global_per_minute=settings.auth_failure_global_per_minute,
        )
        app[AUTH_FAILURES] = auth_failures = AuthFailures(recorder, FailureLimiter(budget))
        denial_summaries = DenialSummaries(auth_failures, interval=settings.auth_failure_summary_seconds)
        app[HEALTH] = HealthService(db, schema, audit_store)
        fingerprints = RequestFingerprints(keyring)
        consents = ConsentLedger(
            db,
            ConsentStore(),
            idempotency_store,
            recorder,
            fingerprints=fingerprints,
            proxy_max_validity=timedelta(days=settings.proxy_consent_max_days),
            outbox=WebhookStore(),
        )
        app[CONSENTS] = consents
        attachment_store = AttachmentStore()
        app[MESSAGING] = messaging = MessagingService(
            db,
            MessagingStore(),
            consents,
            keyring,
            idempotency_store,
            recorder,
            attachments=AttachmentReferences(attachment_store),
            fingerprints=fingerprints,
            recall_window=timedelta(seconds=settings.recall_window_seconds),
            break_glass_duration=timedelta(minutes=settings.break_glass_minutes),
        )
        app[ATTACHMENTS] = AttachmentService(
            db,
            attachment_store,
            messaging,
            keyring,
            recorder,
            max_bytes=settings.max_attachment_bytes,
            max_concurrent_uploads=settings.upload_connections,
            max_uploads_per_principal=settings.max_uploads_per_principal,
            upload_deadline_seconds=settings.upload_deadline_seconds,
            upload_idle_seconds=settings.upload_idle_seconds,
        )
        webhook_store = WebhookStore()
        guard = UrlGuard(
            system_resolver,
            allow_http_loopback=settings.webhook_allow_http_loopback,
            allow_networks=settings.webhook_networks,
        )
        delivery_policy = DeliveryPolicy(
            schedule=settings.webhook_retry_schedule_seconds,
            jitter=settings.webhook_retry_jitter,
            retry_after_max=settings.webhook_retry_after_max_seconds,
            disable_after=timedelta(seconds=settings.webhook_disable_after_seconds),
            secret_overlap=timedelta(seconds=settings.webhook_secret_overlap_seconds),
        )
        app[WEBHOOKS] = WebhookEndpoints(db, webhook_store, keyring, recorder, guard, policy=delivery_policy)
        app[INBOUND] = InboundReplies(
            db,
            webhook_store,
            tenant_store,
            MessagingStore(),
            keyring,
            messaging,
            fingerprints,
            tolerance_seconds=settings.inbound_tolerance_seconds,
        )
        transport = HttpTransport(timeout_seconds=settings.webhook_timeout_seconds)
        workers = [asyncio.create_task(denial_summaries.run(), name="denial-summaries")]
        if settings.webhook_worker:
            dispatcher = WebhookDispatcher(
                db, webhook_store, keyring, consents, recorder, transport, guard, policy=delivery_policy
            )
            webhook_worker = WebhookWorker(
                dispatcher,
                lease_seconds=settings.webhook_lease_seconds,
                poll_interval=settings.webhook_poll_interval_seconds,
                concurrency=settings.webhook_concurrency,
                reap_interval=settings.webhook_reap_interval_seconds,
            )
            workers.append(asyncio.create_task(webhook_worker.run(), name="webhook-worker"))
        if settings.audit_sequencer:
            sequencer = Sequencer(db, audit_log, interval=settings.audit_batch_interval_seconds)
            workers.append(asyncio.create_task(sequencer.run(), name="audit-sequencer"))
        if settings.idempotency_purge_interval_seconds:
            purger = IdempotencyPurger(db, idempotency_store, interval=settings.idempotency_purge_interval_seconds)
            workers.append(asyncio.create_task(purger.run(), name="idempotency-purge"))
        try:
            yield
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            # Every request has ended: the failures counted since the last summary are written now.
            await denial_summaries.final()
            await transport.close()
            await key_operations.close()
            kek.close()
            close_provider(kek.provider)
            close_provider(signer)
    finally:
        await db.close()


def build_kek_provider(settings: Settings) -> KekProvider:
    """The configured KEK provider. A key file that is missing is created only when allowed."""
    try:
        if settings.kek_provider == "pkcs11":
            # Imported here: python-pkcs11 is the optional `hsm` extra.
            from crypto.kek_pkcs11 import Pkcs11KekProvider

            library, label, pin = settings.pkcs11_library, settings.pkcs11_token_label, settings.pkcs11_pin
            if library is None or label is None or pin is None:
                raise ConfigurationError("kek_provider=pkcs11 needs a library, a token label and a PIN")
            return Pkcs11KekProvider(library_path=library, token_label=label, user_pin=pin.get_secret_value())
        return LocalKeyFileProvider(settings.kek_file_path, create=settings.kek_file_create)
    except KeyProviderError as exc:
        raise ConfigurationError(f"KEK provider: {exc}") from None


def build_audit_signer(settings: Settings) -> CheckpointSigner:
    """The checkpoint signing key: on a PKCS#11 token, or a local file loaded (or made when missing, if
    allowed: embedded mode)."""
    if settings.audit_signer == "pkcs11":
        # Imported here: python-pkcs11 is the optional `hsm` extra.
        from crypto.checkpoint_pkcs11 import Pkcs11CheckpointSigner

        label = settings.audit_pkcs11_token_label or settings.pkcs11_token_label
        library, pin = settings.pkcs11_library, settings.pkcs11_pin
        if library is None or label is None or pin is None:
            raise ConfigurationError("audit_signer=pkcs11 needs a library, a token label and a PIN")
        try:
            return Pkcs11CheckpointSigner(
                library_path=library,
                token_label=label,
                user_pin=pin.get_secret_value(),
                name=settings.audit_origin,
                create=settings.audit_signing_key_create,
            )
        except CheckpointError as exc:
            raise ConfigurationError(f"audit signing key: {exc}") from None
    path = settings.audit_signing_key_path
    try:
        if not path.exists():
            if not settings.audit_signing_key_create:
                raise ConfigurationError(
                    f"audit signing key {path} does not exist; restore it, or set BEDSIDE_AUDIT_SIGNING_KEY_CREATE "
                    "for a new log"
                )
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            Ed25519CheckpointSigner.generate(settings.audit_origin).save(path)
        signer = Ed25519CheckpointSigner.load(path)
    except CheckpointError as exc:
        raise ConfigurationError(f"audit signing key: {exc}") from None
    if signer.name != settings.audit_origin:
        raise ConfigurationError(
            f"the audit signing key is for {signer.name!r}, but BEDSIDE_AUDIT_ORIGIN is {settings.audit_origin!r}"
        )
    return signer


def close_provider(provider: object) -> None:
    close = getattr(provider, "close", None)
    if callable(close):
        close()
