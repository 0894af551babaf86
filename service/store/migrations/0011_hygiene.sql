-- Hygiene of what the application role may do at the database, whatever the service's code says.
--
-- 1. `bedside_webhook_claim` (0007) is SECURITY DEFINER and crosses tenants: it took any lease length,
--    so one call could lease every due delivery of every tenant for a century. A lease is now 1 second to
--    1 hour (what BEDSIDE_WEBHOOK_LEASE_SECONDS allows); anything else (0, negative, NaN, infinite, NULL)
--    is refused and leases nothing. Same signature, same grants; plpgsql only to refuse before it leases.

CREATE OR REPLACE FUNCTION bedside_webhook_claim(p_owner uuid, p_lease_seconds double precision, p_limit integer)
    RETURNS TABLE (tenant_id uuid, id uuid)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
    AS $$
#variable_conflict use_column
BEGIN
    IF p_lease_seconds IS NULL OR NOT (p_lease_seconds BETWEEN 1 AND 3600) THEN
        RAISE EXCEPTION 'a webhook lease is 1 to 3600 seconds' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
        WITH due AS (
            SELECT o.id FROM webhook_outbox o
            WHERE o.status = 'pending' AND o.lease_owner IS NULL AND o.next_attempt_at <= now()
            ORDER BY o.next_attempt_at
            LIMIT p_limit
            FOR UPDATE SKIP LOCKED
        )
        UPDATE webhook_outbox o
        SET lease_owner = p_owner, lease_until = now() + make_interval(secs => p_lease_seconds)
        FROM due WHERE o.id = due.id
        RETURNING o.tenant_id, o.id;
END
$$;

REVOKE ALL ON FUNCTION bedside_webhook_claim(uuid, double precision, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION bedside_webhook_claim(uuid, double precision, integer) TO bedside_app;

-- 2. A revoked issuer key stays revoked. The application role may UPDATE `issuer_keys.revoked_at` (that
--    is how it revokes), which also let it clear the stamp and trust the key again, or move it. Once set,
--    `revoked_at` never changes: a revocation made by mistake is undone with a new key pair. For every
--    role, replicas included, like the other records that must not be rewritten.
CREATE FUNCTION bedside_issuer_key_revocation_is_final() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.revoked_at IS NOT NULL AND NEW.revoked_at IS DISTINCT FROM OLD.revoked_at THEN
        RAISE EXCEPTION 'issuer key % is revoked for good', OLD.id USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER issuer_keys_revocation_is_final BEFORE UPDATE ON issuer_keys
    FOR EACH ROW EXECUTE FUNCTION bedside_issuer_key_revocation_is_final();
ALTER TABLE issuer_keys ENABLE ALWAYS TRIGGER issuer_keys_revocation_is_final;
