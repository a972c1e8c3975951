-- Runs once, when the stack's Postgres volume is first initialised, as the
-- database owner (POSTGRES_USER). Creates the relay's least-privilege login
-- role. The table grants follow in compose.yaml's `grant` service, after
-- `outboxd migrate` has created the table.
--
-- REPLICATION lets the relay create and stream its logical replication
-- slot (capture.mode replication / auto). The password is for this local
-- stack only.
CREATE ROLE outboxd LOGIN REPLICATION PASSWORD 'outboxd';
