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

-- Outbox rows are insert-only: the row as inserted is the event. Replication
-- publishes what the INSERT wrote, so a change before COMMIT would never reach
-- Kafka (polling would publish the committed row). This guard refuses changing
-- an unsent row's event columns, and deleting a row in the transaction that
-- inserted it. The relay's marks (sent_at only) and deletes never trip it.
CREATE OR REPLACE FUNCTION "public"."outbox_insert_only"() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'outbox rows are insert-only: % of unsent row % (event id %) of %.% refused',
        TG_OP, OLD."seq", OLD."id", TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING HINT = 'Write the event''s final content in its INSERT: the relay publishes the row as inserted, and an UPDATE or DELETE before COMMIT would never reach Kafka (see the outboxd docs, docs/adding-the-outbox.md: Outbox rows are insert-only).';
END
$$;
CREATE OR REPLACE TRIGGER "outbox_insert_only_update" AFTER UPDATE OF "seq", "id", "aggregatetype", "aggregateid", "type", "payload", "headers", "tracingspancontext", "created_at" ON "public"."outbox"
    FOR EACH ROW WHEN (OLD."sent_at" IS NULL) EXECUTE FUNCTION "public"."outbox_insert_only"();
CREATE OR REPLACE TRIGGER "outbox_insert_only_delete" AFTER DELETE ON "public"."outbox"
    FOR EACH ROW WHEN (OLD."sent_at" IS NULL AND OLD.xmin = pg_current_xact_id_if_assigned()::xid)
    EXECUTE FUNCTION "public"."outbox_insert_only"();

-- `outboxd dead-letters replay` records each dead-lettered row it put back, so
-- none is inserted (and published) twice, also once the copy was published
-- and deleted (relay.after_publish: delete, relay.retention).
CREATE TABLE IF NOT EXISTS "public"."outbox_replayed" (
    "event_id"        text NOT NULL,
    "dead_letter_seq" bigint NOT NULL,
    "replayed_as_seq" bigint,
    "replayed_at"     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY ("event_id", "dead_letter_seq")
);

-- For capture.mode replication: inserts on the outbox table only.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'outbox_publication') THEN
        CREATE PUBLICATION "outbox_publication" FOR TABLE "public"."outbox" WITH (publish = 'insert');
    END IF;
END
$$;

-- A least-privilege role for the relay (run as an administrator, with a real
-- password; the GRANTs ON the table may also be run by its owner). Whoever runs
-- this file owns the table and the publication; the relay needs to own neither.
-- `outboxd check`, run as the relay's role, names each of these it lacks.
-- CREATE ROLE outboxd LOGIN PASSWORD 'change-me';
-- GRANT USAGE ON SCHEMA "public" TO outboxd;
-- GRANT SELECT, UPDATE ("sent_at") ON "public"."outbox" TO outboxd;
-- GRANT DELETE ON "public"."outbox" TO outboxd;  -- only for relay.after_publish: delete or relay.retention
-- ALTER ROLE outboxd WITH REPLICATION;  -- only for capture.mode: replication or auto (Amazon RDS/Aurora: GRANT rds_replication TO outboxd)
-- GRANT pg_read_all_stats TO outboxd;  -- only with synchronous standbys (capture.wait_for_sync_standbys)
-- GRANT EXECUTE ON FUNCTION pg_control_system() TO outboxd;  -- only where it was revoked from PUBLIC (PUBLIC may execute it by default)
-- Only for running `outboxd dead-letters replay` as this role:
-- GRANT INSERT ON "public"."outbox" TO outboxd;
-- GRANT SELECT, INSERT ON "public"."outbox_replayed" TO outboxd;
