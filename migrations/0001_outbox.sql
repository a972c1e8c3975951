-- outboxd: the outbox table. Column names follow Debezium's Outbox Event Router.
-- Copy this file into your service's migrations, or run `outboxd migrate`.
-- Every statement is idempotent.

CREATE TABLE IF NOT EXISTS "public"."outbox" (
    "seq"                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    "id"                 uuid NOT NULL DEFAULT gen_random_uuid(),
    "aggregatetype"      text NOT NULL,
    "aggregateid"        text NOT NULL,
    "type"               text NOT NULL,
    "payload"            jsonb,
    "headers"            jsonb,
    "tracingspancontext" text,
    "created_at"         timestamptz NOT NULL DEFAULT now(),
    "sent_at"            timestamptz
);

-- The relay claims unsent rows in seq order; this index keeps that cheap
-- however many sent rows the table holds.
CREATE INDEX IF NOT EXISTS "outbox_unsent_idx" ON "public"."outbox" ("seq") WHERE "sent_at" IS NULL;

-- Wakes the relay when a transaction that inserted events commits, so
-- latency is not a poll interval. Statement-level: one notification per
-- INSERT, however many rows; none for rolled-back transactions.
CREATE OR REPLACE FUNCTION "public"."outbox_notify"() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_inserted', '');
    RETURN NULL;
END
$$;
CREATE OR REPLACE TRIGGER "outbox_notify" AFTER INSERT ON "public"."outbox"
    FOR EACH STATEMENT EXECUTE FUNCTION "public"."outbox_notify"();

-- For capture.mode replication: inserts on the outbox table only.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'outbox_publication') THEN
        CREATE PUBLICATION "outbox_publication" FOR TABLE "public"."outbox" WITH (publish = 'insert');
    END IF;
END
$$;

-- A least-privilege role for the relay (run as an administrator, with a real password):
-- CREATE ROLE outboxd LOGIN PASSWORD 'change-me';
-- GRANT USAGE ON SCHEMA "public" TO outboxd;
-- GRANT SELECT, UPDATE ("sent_at") ON "public"."outbox" TO outboxd;
-- GRANT DELETE ON "public"."outbox" TO outboxd;      -- only for relay.after_publish: delete
-- ALTER ROLE outboxd REPLICATION;              -- only for capture.mode: replication
-- GRANT pg_read_all_stats TO outboxd;          -- only with synchronous standbys (capture.wait_for_sync_standbys)
