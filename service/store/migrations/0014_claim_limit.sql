-- `bedside_webhook_claim` (0007, 0011) crosses tenants as its owner: it bounded the lease but not the
-- number of deliveries one call leases, and `LIMIT NULL` is no limit at all. A call now leases 1 to 1000
-- deliveries (the worker asks for at most BEDSIDE_WEBHOOK_CONCURRENCY, itself at most 1000); anything
-- else (0, negative, NULL, more) is refused and leases nothing. Same signature, same grants.

CREATE OR REPLACE FUNCTION bedside_webhook_claim(p_owner uuid, p_lease_seconds double precision, p_limit integer)
    RETURNS TABLE (tenant_id uuid, id uuid)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
    AS $$
#variable_conflict use_column
BEGIN
    IF p_lease_seconds IS NULL OR NOT (p_lease_seconds BETWEEN 1 AND 3600) THEN
        RAISE EXCEPTION 'a webhook lease is 1 to 3600 seconds' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_limit IS NULL OR NOT (p_limit BETWEEN 1 AND 1000) THEN
        RAISE EXCEPTION 'a webhook claim leases 1 to 1000 deliveries' USING ERRCODE = 'invalid_parameter_value';
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
