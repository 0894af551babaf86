"""Real parts for every test: one PostgreSQL cluster per session, started by the suite itself (with the
same code as embedded mode), a migrated template database, and a fresh database per test cloned from it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pydantic import SecretStr

from crypto.dek_cache import DataKeyCache
from crypto.kek_file import LocalKeyFileProvider
from service.app import create_app
from service.domain.audit import AuditRecorder
from service.domain.issuers import IssuerService
from service.domain.keyring import KekClient, PatientKeyring
from service.domain.keys import KeyOperations
from service.domain.tenants import TenantService
from service.embedded import APP_LOGIN_ROLE, Connection, EmbeddedPostgres
from service.settings import Settings
from service.store.audit import AuditStore
from service.store.bootstrap import ensure_database, prepare_database
from service.store.data_keys import DataKeyStore
from service.store.db import Database
from service.store.issuers import IssuerStore
from service.store.tenants import TenantStore
from tests.support import TestIssuer

if TYPE_CHECKING:
    from tests.api.webhook_helpers import Receiver

TEMPLATE = "bedside_template"


@dataclass(frozen=True)
class Cluster:
    connection: Connection
    data_dir: Path

    def owner_dsn(self, database: str) -> str:
        return self.connection.dsn(owner=True, database=database)

    def app_dsn(self, database: str) -> str:
        return self.connection.dsn(database=database)


@dataclass(frozen=True)
class Dsns:
    name: str
    app: str
    owner: str


def start_test_cluster() -> tuple[EmbeddedPostgres, Cluster]:
    """The suite's throwaway cluster, started and with its migrated template. If this process ends without
    `stop_test_cluster` (pytest killed outright, a CI timeout), the cluster's watchdog stops it and
    deletes its directory."""
    # Under /tmp (not pytest's 0700 tmp dirs) so that, as root, the postgres user can reach it.
    data_dir = Path(tempfile.mkdtemp(prefix="bedside-test-pg-"))
    os.chmod(data_dir, 0o711)
    pg = EmbeddedPostgres(data_dir)
    # A throwaway cluster: crash safety buys nothing here.
    connection = pg.start(durable=False, discard=True)
    info = Cluster(connection=connection, data_dir=data_dir)

    async def prepare() -> None:
        await ensure_database(info.owner_dsn("postgres"), TEMPLATE)
        await prepare_database(info.owner_dsn(TEMPLATE), APP_LOGIN_ROLE, connection.app_password)

    try:
        asyncio.run(prepare())
    except BaseException:
        stop_test_cluster(pg, info)
        raise
    return pg, info


def stop_test_cluster(pg: EmbeddedPostgres, info: Cluster) -> None:
    pg.stop()
    shutil.rmtree(pg.pgdata.parent, ignore_errors=True)
    shutil.rmtree(info.data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    pg, info = start_test_cluster()
    try:
        yield info
    finally:
        stop_test_cluster(pg, info)


async def create_database(cluster: Cluster, template: str) -> str:
    """A new database of the suite's cluster, copied from `template`; its name."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    conn = await asyncpg.connect(cluster.owner_dsn("postgres"))
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await conn.close()
    return name


async def drop_database(cluster: Cluster, name: str) -> None:
    conn = await asyncpg.connect(cluster.owner_dsn("postgres"))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def database(cluster: Cluster) -> AsyncIterator[Dsns]:
    """A migrated database of this test's own, with the service's login role."""
    name = await create_database(cluster, TEMPLATE)
    yield Dsns(name=name, app=cluster.app_dsn(name), owner=cluster.owner_dsn(name))
    await drop_database(cluster, name)


@pytest.fixture
async def empty_database(cluster: Cluster) -> AsyncIterator[Dsns]:
    """A database with nothing in it, not even migrations."""
    name = await create_database(cluster, "template0")
    yield Dsns(name=name, app=cluster.app_dsn(name), owner=cluster.owner_dsn(name))
    await drop_database(cluster, name)


@pytest.fixture
def kek_file(tmp_path: Path) -> Path:
    return tmp_path / "kek.json"


@pytest.fixture
def signing_key_file(tmp_path: Path) -> Path:
    return tmp_path / "audit-signing.key"


def service_settings(app_dsn: str, kek_file: Path, signing_key_file: Path, **overrides: object) -> Settings:
    """The service's settings as the suite runs it: fresh key files, a quick sequencer, no issuer cache,
    a small pool; `overrides` on top."""
    return Settings(
        database_url=SecretStr(app_dsn),
        kek_file=kek_file,
        kek_file_create=True,
        audit_signing_key_file=signing_key_file,
        audit_signing_key_create=True,
        audit_batch_interval_seconds=0.05,
        issuer_cache_seconds=0,
        db_pool_min=1,
        db_pool_max=4,
        max_concurrent_uploads=3,  # of the 4 (half the pool, the default, would refuse a suite's parallel setups)
        shutdown_timeout_seconds=5,
        **overrides,
    )


@pytest.fixture
def settings(database: Dsns, kek_file: Path, signing_key_file: Path) -> Settings:
    return service_settings(database.app, kek_file, signing_key_file)


@dataclass
class Services:
    db: Database
    tenants: TenantService
    issuers: IssuerService
    keyring: PatientKeyring
    keys: KeyOperations
    kek: KekClient


def build_key_services(db: Database, kek_file: Path) -> tuple[KekClient, PatientKeyring, KeyOperations]:
    """The keyring and key operations as create_app builds them, over a real key file."""
    kek = KekClient(LocalKeyFileProvider(kek_file, create=True))
    keyring = PatientKeyring(DataKeyStore(), kek, DataKeyCache())
    recorder = AuditRecorder(AuditStore(), db)
    return kek, keyring, KeyOperations(db, TenantStore(), DataKeyStore(), kek, keyring, recorder)


@pytest.fixture
async def services(database: Dsns, kek_file: Path) -> AsyncIterator[Services]:
    """Domain services on the application role, for arranging what a test needs."""
    db = await Database.connect(database.app, min_size=1, max_size=8)
    tenant_store = TenantStore()
    recorder = AuditRecorder(AuditStore(), db)
    kek, keyring, keys = build_key_services(db, kek_file)
    yield Services(
        db=db,
        tenants=TenantService(db, tenant_store, recorder),
        issuers=IssuerService(db, tenant_store, IssuerStore(), recorder, cache_seconds=0),
        keyring=keyring,
        keys=keys,
        kek=kek,
    )
    await keys.close()
    kek.close()
    await db.close()


@dataclass
class Portals:
    """Two tenants, each with its EHR portal's issuer trusted."""

    acme: TestIssuer
    globex: TestIssuer


@pytest.fixture
async def portals(services: Services) -> Portals:
    acme = TestIssuer(tenant="acme", issuer="https://portal.acme.test")
    globex = TestIssuer(tenant="globex", issuer="https://portal.globex.test")
    for portal in (acme, globex):
        await services.tenants.create(portal.tenant)
        await services.issuers.add_key(portal.tenant, portal.issuer, portal.public_pem, kid=portal.kid)
    return Portals(acme=acme, globex=globex)


@pytest.fixture
async def app(settings: Settings) -> web.Application:
    return create_app(settings)


@pytest.fixture
async def client(
    app: web.Application,
    aiohttp_client: Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]],
) -> TestClient[web.Request, web.Application]:
    """The real application served over HTTP on loopback."""
    return await aiohttp_client(app)


@pytest.fixture
def softhsm_env(tmp_path: Path) -> dict[str, str]:
    """Two throwaway SoftHSM2 tokens (KEKs, audit signing) and the settings that use them."""
    from crypto.kek_pkcs11 import find_softhsm2_library

    library, util = find_softhsm2_library(), shutil.which("softhsm2-util")
    if library is None or util is None:
        pytest.fail("SoftHSM2 is required: apt-get install -y softhsm2 (deploy/dev test installs it)")
    (tmp_path / "tokens").mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tmp_path / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = {"SOFTHSM2_CONF": str(conf)}
    for label in ("bedside-cli", "bedside-audit"):
        subprocess.run(
            [util, "--init-token", "--free", "--label", label, "--so-pin", "so-1234", "--pin", "user-1234"],
            check=True,
            capture_output=True,
            env=os.environ | env,
        )
    return env | {
        "BEDSIDE_AUDIT_PKCS11_TOKEN_LABEL": "bedside-audit",
        "BEDSIDE_KEK_PROVIDER": "pkcs11",
        "BEDSIDE_PKCS11_LIBRARY": library,
        "BEDSIDE_PKCS11_TOKEN_LABEL": "bedside-cli",
        "BEDSIDE_PKCS11_PIN": "user-1234",
    }


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A webhook receiver on loopback (answers 200 unless told otherwise), stopped after the test."""
    from tests.api.webhook_helpers import Receiver  # it imports this module: not at the top

    receiver = Receiver()
    await receiver.start()
    yield receiver
    await receiver.stop()
