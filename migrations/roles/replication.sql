-- The relay's role for capture.mode: replication (or auto, to stream).
-- Complete: the polling grants plus the right to replicate. Run as an
-- administrator: REPLICATION is a role attribute. Replace outboxd, public
-- and outbox as in polling.sql. `outboxd check` confirms it. pg_hba.conf
-- must also let the role connect to the database.
--
-- Amazon RDS and Aurora: instead of ALTER ROLE … REPLICATION, run
--   GRANT rds_replication TO outboxd;
-- Google Cloud SQL: run it as a member of cloudsqlsuperuser.
--
-- CREATE ROLE outboxd LOGIN PASSWORD 'change-me';

GRANT USAGE ON SCHEMA public TO outboxd;
GRANT SELECT, UPDATE (sent_at) ON public.outbox TO outboxd;
GRANT EXECUTE ON FUNCTION pg_control_system() TO outboxd;
-- Create the slot and stream from the walsender.
ALTER ROLE outboxd WITH REPLICATION;
