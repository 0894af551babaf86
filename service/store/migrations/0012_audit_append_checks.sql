-- The sequencer's append checks the tree it is handed, not only the leaves.
--
-- `bedside_audit_append` (0003) recomputed every leaf hash but stored the interior nodes, the frontier,
-- the root and the note as the caller gave them. The caller is the application role, so its login (an
-- SQL injection, a stolen password) could store a node at a position the sequencer completes later,
-- after which every append fails on the primary key and the log stops for good, or a root that is not
-- the root of the leaves. Now the database accepts only the tree that follows from the leaves:
--
-- 1. The nodes are exactly those this append completes: growing the tree from `old` to `new` leaves
--    completes node (level l, idx i), which covers leaves [i * 2^l, (i + 1) * 2^l), iff
--    old < (i + 1) * 2^l <= new, that is (old >> l) <= i < (new >> l). Any other node, and a missing
--    one, is refused. Level 0 included: a leaf-level node beyond the new size is refused too. Every
--    node given is one of those and there are as many as there are of those; the primary key refuses
--    one given twice (as it did before), so together they are exactly those.
-- 2. Every node of level >= 1 hashes to SHA-256(0x01 || left || right) of its two children as stored
--    (this append's or earlier ones'). With the leaf hashes checked against their entries, every
--    stored node is then the true subtree hash, by induction on the level.
-- 3. The root is the RFC 9162 root of `new` leaves folded from the stored perfect subtrees (one per set
--    bit of `new`, folded from the right), the frontier is `0x01 || uint64be(new) || those hashes`
--    (largest first, `crypto.merkle.TreeFrontier.to_bytes`), and the note's checkpoint body names `new`
--    and the root on its second and third lines (`crypto.checkpoint.format_checkpoint`). The note's
--    signature, by a key the database does not hold, is left to `bedside audit verify`.
--
-- The signature, the grants and the function's other checks are as in 0003.

CREATE OR REPLACE FUNCTION bedside_audit_append(
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
    new_size bigint;
    completed bigint;
    given bigint;
    bad record;
    subtrees bytea[];
    found_subtrees bigint;
    set_bits bigint;
    frontier_hashes bytea;
    root bytea;
BEGIN
    SELECT size INTO current_size FROM audit_tree_state WHERE id FOR UPDATE;
    IF current_size <> p_expected_size THEN
        RAISE EXCEPTION 'audit tree size is %, not %', current_size, p_expected_size
            USING ERRCODE = 'serialization_failure';
    END IF;
    IF coalesce(cardinality(p_ids), 0) = 0 THEN
        RAISE EXCEPTION 'audit append: no outbox rows to append';
    END IF;
    new_size := p_expected_size + cardinality(p_ids);

    -- 1. Only nodes this append completes, as many as it completes (the primary key refuses one given
    -- twice), before anything is written.
    given := coalesce(cardinality(p_levels), 0);
    IF coalesce(cardinality(p_idxs), 0) <> given OR coalesce(cardinality(p_hashes), 0) <> given THEN
        RAISE EXCEPTION 'audit append: node levels, indexes and hashes differ in number';
    END IF;
    SELECT n.level, n.idx INTO bad
    FROM unnest(p_levels, p_idxs) AS n (level, idx)
    WHERE NOT coalesce(
        CASE WHEN n.level BETWEEN 0 AND 62
             THEN n.idx >= p_expected_size >> n.level AND n.idx < new_size >> n.level END,
        false)
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'audit append: node (%, %) is not one that growing the tree from % to % completes',
            bad.level, bad.idx, p_expected_size, new_size;
    END IF;
    SELECT sum((new_size >> l) - (p_expected_size >> l)) INTO completed FROM generate_series(0, 62) AS l;
    IF given <> completed THEN
        RAISE EXCEPTION 'audit append: growing the tree from % to % completes % nodes, % given',
            p_expected_size, new_size, completed, given;
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
    IF appended <> cardinality(p_ids) THEN
        RAISE EXCEPTION 'audit append: % of % outbox rows found', appended, cardinality(p_ids);
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

    -- 2. Each new interior node is the hash of its children. The right child is always one of this
    -- append's nodes, the left one too but for the first node of a level, whose left child an earlier
    -- append stored: joining the given nodes among themselves is cheaper than ~2 index probes a node.
    WITH n AS MATERIALIZED (SELECT * FROM unnest(p_levels, p_idxs, p_hashes) AS n (level, idx, hash))
    SELECT p.level, p.idx INTO bad
    FROM n p
    LEFT JOIN n l ON l.level = p.level - 1 AND l.idx = 2 * p.idx
    LEFT JOIN n r ON r.level = p.level - 1 AND r.idx = 2 * p.idx + 1
    WHERE p.level > 0 AND p.hash IS DISTINCT FROM sha256('\x01'::bytea || coalesce(l.hash, (
        SELECT t.hash FROM audit_tree_nodes t WHERE t.level = p.level - 1 AND t.idx = 2 * p.idx)) || r.hash)
    ORDER BY p.level, p.idx  -- the lowest: a forged node makes its ancestors wrong too
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'audit append: node (%, %) is not the hash of its children', bad.level, bad.idx;
    END IF;

    -- 3. The root, the frontier and the note, from the stored perfect subtrees of the new size: for each
    -- set bit l of new_size, node (l, (new_size >> l) - 1), largest first.
    SELECT array_agg(n.hash ORDER BY b.l DESC), string_agg(n.hash, ''::bytea ORDER BY b.l DESC), count(n.hash),
           count(*)
    INTO subtrees, frontier_hashes, found_subtrees, set_bits
    FROM generate_series(0, 62) AS b (l)
    LEFT JOIN audit_tree_nodes n ON n.level = b.l AND n.idx = (new_size >> b.l) - 1
    WHERE (new_size >> b.l) & 1 = 1;
    IF found_subtrees <> set_bits THEN
        RAISE EXCEPTION 'audit append: a perfect subtree of the new tree is missing';
    END IF;
    root := subtrees[cardinality(subtrees)];
    FOR i IN REVERSE cardinality(subtrees) - 1 .. 1 LOOP
        root := sha256('\x01'::bytea || subtrees[i] || root);
    END LOOP;
    IF p_root IS DISTINCT FROM root THEN
        RAISE EXCEPTION 'audit append: the root is not the root of the % leaves', new_size;
    END IF;
    IF p_frontier IS DISTINCT FROM '\x01'::bytea || int8send(new_size) || frontier_hashes
    THEN
        RAISE EXCEPTION 'audit append: the frontier is not the frontier of the % leaves', new_size;
    END IF;
    IF split_part(p_note, E'\n', 2) IS DISTINCT FROM new_size::text
       OR split_part(p_note, E'\n', 3) IS DISTINCT FROM encode(root, 'base64') THEN
        RAISE EXCEPTION 'audit append: the checkpoint note does not name size % and its root', new_size;
    END IF;

    DELETE FROM audit_outbox WHERE id = ANY (p_ids);
    UPDATE audit_tree_state
    SET size = new_size, frontier = p_frontier, root = p_root, updated_at = now()
    WHERE id;
    INSERT INTO audit_checkpoints (size, root, note) VALUES (new_size, p_root, p_note);
    RETURN new_size;
END
$$;

REVOKE ALL ON FUNCTION bedside_audit_append(bigint, bigint[], smallint[], bigint[], bytea[], bytea, bytea, text)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION bedside_audit_append(bigint, bigint[], smallint[], bigint[], bytea[], bytea, bytea, text)
    TO bedside_app;
