-- The relay's role for capture.mode: polling. Complete: with only this, the
-- relay claims, publishes and marks rows. Run as an administrator (or as
-- the owner of the outbox table: every statement but the last one), after
-- the outbox migration. Replace outboxd with your role's name, and public
-- and outbox with your schema and table. `outboxd check --config FILE`,
-- run with the relay's config (so as this role), confirms it.
--
-- CREATE ROLE outboxd LOGIN PASSWORD 'change-me';

-- Find the table (PUBLIC has USAGE on public by default; other schemas need it).
GRANT USAGE ON SCHEMA public TO outboxd;
-- Read rows; claim them (FOR UPDATE) and mark them sent.
GRANT SELECT, UPDATE (sent_at) ON public.outbox TO outboxd;
-- Name the database in the relay's Kafka identity. PUBLIC may execute it by
-- default; granting it anyway keeps the identity stable if a hardening
-- script revokes it later. Without it the relay runs under a relay.name
-- stand-in identity and `check` warns.
GRANT EXECUTE ON FUNCTION pg_control_system() TO outboxd;
