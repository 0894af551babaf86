-- Each issuer authenticates the roles the operator allows it, and says who registered it.
--
-- Before, any key of any issuer of a tenant could sign a token of any role, and a tenant admin could add a
-- key under the EHR portal's issuer name: an admin (who sees no patient content) could mint physician or
-- compliance tokens. `roles` is what an issuer's tokens may claim; the authenticator refuses any other role.
-- Every issuer that exists keeps all six, so nothing changes for them. `registered_by` says whether the
-- operator (`bedside issuer add`) or a tenant admin (`POST /v1/admin/issuers`) created the issuer.
--
-- Neither column keeps a default: whoever inserts an issuer says which roles and by whom.

ALTER TABLE issuers
    ADD COLUMN roles text[] NOT NULL
        DEFAULT ARRAY['patient', 'proxy', 'physician', 'staff', 'compliance', 'admin']::text[]
        CONSTRAINT issuers_roles_known CHECK (
            array_ndims(roles) = 1
            AND cardinality(roles) BETWEEN 1 AND 6
            -- a NULL element is never contained, so it fails here too
            AND roles <@ ARRAY['patient', 'proxy', 'physician', 'staff', 'compliance', 'admin']::text[]
        ),
    ADD COLUMN registered_by text NOT NULL DEFAULT 'operator'
        CONSTRAINT issuers_registered_by_known CHECK (registered_by IN ('operator', 'admin'));

ALTER TABLE issuers ALTER COLUMN roles DROP DEFAULT, ALTER COLUMN registered_by DROP DEFAULT;

-- `bedside issuer roles` runs as the service's login, like the other `issuer` commands. Who registered an
-- issuer never changes.
GRANT UPDATE (roles) ON issuers TO bedside_app;
