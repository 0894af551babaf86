-- The hot paths' share of PostgreSQL's work.
--
-- 1. No foreign key from the audit outbox or the idempotency keys to `tenants`. Every audited request
--    and every claimed key checked it with `SELECT 1 FROM tenants ... FOR KEY SHARE`: one row that every
--    concurrent transaction locked, so each new locker made a new MultiXact of all current ones (more WAL
--    and SLRU work per request as concurrency grows). The constraint guarded nothing the schema does not
--    already: both tables' row-level security policy admits only rows of the transaction's tenant, the
--    service sets that tenant from an authenticated principal whose tenant row it read, and no role but
--    the owner may delete a tenant (bedside_app has SELECT and INSERT on `tenants` only). The other
--    tables keep their foreign keys: they are written once per thread, consent or key, not per request.
--
-- 2. Expired idempotency keys are purged in batches by a worker (`bedside_idempotency_purge`), not
--    deleted by every claim: a claim is one statement again when its key is new.

ALTER TABLE audit_outbox DROP CONSTRAINT audit_outbox_tenant_id_fkey;
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_tenant_id_fkey;

-- Delete up to p_limit expired keys of any tenant; returns how many. SECURITY DEFINER because the purge
-- crosses tenants; it takes a number and returns a number, nothing of any row.
CREATE FUNCTION bedside_idempotency_purge(p_limit integer) RETURNS integer
    LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp
    AS $$
        WITH gone AS (
            DELETE FROM idempotency_keys WHERE ctid = ANY (ARRAY(
                SELECT ctid FROM idempotency_keys WHERE expires_at <= now()
                LIMIT greatest(p_limit, 0) FOR UPDATE SKIP LOCKED
            ))
            RETURNING 1
        )
        SELECT count(*)::integer FROM gone
    $$;
REVOKE ALL ON FUNCTION bedside_idempotency_purge(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION bedside_idempotency_purge(integer) TO bedside_app;
