-- Physician webhooks: endpoints with sealed URLs and secrets, deliveries with leases and retries, every
-- attempt recorded, and receipts of signed inbound replies.
--
-- The outbox rows that sends write in their own transaction (0005) are the deliveries: this migration
-- gives them a state. Cross-tenant work (claiming due deliveries, returning expired leases, finding an
-- inbound endpoint's tenant) goes through SECURITY DEFINER functions that return ids only; everything
-- else runs tenant-scoped under row-level security.

-- A tenant's own secrets (webhook URLs and signing secrets) are sealed with a tenant data key, kept
-- with the patients' keys so that rotation, rewrap and status cover it too.
ALTER TABLE data_keys DROP CONSTRAINT data_keys_patient_check;
ALTER TABLE data_keys ADD CONSTRAINT data_keys_owner_check
    CHECK (patient ~ '^Patient/[A-Za-z0-9\-.]{1,64}$' OR patient = 'Tenant/secrets');

-- Endpoints registered before this migration had no URL and could never be delivered to.
DELETE FROM webhook_outbox;
DELETE FROM webhook_endpoints;

ALTER TABLE webhook_endpoints
    ADD COLUMN url bytea NOT NULL,
    ADD COLUMN created_by text NOT NULL,
    ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now(),
    -- Disabled by the worker (410 Gone, or failing continuously) or by an admin: deliveries are held,
    -- not dropped, until it is enabled again.
    ADD COLUMN disabled_at timestamptz,
    ADD COLUMN disabled_reason text CHECK (disabled_reason IN ('gone', 'failing', 'admin')),
    ADD COLUMN failing_since timestamptz,
    ADD CONSTRAINT webhook_endpoints_disabled CHECK ((disabled_at IS NULL) = (disabled_reason IS NULL)),
    ADD CONSTRAINT webhook_endpoints_event_types CHECK (cardinality(event_types) BETWEEN 1 AND 16);
CREATE INDEX webhook_endpoints_by_tenant ON webhook_endpoints (tenant_id, created_at DESC, id);

-- Secrets: `outbound` (whsec_, signs what Bedside sends), `inbound` (whsec_, verifies replies) and
-- `ed25519` (whsk_, the optional v1a signature; its public key is public). Sealed under the tenant key.
-- Rotation adds a row and sets the previous one's `expires_at`: both are used until then.
CREATE TABLE webhook_endpoint_keys (
    tenant_id uuid NOT NULL,
    id uuid PRIMARY KEY,
    endpoint_id uuid NOT NULL,
    purpose text NOT NULL CHECK (purpose IN ('outbound', 'inbound', 'ed25519')),
    secret bytea NOT NULL,
    public_key text CHECK ((purpose = 'ed25519') = (public_key IS NOT NULL)),
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz,
    FOREIGN KEY (tenant_id, endpoint_id) REFERENCES webhook_endpoints (tenant_id, id)
);
CREATE INDEX webhook_endpoint_keys_by_endpoint ON webhook_endpoint_keys (endpoint_id, purpose, created_at);

ALTER TABLE webhook_outbox
    ADD COLUMN status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'succeeded', 'held', 'dead')),
    ADD COLUMN held_reason text CHECK (held_reason IN ('consent', 'endpoint-disabled')),
    -- `tries` counts attempts in the current pass through the retry schedule (a resend or a recovery
    -- starts a new pass); `attempts` counts them all.
    ADD COLUMN tries integer NOT NULL DEFAULT 0 CHECK (tries >= 0),
    ADD COLUMN attempts integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    ADD COLUMN next_attempt_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN lease_owner uuid,
    ADD COLUMN lease_until timestamptz,
    ADD COLUMN last_attempt_at timestamptz,
    ADD COLUMN last_status_code integer,
    ADD COLUMN delivered_at timestamptz,
    ADD CONSTRAINT webhook_outbox_held CHECK ((status = 'held') = (held_reason IS NOT NULL)),
    ADD CONSTRAINT webhook_outbox_lease CHECK ((lease_owner IS NULL) = (lease_until IS NULL));
-- The worker's claim: due, pending and not leased, oldest first.
CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt_at) WHERE status = 'pending' AND lease_owner IS NULL;
CREATE INDEX webhook_outbox_leased ON webhook_outbox (lease_until) WHERE lease_owner IS NOT NULL;
CREATE INDEX webhook_outbox_by_endpoint ON webhook_outbox (tenant_id, endpoint_id, created_at DESC, id);

-- One row per attempt: when, how long, the status code or a fixed error class. Never a response body.
CREATE TABLE webhook_attempts (
    tenant_id uuid NOT NULL,
    delivery_id uuid NOT NULL REFERENCES webhook_outbox (id),
    attempt integer NOT NULL CHECK (attempt >= 1),
    attempted_at timestamptz NOT NULL,
    duration_ms integer NOT NULL CHECK (duration_ms >= 0),
    status_code integer CHECK (status_code BETWEEN 100 AND 599),
    error_class text CHECK (error_class ~ '^[a-z][a-z0-9-]{0,40}$'),
    worker uuid NOT NULL,
    PRIMARY KEY (delivery_id, attempt)
);

-- Signed replies received: the same (endpoint, webhook-id) again is the same reply (same body hash) or
-- a conflict. Written in the transaction of the message it created.
CREATE TABLE inbound_receipts (
    tenant_id uuid NOT NULL,
    endpoint_id uuid NOT NULL,
    webhook_id text NOT NULL CHECK (webhook_id ~ '^[A-Za-z0-9_-]+$' AND length(webhook_id) <= 256),
    body_hash bytea NOT NULL CHECK (length(body_hash) = 32),
    key_id uuid NOT NULL,
    thread_id uuid NOT NULL,
    message_id uuid NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (endpoint_id, webhook_id),
    FOREIGN KEY (tenant_id, endpoint_id) REFERENCES webhook_endpoints (tenant_id, id)
);

GRANT UPDATE (url, updated_at, disabled_at, disabled_reason, failing_since) ON webhook_endpoints TO bedside_app;
GRANT SELECT, INSERT, UPDATE (expires_at) ON webhook_endpoint_keys TO bedside_app;
GRANT UPDATE (status, held_reason, tries, attempts, next_attempt_at, lease_owner, lease_until, last_attempt_at,
              last_status_code, delivered_at) ON webhook_outbox TO bedside_app;
GRANT SELECT, INSERT ON webhook_attempts TO bedside_app;
GRANT SELECT, INSERT ON inbound_receipts TO bedside_app;

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['webhook_endpoint_keys', 'webhook_attempts', 'inbound_receipts']
    LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY tenant_isolation ON %I TO bedside_app '
                       'USING (tenant_id = bedside_tenant()) WITH CHECK (tenant_id = bedside_tenant())', t);
    END LOOP;
END
$$;

-- Attempts are a record: never changed or removed by the application.
CREATE FUNCTION bedside_refuse_change() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER webhook_attempts_append_only BEFORE UPDATE OR DELETE ON webhook_attempts
    FOR EACH ROW EXECUTE FUNCTION bedside_refuse_change();

-- The worker, step 1 (any replica): lease up to p_limit due deliveries of any tenant. Ids only.
CREATE FUNCTION bedside_webhook_claim(p_owner uuid, p_lease_seconds double precision, p_limit integer)
    RETURNS TABLE (tenant_id uuid, id uuid)
    LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp
    AS $$
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
        RETURNING o.tenant_id, o.id
    $$;

-- The reaper: leases whose worker died (or stalled past the lease) go back to the queue, due now.
CREATE FUNCTION bedside_webhook_reap() RETURNS integer
    LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp
    AS $$
        WITH expired AS (
            UPDATE webhook_outbox SET lease_owner = NULL, lease_until = NULL
            WHERE lease_owner IS NOT NULL AND lease_until < now()
            RETURNING 1
        )
        SELECT count(*)::integer FROM expired
    $$;

-- Inbound replies name only the endpoint: which tenant's (enabled or not, never deleted) is it?
CREATE FUNCTION bedside_webhook_endpoint_tenant(p_endpoint uuid) RETURNS uuid
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp
    AS $$
        SELECT tenant_id FROM webhook_endpoints WHERE id = p_endpoint AND active
    $$;

REVOKE ALL ON FUNCTION bedside_webhook_claim(uuid, double precision, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION bedside_webhook_reap() FROM PUBLIC;
REVOKE ALL ON FUNCTION bedside_webhook_endpoint_tenant(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION bedside_webhook_claim(uuid, double precision, integer) TO bedside_app;
GRANT EXECUTE ON FUNCTION bedside_webhook_reap() TO bedside_app;
GRANT EXECUTE ON FUNCTION bedside_webhook_endpoint_tenant(uuid) TO bedside_app;
