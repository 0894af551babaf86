-- The audit log: an outbox written by requests, and an RFC 9162 Merkle log integrated from it.
--
-- Requests INSERT into audit_outbox in the transaction of the work they record. The sequencer moves
-- committed outbox rows into audit_leaves with dense sequence numbers, stores the tree's nodes (for
-- proofs), its state, and a signed checkpoint. The application role can only INSERT into the outbox and
-- read; the sequencer's writes go through two SECURITY DEFINER functions that check what they can
-- (density, leaf hashes). Leaves, nodes and checkpoints refuse UPDATE, DELETE and TRUNCATE with triggers
-- that fire even with session_replication_role = replica. None of this stops a superuser: the Merkle
-- tree and the signed checkpoints make what a superuser does detectable (`bedside audit verify`).

CREATE TABLE audit_outbox (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id uuid NOT NULL UNIQUE,
    occurred_at timestamptz NOT NULL,
    tenant_id uuid REFERENCES tenants (id),
    action text NOT NULL,
    outcome text NOT NULL,
    actor text,
    actor_role text,
    issuer text,
    act_for text,
    patient text,
    resource_type text,
    resource_id text,
    purpose text,
    request_id text,
    source text,
    details jsonb NOT NULL DEFAULT '{}',
    entry bytea NOT NULL
);

CREATE TABLE audit_leaves (
    seq bigint PRIMARY KEY CHECK (seq >= 0),
    leaf_hash bytea NOT NULL CHECK (length(leaf_hash) = 32),
    integrated_at timestamptz NOT NULL DEFAULT now(),
    event_id uuid NOT NULL UNIQUE,
    occurred_at timestamptz NOT NULL,
    tenant_id uuid,
    action text NOT NULL,
    outcome text NOT NULL,
    actor text,
    actor_role text,
    issuer text,
    act_for text,
    patient text,
    resource_type text,
    resource_id text,
    purpose text,
    request_id text,
    source text,
    details jsonb NOT NULL,
    entry bytea NOT NULL
);
-- Compliance queries filter within a tenant and page by seq.
CREATE INDEX audit_leaves_tenant ON audit_leaves (tenant_id, seq);
CREATE INDEX audit_leaves_patient ON audit_leaves (tenant_id, patient, seq) WHERE patient IS NOT NULL;
CREATE INDEX audit_leaves_actor ON audit_leaves (tenant_id, actor, seq) WHERE actor IS NOT NULL;
CREATE INDEX audit_leaves_action ON audit_leaves (tenant_id, action, seq);
CREATE INDEX audit_leaves_resource ON audit_leaves (tenant_id, resource_type, resource_id, seq)
    WHERE resource_type IS NOT NULL;
CREATE INDEX audit_leaves_time ON audit_leaves (tenant_id, occurred_at);

-- Perfect subtree hashes: node (level, idx) covers leaves [idx * 2^level, (idx + 1) * 2^level).
-- Level 0 holds the leaf hashes. Hashes only, no content: every tenant may read them, so anyone can
-- check a proof or recompute a root.
CREATE TABLE audit_tree_nodes (
    level smallint NOT NULL CHECK (level BETWEEN 0 AND 63),
    idx bigint NOT NULL CHECK (idx >= 0),
    hash bytea NOT NULL CHECK (length(hash) = 32),
    PRIMARY KEY (level, idx)
);

CREATE TABLE audit_tree_state (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    size bigint NOT NULL,
    frontier bytea NOT NULL,
    root bytea NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO audit_tree_state (size, frontier, root)
VALUES (0, '\x010000000000000000', sha256(''::bytea));

CREATE TABLE audit_checkpoints (
    size bigint PRIMARY KEY CHECK (size > 0),
    root bytea NOT NULL CHECK (length(root) = 32),
    note text NOT NULL,
    signed_at timestamptz NOT NULL DEFAULT now()
);

GRANT SELECT, INSERT ON audit_outbox TO bedside_app;
GRANT SELECT ON audit_leaves, audit_tree_nodes, audit_tree_state, audit_checkpoints TO bedside_app;

-- The outbox and the leaves carry tenants' identifiers: each tenant sees its own rows only.
ALTER TABLE audit_outbox ENABLE ROW LEVEL SECURITY;
ALTER TABLE audit_leaves ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON audit_outbox TO bedside_app
    USING (tenant_id = bedside_tenant()) WITH CHECK (tenant_id IS NULL OR tenant_id = bedside_tenant());
CREATE POLICY tenant_isolation ON audit_leaves TO bedside_app USING (tenant_id = bedside_tenant());

-- Append-only: no UPDATE, DELETE or TRUNCATE, for anyone, replicas included.
CREATE FUNCTION bedside_audit_append_only() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only: % on % refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER audit_leaves_append_only BEFORE UPDATE OR DELETE ON audit_leaves
    FOR EACH ROW EXECUTE FUNCTION bedside_audit_append_only();
CREATE TRIGGER audit_leaves_no_truncate BEFORE TRUNCATE ON audit_leaves
    FOR EACH STATEMENT EXECUTE FUNCTION bedside_audit_append_only();
CREATE TRIGGER audit_tree_nodes_append_only BEFORE UPDATE OR DELETE ON audit_tree_nodes
    FOR EACH ROW EXECUTE FUNCTION bedside_audit_append_only();
CREATE TRIGGER audit_tree_nodes_no_truncate BEFORE TRUNCATE ON audit_tree_nodes
    FOR EACH STATEMENT EXECUTE FUNCTION bedside_audit_append_only();
CREATE TRIGGER audit_checkpoints_append_only BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION bedside_audit_append_only();
CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION bedside_audit_append_only();

ALTER TABLE audit_leaves ENABLE ALWAYS TRIGGER audit_leaves_append_only;
ALTER TABLE audit_leaves ENABLE ALWAYS TRIGGER audit_leaves_no_truncate;
ALTER TABLE audit_tree_nodes ENABLE ALWAYS TRIGGER audit_tree_nodes_append_only;
ALTER TABLE audit_tree_nodes ENABLE ALWAYS TRIGGER audit_tree_nodes_no_truncate;
ALTER TABLE audit_checkpoints ENABLE ALWAYS TRIGGER audit_checkpoints_append_only;
ALTER TABLE audit_checkpoints ENABLE ALWAYS TRIGGER audit_checkpoints_no_truncate;

-- The sequencer, step 1: claim the oldest committed outbox rows (locked until its transaction ends).
CREATE FUNCTION bedside_audit_claim(p_limit integer)
    RETURNS TABLE (id bigint, entry bytea)
    LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp
    AS $$
        SELECT o.id, o.entry FROM audit_outbox o ORDER BY o.id LIMIT p_limit FOR UPDATE SKIP LOCKED
    $$;

-- Step 2: append the claimed rows, in the given order, after the tree's current size; store the new
-- nodes, state and signed checkpoint. Refuses a stale size, rows that are not in the outbox, and leaf
-- hashes that are not SHA-256(0x00 || entry).
CREATE FUNCTION bedside_audit_append(
    p_expected_size bigint,
    p_ids bigint[],
    p_levels smallint[],
    p_idxs bigint[],
    p_hashes bytea[],
    p_frontier bytea,
    p_root bytea,
    p_note text
) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
    AS $$
DECLARE
    current_size bigint;
    appended bigint;
BEGIN
    SELECT size INTO current_size FROM audit_tree_state WHERE id FOR UPDATE;
    IF current_size <> p_expected_size THEN
        RAISE EXCEPTION 'audit tree size is %, not %', current_size, p_expected_size
            USING ERRCODE = 'serialization_failure';
    END IF;

    INSERT INTO audit_leaves (seq, leaf_hash, event_id, occurred_at, tenant_id, action, outcome, actor,
                              actor_role, issuer, act_for, patient, resource_type, resource_id, purpose,
                              request_id, source, details, entry)
    SELECT p_expected_size + u.ord - 1, sha256('\x00'::bytea || o.entry), o.event_id, o.occurred_at,
           o.tenant_id, o.action, o.outcome, o.actor, o.actor_role, o.issuer, o.act_for, o.patient,
           o.resource_type, o.resource_id, o.purpose, o.request_id, o.source, o.details, o.entry
    FROM unnest(p_ids) WITH ORDINALITY AS u (id, ord)
    JOIN audit_outbox o ON o.id = u.id;
    GET DIAGNOSTICS appended = ROW_COUNT;
    IF appended <> coalesce(array_length(p_ids, 1), 0) THEN
        RAISE EXCEPTION 'audit append: % of % outbox rows found', appended, array_length(p_ids, 1);
    END IF;

    INSERT INTO audit_tree_nodes (level, idx, hash)
    SELECT * FROM unnest(p_levels, p_idxs, p_hashes);

    IF EXISTS (
        SELECT 1 FROM audit_leaves l
        LEFT JOIN audit_tree_nodes n ON n.level = 0 AND n.idx = l.seq
        WHERE l.seq >= p_expected_size AND (n.hash IS NULL OR n.hash <> l.leaf_hash)
    ) THEN
        RAISE EXCEPTION 'audit append: leaf hashes do not match the entries';
    END IF;

    DELETE FROM audit_outbox WHERE id = ANY (p_ids);
    UPDATE audit_tree_state
    SET size = p_expected_size + appended, frontier = p_frontier, root = p_root, updated_at = now()
    WHERE id;
    INSERT INTO audit_checkpoints (size, root, note) VALUES (p_expected_size + appended, p_root, p_note);
    RETURN p_expected_size + appended;
END
$$;

REVOKE ALL ON FUNCTION bedside_audit_claim(integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION bedside_audit_append(bigint, bigint[], smallint[], bigint[], bytea[], bytea, bytea, text)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION bedside_audit_claim(integer) TO bedside_app;
GRANT EXECUTE ON FUNCTION bedside_audit_append(bigint, bigint[], smallint[], bigint[], bytea[], bytea, bytea, text)
    TO bedside_app;

-- How far the sequencer is behind, across tenants, for /readyz (counts and an age only).
CREATE FUNCTION bedside_audit_backlog()
    RETURNS TABLE (pending bigint, oldest timestamptz)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp
    AS $$ SELECT count(*), min(occurred_at) FROM audit_outbox $$;
REVOKE ALL ON FUNCTION bedside_audit_backlog() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION bedside_audit_backlog() TO bedside_app;
