-- Foundation: the application role, tenants, JWT issuers and their keys, row-level security.
--
-- Run as the owner role. The service connects as a login role that is a member of bedside_app, which
-- owns nothing, cannot bypass RLS, and holds only the grants below.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'bedside_app') THEN
        CREATE ROLE bedside_app NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    END IF;
END
$$;

REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO bedside_app;
GRANT SELECT ON schema_migrations TO bedside_app;

-- The tenant of the current transaction, set by the service with set_config(..., true).
-- Unset means NULL, and NULL matches no row: forgetting to set it shows nothing rather than everything.
CREATE FUNCTION bedside_tenant() RETURNS uuid
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT NULLIF(pg_catalog.current_setting('bedside.tenant_id', true), '')::uuid $$;

CREATE TABLE tenants (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    slug text NOT NULL UNIQUE CHECK (slug ~ '^[a-z][a-z0-9-]{1,62}$'),
    created_at timestamptz NOT NULL DEFAULT now()
);
-- Not tenant-owned: a token names its tenant by slug before any tenant is set.
GRANT SELECT, INSERT ON tenants TO bedside_app;

CREATE TABLE issuers (
    tenant_id uuid NOT NULL REFERENCES tenants (id),
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    issuer text NOT NULL CHECK (length(issuer) BETWEEN 1 AND 300),
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, issuer),
    UNIQUE (tenant_id, id)
);

CREATE TABLE issuer_keys (
    tenant_id uuid NOT NULL,
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    issuer_id uuid NOT NULL,
    kid text NOT NULL CHECK (length(kid) BETWEEN 1 AND 200),
    algorithm text NOT NULL CHECK (algorithm IN ('EdDSA', 'ES256', 'RS256')),
    public_key_pem text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz,
    UNIQUE (issuer_id, kid),
    FOREIGN KEY (tenant_id, issuer_id) REFERENCES issuers (tenant_id, id)
);

GRANT SELECT, INSERT ON issuers TO bedside_app;
GRANT SELECT, INSERT, UPDATE (revoked_at) ON issuer_keys TO bedside_app;

ALTER TABLE issuers ENABLE ROW LEVEL SECURITY;
ALTER TABLE issuer_keys ENABLE ROW LEVEL SECURITY;

CREATE POLICY tenant_isolation ON issuers TO bedside_app
    USING (tenant_id = bedside_tenant()) WITH CHECK (tenant_id = bedside_tenant());
CREATE POLICY tenant_isolation ON issuer_keys TO bedside_app
    USING (tenant_id = bedside_tenant()) WITH CHECK (tenant_id = bedside_tenant());
