-- Thread listings (`GET /v1/threads`) read a page of index entries, whatever the tenant's size.
--
-- A listing pages on the thread's (created_at, id), newest first (both descending). Before, it walked
-- `threads_by_creation` over the whole tenant and filtered, each page costing time in proportion to the
-- tenant's threads. Now each of its branches walks an index in exactly that order from the cursor on and
-- stops after a page: a patient's threads (or a proxy's patient's) come from `threads_by_patient`, and a
-- physician's or a staff member's through participation, directly or through a care team, from each
-- participant's entries, which for that carry the thread's creation time.
--
-- `thread_created_at` is always the thread's own `created_at`, whatever an INSERT says: a trigger copies
-- it from the thread row (which must exist: the foreign key), and neither column can be updated by the
-- service (`created_at` is not among the columns of threads it may update; it has no UPDATE on
-- thread_participants). Writers that do not name the column keep working.

ALTER TABLE thread_participants ADD COLUMN thread_created_at timestamptz;
UPDATE thread_participants p SET thread_created_at = t.created_at FROM threads t WHERE t.id = p.thread_id;
ALTER TABLE thread_participants ALTER COLUMN thread_created_at SET NOT NULL;

CREATE FUNCTION bedside_participant_thread_created_at() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    NEW.thread_created_at := (SELECT created_at FROM threads WHERE tenant_id = NEW.tenant_id AND id = NEW.thread_id);
    RETURN NEW;
END
$$;
CREATE TRIGGER thread_participants_thread_created_at BEFORE INSERT ON thread_participants
    FOR EACH ROW EXECUTE FUNCTION bedside_participant_thread_created_at();

-- In the listing's order: `id` descending too (it was ascending, which left a sort to the planner, and a
-- generic plan may then sort all of a patient's threads rather than stop after a page).
DROP INDEX threads_by_patient;
CREATE INDEX threads_by_patient ON threads (tenant_id, patient, created_at DESC, id DESC);

-- In the listing's order. It serves every lookup of a participant's threads that the index it replaces
-- (tenant_id, participant, thread_id) served; the listing was that index's only user.
CREATE INDEX thread_participants_by_participant_created
    ON thread_participants (tenant_id, participant, thread_created_at DESC, thread_id DESC);
DROP INDEX thread_participants_by_participant;
