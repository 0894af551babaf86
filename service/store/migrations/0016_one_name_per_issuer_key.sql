-- An issuer key is trusted under one name at a time: one issuer and one kid of its tenant.
--
-- Before, one public key could be registered under several kids, or issuers, of a tenant (an admin
-- replaying an endorsement with another kid; the operator adding the same PEM twice), and revoking it by one
-- kid left it trusted under the others, though "a revoked key is never trusted again". The service now
-- refuses a second name for an active key (409 key-in-use) and revokes a key under every name it has; this
-- index makes the database refuse the second name too, for the application's login and the owner alike.
--
-- Keys are compared by their fingerprint, the SHA-256 of the DER SubjectPublicKeyInfo that the stored PEM
-- encodes (the fingerprint the service shows and endorsements name): the same key written in another PEM
-- layout is the same key here too, and the index entries stay small whatever the key's size.
--
-- A database that already holds a key under two names (both active, or one revoked and one still trusted)
-- is left as it is: a migration cannot know which name the portal uses, and revoking a portal's key
-- silently would lock its users out. The migration fails instead, naming each such key (tenant, issuers,
-- kids), and runs once the operator has revoked them: `bedside issuer revoke` of this version revokes a
-- key under every name it has, and it works before this migration is applied.

CREATE FUNCTION bedside_issuer_key_fingerprint(pem text) RETURNS bytea
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$
        SELECT pg_catalog.sha256(
            pg_catalog.decode(pg_catalog.regexp_replace(pem, '-----[^-]*-----', '', 'g'), 'base64')
        )
    $$;
REVOKE ALL ON FUNCTION bedside_issuer_key_fingerprint(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION bedside_issuer_key_fingerprint(text) TO bedside_app;

DO $$
DECLARE
    found text;
    how_many integer;
BEGIN
    SELECT pg_catalog.string_agg(line, E'\n' ORDER BY line), pg_catalog.count(*) INTO found, how_many
    FROM (
        SELECT pg_catalog.format(
            'tenant %s: one key under %s',
            t.slug,
            pg_catalog.string_agg(
                pg_catalog.format(
                    'issuer %s kid %s (%s)',
                    i.issuer,
                    k.kid,
                    CASE WHEN k.revoked_at IS NULL THEN 'active' ELSE 'revoked' END
                ),
                ', ' ORDER BY k.created_at, k.kid
            )
        ) AS line
        FROM issuer_keys k
        JOIN issuers i ON i.tenant_id = k.tenant_id AND i.id = k.issuer_id
        JOIN tenants t ON t.id = k.tenant_id
        GROUP BY t.slug, k.tenant_id, bedside_issuer_key_fingerprint(k.public_key_pem)
        HAVING pg_catalog.count(*) > 1 AND pg_catalog.count(*) FILTER (WHERE k.revoked_at IS NULL) > 0
    ) AS keys;
    IF how_many > 0 THEN
        RAISE EXCEPTION '% issuer key(s) are registered under more than one name (issuer and kid) of their '
            'tenant and still trusted under at least one; a key may have one name only. Nothing was changed',
            how_many
            USING DETAIL = found,
                  HINT = 'Revoke each of these keys with `bedside issuer revoke --tenant T --issuer ISS --kid K` '
                      'of this version (any one of its names: it revokes the key under all of them; give the '
                      'portal a new key first if it still signs with this one), then run `bedside migrate` again.';
    END IF;
END
$$;

CREATE UNIQUE INDEX issuer_keys_one_name_per_key
    ON issuer_keys (tenant_id, bedside_issuer_key_fingerprint(public_key_pem))
    WHERE revoked_at IS NULL;
