-- The consent ledger: append-only events, a current-state table derived from them in the same
-- transaction (so `decide` is one index lookup), care-team membership with its history, and generic
-- idempotency keys for POSTs.

-- Care teams and their members, kept as history: (joined_at, left_at). The admin API for them comes with
-- messaging; consent needs "the current members of CareTeam/x" and "its members at time T".
CREATE TABLE care_team_members (
    tenant_id uuid NOT NULL REFERENCES tenants (id),
    team text NOT NULL CHECK (team ~ '^CareTeam/[A-Za-z0-9\-.]{1,64}$'),
    member text NOT NULL CHECK (member ~ '^[A-Z][A-Za-z]{1,63}/[A-Za-z0-9\-.]{1,64}$'),
    joined_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    left_at timestamptz,
    PRIMARY KEY (tenant_id, team, member, joined_at),
    CHECK (left_at IS NULL OR left_at >= joined_at)
);
CREATE UNIQUE INDEX care_team_members_current ON care_team_members (tenant_id, member, team) WHERE left_at IS NULL;
GRANT SELECT, INSERT, UPDATE (left_at) ON care_team_members TO bedside_app;

CREATE TABLE consent_events (
    tenant_id uuid NOT NULL REFERENCES tenants (id),
    id uuid PRIMARY KEY,
    patient text NOT NULL CHECK (patient ~ '^Patient/[A-Za-z0-9\-.]{1,64}$'),
    grantee text NOT NULL CHECK (length(grantee) BETWEEN 1 AND 200),
    scope text NOT NULL CHECK (scope IN ('messaging', 'proxy', 'disclosure', 'public_share')),
    item text NOT NULL DEFAULT '' CHECK (length(item) <= 200),
    purpose text CHECK (length(purpose) <= 40),
    kind text NOT NULL CHECK (kind IN ('grant', 'revoke')),
    revokes uuid REFERENCES consent_events (id),
    valid_from timestamptz,
    valid_until timestamptz,
    include_sensitive boolean NOT NULL DEFAULT false,
    evidence jsonb NOT NULL,
    reason text CHECK (length(reason) <= 40),
    recorded_by text NOT NULL,
    recorded_role text NOT NULL,
    recorded_at timestamptz NOT NULL,
    version bigint NOT NULL CHECK (version >= 1),
    hash bytea NOT NULL CHECK (length(hash) = 32),
    UNIQUE (tenant_id, id),
    UNIQUE (tenant_id, patient, grantee, scope, item, version),
    CHECK (kind = 'grant' OR revokes IS NOT NULL),
    CHECK (valid_until IS NULL OR valid_from IS NULL OR valid_until > valid_from)
);
CREATE INDEX consent_events_history ON consent_events (tenant_id, patient, recorded_at);

-- The latest event of each key: what `decide` reads. Updated in the append's transaction, under the
-- row's lock, so concurrent appends to one key serialize and the later commit is the state.
CREATE TABLE consent_state (
    tenant_id uuid NOT NULL REFERENCES tenants (id),
    patient text NOT NULL,
    grantee text NOT NULL,
    scope text NOT NULL,
    item text NOT NULL,
    event_id uuid NOT NULL REFERENCES consent_events (id),
    kind text NOT NULL,
    valid_from timestamptz,
    valid_until timestamptz,
    include_sensitive boolean NOT NULL,
    version bigint NOT NULL,
    PRIMARY KEY (tenant_id, patient, scope, grantee, item)
);

GRANT SELECT, INSERT ON consent_events TO bedside_app;
GRANT SELECT, INSERT, UPDATE ON consent_state TO bedside_app;

CREATE TRIGGER consent_events_append_only BEFORE UPDATE OR DELETE ON consent_events
    FOR EACH ROW EXECUTE FUNCTION bedside_audit_append_only();
CREATE TRIGGER consent_events_no_truncate BEFORE TRUNCATE ON consent_events
    FOR EACH STATEMENT EXECUTE FUNCTION bedside_audit_append_only();
ALTER TABLE consent_events ENABLE ALWAYS TRIGGER consent_events_append_only;
ALTER TABLE consent_events ENABLE ALWAYS TRIGGER consent_events_no_truncate;

-- Idempotency keys: the first response to (principal, key) is kept and replayed for 24 hours.
CREATE TABLE idempotency_keys (
    tenant_id uuid NOT NULL REFERENCES tenants (id),
    principal text NOT NULL,
    key text NOT NULL CHECK (length(key) BETWEEN 1 AND 200),
    request_hash bytea NOT NULL,
    status integer,
    response jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL DEFAULT now() + interval '24 hours',
    PRIMARY KEY (tenant_id, principal, key)
);
GRANT SELECT, INSERT, UPDATE (status, response), DELETE ON idempotency_keys TO bedside_app;

ALTER TABLE care_team_members ENABLE ROW LEVEL SECURITY;
ALTER TABLE consent_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE consent_state ENABLE ROW LEVEL SECURITY;
ALTER TABLE idempotency_keys ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON care_team_members TO bedside_app
    USING (tenant_id = bedside_tenant()) WITH CHECK (tenant_id = bedside_tenant());
CREATE POLICY tenant_isolation ON consent_events TO bedside_app
    USING (tenant_id = bedside_tenant()) WITH CHECK (tenant_id = bedside_tenant());
CREATE POLICY tenant_isolation ON consent_state TO bedside_app
    USING (tenant_id = bedside_tenant()) WITH CHECK (tenant_id = bedside_tenant());
CREATE POLICY tenant_isolation ON idempotency_keys TO bedside_app
    USING (tenant_id = bedside_tenant()) WITH CHECK (tenant_id = bedside_tenant());
