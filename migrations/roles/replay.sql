-- Feature: `outboxd dead-letters replay` run as the relay's role. Replay
-- inserts each dead-lettered row again as a new unsent row, and records it
-- in outbox_replayed so that it is never inserted twice. Run after
-- polling.sql or replication.sql, as the table's owner or an administrator.
-- The relay itself needs none of this; `outboxd check` says whether this
-- role may replay (replay record: … may replay dead letters).
GRANT INSERT ON public.outbox TO outboxd;
GRANT SELECT, INSERT ON public.outbox_replayed TO outboxd;
