-- Compliance queries that combine an action with a time range: without this index the planner must pick
-- between scanning a tenant's whole time range and walking the action index backwards (p99 749 ms at 10
-- million events; with it and the two-step query in AuditStore.events, p99 under 20 ms).
CREATE INDEX audit_leaves_action_time ON audit_leaves (tenant_id, action, occurred_at, seq);
