-- Feature: capture.wait_for_sync_standbys (the default) on a server with
-- synchronous_standby_names set. The relay reads the standbys' flush
-- positions in pg_stat_replication, which only pg_read_all_stats (or
-- pg_monitor) shows. Run after replication.sql, as an administrator.
-- Without it the relay stops with this advice, and `outboxd check` fails.
GRANT pg_read_all_stats TO outboxd;
