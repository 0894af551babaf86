-- Secure messaging: threads, participants, messages (dense per-thread sequence), read receipts,
-- attachments (sealed in chunks), break-glass access, care teams, and the notifications outbox hook.
-- Every content field is ciphertext sealed with the patient's data key.

CREATE TABLE care_teams (
    tenant_id uuid NOT NULL REFERENCES tenants (id),
    team text NOT NULL CHECK (team ~ '^CareTeam/[A-Za-z0-9\-.]{1,64}$'),
    created_by text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, team)
);

CREATE TABLE threads (
    tenant_id uuid NOT NULL REFERENCES tenants (id),
    id uuid PRIMARY KEY,
    patient text NOT NULL CHECK (patient ~ '^Patient/[A-Za-z0-9\-.]{1,64}$'),
    subject bytea NOT NULL,
    priority text NOT NULL CHECK (priority IN ('routine', 'urgent')),
    sensitive boolean NOT NULL DEFAULT false,
    status text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closed')),
    created_by text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    closed_by text,
    closed_at timestamptz,
    last_seq bigint NOT NULL DEFAULT 0,
    last_activity timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, id)
);
-- Listings page on creation order: a new message never moves a thread from one page to another.
CREATE INDEX threads_by_patient ON threads (tenant_id, patient, created_at DESC, id);
CREATE INDEX threads_by_creation ON threads (tenant_id, created_at DESC, id);

CREATE TABLE thread_participants (
    tenant_id uuid NOT NULL,
    thread_id uuid NOT NULL,
    participant text NOT NULL CHECK (participant ~ '^(Practitioner|CareTeam)/[A-Za-z0-9\-.]{1,64}$'),
    PRIMARY KEY (thread_id, participant),
    FOREIGN KEY (tenant_id, thread_id) REFERENCES threads (tenant_id, id)
);
CREATE INDEX thread_participants_by_participant ON thread_participants (tenant_id, participant, thread_id);

-- Keyed by (thread, seq): "the latest 50 of a thread" is one index range scan at any table size.
CREATE TABLE messages (
    tenant_id uuid NOT NULL,
    thread_id uuid NOT NULL,
    seq bigint NOT NULL CHECK (seq >= 1),
    id uuid NOT NULL UNIQUE,
    sender text NOT NULL,
    sender_role text NOT NULL,
    body bytea NOT NULL,
    in_reply_to uuid,
    attachment_ids uuid[] NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    recalled_at timestamptz,
    recalled_by text,
    PRIMARY KEY (thread_id, seq),
    FOREIGN KEY (tenant_id, thread_id) REFERENCES threads (tenant_id, id)
);

CREATE TABLE read_receipts (
    tenant_id uuid NOT NULL,
    thread_id uuid NOT NULL,
    reader text NOT NULL,
    up_to bigint NOT NULL CHECK (up_to >= 0),
    read_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (thread_id, reader),
    FOREIGN KEY (tenant_id, thread_id) REFERENCES threads (tenant_id, id)
);

-- Attachments: uploaded into a thread (so sealed with its patient's key), streamed in chunks whose AAD
-- binds the attachment id, the chunk index and a final flag; the file name is sealed too.
CREATE TABLE attachments (
    tenant_id uuid NOT NULL,
    id uuid PRIMARY KEY,
    thread_id uuid NOT NULL,
    uploaded_by text NOT NULL,
    content_type text NOT NULL CHECK (content_type IN ('application/pdf', 'image/png', 'image/jpeg', 'text/plain')),
    file_name bytea NOT NULL,
    size bigint NOT NULL DEFAULT 0 CHECK (size >= 0),
    chunks integer NOT NULL DEFAULT 0 CHECK (chunks >= 0),
    complete boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, id),
    FOREIGN KEY (tenant_id, thread_id) REFERENCES threads (tenant_id, id)
);
CREATE TABLE attachment_chunks (
    tenant_id uuid NOT NULL,
    attachment_id uuid NOT NULL,
    idx integer NOT NULL CHECK (idx >= 0),
    data bytea NOT NULL,
    PRIMARY KEY (attachment_id, idx),
    FOREIGN KEY (tenant_id, attachment_id) REFERENCES attachments (tenant_id, id)
);

-- Break-glass: a physician outside a thread reads it for a limited time, with a (sealed) reason.
CREATE TABLE break_glass (
    tenant_id uuid NOT NULL,
    id uuid PRIMARY KEY,
    thread_id uuid NOT NULL,
    physician text NOT NULL,
    reason bytea NOT NULL,
    opened_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    reviewed_at timestamptz,
    reviewed_by text,
    FOREIGN KEY (tenant_id, thread_id) REFERENCES threads (tenant_id, id)
);
CREATE INDEX break_glass_open ON break_glass (tenant_id, thread_id, physician, expires_at);
CREATE INDEX break_glass_review ON break_glass (tenant_id, reviewed_at, opened_at);

-- The notifications hook: who wants to hear of what (delivery and its secrets come with webhooks), and
-- one outbox row per endpoint per event, written in the transaction of the event. Ids only.
CREATE TABLE webhook_endpoints (
    tenant_id uuid NOT NULL REFERENCES tenants (id),
    id uuid PRIMARY KEY,
    subscriber text NOT NULL CHECK (subscriber ~ '^(Practitioner|CareTeam)/[A-Za-z0-9\-.]{1,64}$'),
    event_types text[] NOT NULL,
    active boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, id)
);
CREATE INDEX webhook_endpoints_by_subscriber ON webhook_endpoints (tenant_id, subscriber) WHERE active;
CREATE TABLE webhook_outbox (
    tenant_id uuid NOT NULL,
    id uuid PRIMARY KEY,
    endpoint_id uuid NOT NULL,
    event_type text NOT NULL,
    payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (tenant_id, endpoint_id) REFERENCES webhook_endpoints (tenant_id, id)
);

GRANT SELECT, INSERT ON care_teams TO bedside_app;
GRANT SELECT, INSERT, UPDATE (status, closed_by, closed_at, last_seq, last_activity) ON threads TO bedside_app;
GRANT SELECT, INSERT ON thread_participants TO bedside_app;
GRANT SELECT, INSERT, UPDATE (recalled_at, recalled_by) ON messages TO bedside_app;
GRANT SELECT, INSERT, UPDATE (up_to, read_at) ON read_receipts TO bedside_app;
GRANT SELECT, INSERT, UPDATE (size, chunks, complete), DELETE ON attachments TO bedside_app;
GRANT SELECT, INSERT, DELETE ON attachment_chunks TO bedside_app;
GRANT SELECT, INSERT, UPDATE (reviewed_at, reviewed_by) ON break_glass TO bedside_app;
GRANT SELECT, INSERT, UPDATE (active, event_types) ON webhook_endpoints TO bedside_app;
GRANT SELECT, INSERT ON webhook_outbox TO bedside_app;

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['care_teams', 'threads', 'thread_participants', 'messages', 'read_receipts',
                             'attachments', 'attachment_chunks', 'break_glass', 'webhook_endpoints',
                             'webhook_outbox']
    LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY tenant_isolation ON %I TO bedside_app '
                       'USING (tenant_id = bedside_tenant()) WITH CHECK (tenant_id = bedside_tenant())', t);
    END LOOP;
END
$$;
