"""Envelope encryption for the service: one data key (DEK) per patient, wrapped by the KEK provider.

Everything a patient or physician writes is sealed with that patient's DEK. A DEK is created on first
use, stored only wrapped, unwrapped on demand and cached within bounds. Every read checks the key's row
in the same transaction first, so a key shredded by another process is refused at once even where this
process still has it cached.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar
from uuid import UUID

from crypto.dek_cache import DataKeyCache
from crypto.envelope import key_ref_bytes, open_record, open_records, read_key_ref, seal
from crypto.errors import DecryptionError, KekVersionUnavailableError
from crypto.kek import KekProvider, WrappedKey, dek_wrap_aad
from crypto.keys import DataKey
from service.errors import ShreddedError
from service.store.data_keys import DataKeyRecord, DataKeyStore, WrapRecord
from service.store.db import Tx

T = TypeVar("T")

TENANT_KEY_OWNER = "Tenant/secrets"  # the owner of the tenant's own data key (not a patient: never shredded)


class KekClient:
    """The KEK provider behind one worker thread: its calls block (file, HSM) and it is not
    thread-safe, so they run one at a time, off the event loop."""

    def __init__(self, provider: KekProvider) -> None:
        self.provider = provider
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bedside-kek")

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def wrap(self, key: DataKey, aad: bytes) -> WrappedKey:
        return await self.call(self.provider.wrap, key.secret, aad)

    async def unwrap(self, wrapped: WrappedKey, aad: bytes) -> bytes:
        return await self.call(self.provider.unwrap, wrapped, aad)

    async def usable_versions(self) -> tuple[str, int, tuple[int, ...]]:
        """(kek_id, primary version, versions that can unwrap)."""

        def facts() -> tuple[str, int, tuple[int, ...]]:
            return self.provider.kek_id, self.provider.primary_version, self.provider.versions()

        return await self.call(facts)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def wrap_aad(tenant_id: UUID, key: DataKey | DataKeyRecord, patient: str) -> bytes:
    return dek_wrap_aad(dek_id=key.id, dek_version=key.version, tenant=str(tenant_id), patient=patient)


class PatientKeyring:
    def __init__(self, store: DataKeyStore, kek: KekClient, cache: DataKeyCache) -> None:
        self._store = store
        self._kek = kek
        self._cache = cache
        # Each tenant's own key, by id and version only: the secret stays in the bounded cache.
        self._tenant_keys: dict[UUID, tuple[UUID, int]] = {}

    async def seal_for(self, tx: Tx, patient: str, plaintext: bytes, context: Mapping[str, str]) -> bytes:
        """Seal `plaintext` with the patient's DEK (made on first use), bound to the tenant and `context`."""
        tenant_id = _tenant(tx)
        key = await self.key_for_writing(tx, patient)
        return seal(key, plaintext, _with_tenant(tenant_id, context))

    async def seal_with(
        self, tx: Tx, patient: str, record: DataKeyRecord | None, plaintext: bytes, context: Mapping[str, str]
    ) -> bytes:
        """`seal_for` with the patient's key row as this transaction has already read it FOR SHARE (in a
        statement that read more, such as MessagingStore.send_facts), so it costs no round trip; a
        shredded key is refused the same way. None: the patient has no key yet, made as `seal_for` does."""
        tenant_id = _tenant(tx)
        if record is None:
            key = await self.key_for_writing(tx, patient)
        elif record.patient != patient:
            raise ValueError("the key row is not this patient's")
        else:
            key = await self._unwrapped(tenant_id, record)
        return seal(key, plaintext, _with_tenant(tenant_id, context))

    async def open(self, tx: Tx, sealed: bytes, context: Mapping[str, str]) -> bytes:
        """Open a record sealed by `seal_for` with the same context. `ShreddedError` if its key was
        destroyed; `DecryptionError` (an alarm, not a client error) for anything else that is wrong."""
        tenant_id = _tenant(tx)
        key = await self.key_for_reading(tx, sealed)
        return open_record(key, sealed, _with_tenant(tenant_id, context))

    async def key_for_writing(self, tx: Tx, patient: str) -> DataKey:
        tenant_id = _tenant(tx)
        record = await self._store.for_patient(tx, tenant_id, patient, for_write=True)
        if record is None:
            key = DataKey.generate()
            wrapped = await self._kek.wrap(key, wrap_aad(tenant_id, key, patient))
            wrap = WrapRecord(wrapped.kek_id, wrapped.kek_version, wrapped.wrapped)
            if await self._store.create(tx, tenant_id, key.id, key.version, patient, wrap):
                self._cache.put(key)
                return key
            # A concurrent request created the patient's key first: use that one.
            record = await self._store.for_patient(tx, tenant_id, patient, for_write=True)
            if record is None:
                raise DecryptionError()
        return await self._unwrapped(tenant_id, record)

    async def tenant_key(self, tx: Tx) -> DataKey:
        """The tenant's own data key (owner `TENANT_KEY_OWNER`, made on first use), for what belongs to
        no patient: webhook secrets, request fingerprints. Shredding is per patient, so this key is never
        shredded, and while the cache holds it no row is read: it costs a hot path no round trip."""
        tenant_id = _tenant(tx)
        known = self._tenant_keys.get(tenant_id)
        if known is not None and (cached := self._cache.get(*known)) is not None:
            return cached
        key = await self.key_for_writing(tx, TENANT_KEY_OWNER)
        self._tenant_keys[tenant_id] = (key.id, key.version)
        return key

    async def key_for_reading(self, tx: Tx, sealed: bytes) -> DataKey:
        tenant_id = _tenant(tx)
        ref = read_key_ref(sealed)
        record = await self._store.by_id(tx, tenant_id, ref.dek_id)
        if record is None or record.version != ref.dek_version:
            raise DecryptionError()
        return await self._unwrapped(tenant_id, record)

    async def open_many(
        self, tx: Tx, items: Sequence[tuple[bytes, Mapping[str, str]]], known: DataKeyRecord | None = None
    ) -> list[bytes]:
        """Open several records (a page of messages): each distinct data key is looked up, and its
        shredding checked, once per call rather than once per record. `known`: a key row this transaction
        has already read (the patient's, read with the page), used for the records it sealed without
        another lookup."""
        tenant_id = _tenant(tx)
        tenant = str(tenant_id)  # formatted once per page, not once per record
        keys: dict[tuple[UUID, int], DataKey] = {}
        # Records grouped by the header bytes that name their key: the same key bytes need no parsing
        # the second time, and each group is opened in one batch (a page is usually all one key).
        groups: dict[bytes, tuple[DataKey, list[int]]] = {}
        for at, (sealed, context) in enumerate(items):
            header = key_ref_bytes(sealed)
            group = groups.get(header)
            if group is None:
                ref = read_key_ref(sealed)
                key = keys.get((ref.dek_id, ref.dek_version))
                if key is None:
                    if known is not None and (known.id, known.version) == (ref.dek_id, ref.dek_version):
                        key = await self._unwrapped(tenant_id, known)
                    else:
                        key = await self.key_for_reading(tx, sealed)
                    keys[(ref.dek_id, ref.dek_version)] = key
                group = groups[header] = (key, [])
            if "tenant" in context:
                raise ValueError("the keyring binds the tenant itself; do not pass it in the context")
            group[1].append(at)
        opened: list[bytes] = [b""] * len(items)
        for key, positions in groups.values():
            batch = open_records(key, [(items[at][0], {"tenant": tenant, **items[at][1]}) for at in positions])
            for at, plaintext in zip(positions, batch, strict=True):
                opened[at] = plaintext
        return opened

    async def _unwrapped(self, tenant_id: UUID, record: DataKeyRecord) -> DataKey:
        if record.shredded_at is not None:
            self._cache.discard(record.id)
            raise ShreddedError(record.shredded_at)
        cached = self._cache.get(record.id, record.version)
        if cached is not None:
            return cached
        kek_id, primary, usable = await self._kek.usable_versions()
        candidates = sorted(
            (w for w in record.wraps if w.kek_id == kek_id and w.kek_version in usable),
            key=lambda w: (w.kek_version == primary, w.kek_version),
            reverse=True,
        )
        if not candidates:
            raise KekVersionUnavailableError("no wrap of this data key can be opened by the configured KEK")
        wrap = candidates[0]
        secret = await self._kek.unwrap(
            WrappedKey(wrap.kek_id, wrap.kek_version, wrap.wrapped), wrap_aad(tenant_id, record, record.patient)
        )
        key = DataKey(record.id, record.version, secret)
        self._cache.put(key)
        return key

    def forget(self, dek_id: UUID) -> None:
        self._cache.discard(dek_id)


def _tenant(tx: Tx) -> UUID:
    if tx.tenant_id is None:
        raise RuntimeError("patient keys are used only in a tenant-scoped transaction")
    return tx.tenant_id


def _with_tenant(tenant_id: UUID, context: Mapping[str, str]) -> dict[str, str]:
    if "tenant" in context:
        raise ValueError("the keyring binds the tenant itself; do not pass it in the context")
    return {"tenant": str(tenant_id), **context}
