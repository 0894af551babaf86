-- A revoked issuer key is never trusted again, at the database too.
--
-- 0011 made a revocation final: `issuer_keys.revoked_at`, once set, never changes. But the application role
-- may INSERT issuer keys (that is how an admin registers one), so its login could add the revoked key's
-- public key again under a new kid, trusted. The service refuses that (409 key-revoked); now the database
-- does too: a key whose public key is revoked anywhere in the tenant (under any issuer or kid) cannot be
-- inserted, unless it is inserted revoked. For every role, replicas included, like 0011's trigger.

CREATE FUNCTION bedside_issuer_key_not_revoked_before() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
    AS $$
BEGIN
    IF NEW.revoked_at IS NULL AND EXISTS (
        SELECT 1 FROM issuer_keys k
        WHERE k.tenant_id = NEW.tenant_id AND k.public_key_pem = NEW.public_key_pem AND k.revoked_at IS NOT NULL
    ) THEN
        RAISE EXCEPTION 'this public key was revoked in the tenant and is never trusted again'
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION bedside_issuer_key_not_revoked_before() FROM PUBLIC;
CREATE TRIGGER issuer_keys_not_revoked_before BEFORE INSERT ON issuer_keys
    FOR EACH ROW EXECUTE FUNCTION bedside_issuer_key_not_revoked_before();
ALTER TABLE issuer_keys ENABLE ALWAYS TRIGGER issuer_keys_not_revoked_before;
