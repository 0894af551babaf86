-- Envelope encryption: one data key (DEK) per patient per tenant, stored only wrapped by a KEK.
--
-- A DEK may have several wraps (one per KEK version during rotation). Crypto-shredding deletes a
-- patient's wraps and stamps shredded_at: the row stays as the tombstone, the key is gone for good.

CREATE TABLE data_keys (
    tenant_id uuid NOT NULL REFERENCES tenants (id),
    id uuid PRIMARY KEY,
    version integer NOT NULL DEFAULT 1 CHECK (version >= 1),
    patient text NOT NULL CHECK (patient ~ '^Patient/[A-Za-z0-9\-.]{1,64}$'),
    created_at timestamptz NOT NULL DEFAULT now(),
    shredded_at timestamptz,
    shredded_by text,
    UNIQUE (tenant_id, patient),
    UNIQUE (tenant_id, id)
);

CREATE TABLE data_key_wraps (
    tenant_id uuid NOT NULL,
    dek_id uuid NOT NULL,
    kek_id text NOT NULL CHECK (length(kek_id) BETWEEN 1 AND 200),
    kek_version integer NOT NULL CHECK (kek_version >= 0),
    wrapped bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dek_id, kek_id, kek_version),
    FOREIGN KEY (tenant_id, dek_id) REFERENCES data_keys (tenant_id, id)
);
-- Rotation finds the wraps still under older KEK versions.
CREATE INDEX data_key_wraps_by_kek ON data_key_wraps (tenant_id, kek_id, kek_version);

GRANT SELECT, INSERT, UPDATE (shredded_at, shredded_by) ON data_keys TO bedside_app;
GRANT SELECT, INSERT, DELETE ON data_key_wraps TO bedside_app;

ALTER TABLE data_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE data_key_wraps ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON data_keys TO bedside_app
    USING (tenant_id = bedside_tenant()) WITH CHECK (tenant_id = bedside_tenant());
CREATE POLICY tenant_isolation ON data_key_wraps TO bedside_app
    USING (tenant_id = bedside_tenant()) WITH CHECK (tenant_id = bedside_tenant());

-- A shredded key stays shredded: no wrap may be added back, and the stamp cannot be undone.
CREATE FUNCTION bedside_refuse_unshred() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.shredded_at IS NOT NULL THEN
        RAISE EXCEPTION 'data key % is shredded', OLD.id USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER data_keys_shred_is_final BEFORE UPDATE ON data_keys
    FOR EACH ROW EXECUTE FUNCTION bedside_refuse_unshred();

CREATE FUNCTION bedside_refuse_wrap_of_shredded() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM data_keys WHERE id = NEW.dek_id AND shredded_at IS NOT NULL) THEN
        RAISE EXCEPTION 'data key % is shredded', NEW.dek_id USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER data_key_wraps_not_for_shredded BEFORE INSERT ON data_key_wraps
    FOR EACH ROW EXECUTE FUNCTION bedside_refuse_wrap_of_shredded();
