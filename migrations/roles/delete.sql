-- Feature: relay.after_publish: delete, or relay.retention (with
-- after_publish: mark). Either one deletes rows, so the role needs DELETE.
-- Run after polling.sql or replication.sql, as the table's owner or an
-- administrator. `outboxd check` fails without it when either is set.
GRANT DELETE ON public.outbox TO outboxd;
