#!/usr/bin/env bash
# `make demo`: the relay end to end on a local PostgreSQL and Kafka.
# Runs inside scripts/with-stack.sh, which exports the servers' addresses.
set -euo pipefail

bin=target/debug
work="$OUTBOXD_STACK_DIR"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# The example config as shipped; the environment points it at this stack,
# the way a deployment would override the file.
export OUTBOXD__POSTGRES__URL="$OUTBOXD_TEST_PG_URL"
export OUTBOXD__KAFKA__BOOTSTRAP_SERVERS="$OUTBOXD_TEST_KAFKA"
config=examples/outboxd.yaml

say "outboxd migrate: create the outbox table, index, notify trigger, publication"
"$bin/outboxd" migrate --config "$config"

say "outboxd check: can the relay run here?"
"$bin/outboxd" check --config "$config" || true

say "outboxd run (in the background, log in $work/outboxd.log)"
"$bin/outboxd" run --config "$config" 2>"$work/outboxd.log" &
relay_pid=$!
trap 'kill -TERM "$relay_pid" 2>/dev/null || true' EXIT
# Wait until it leads and has fenced and reconciled, so the lag below is the
# relay's steady state rather than its start-up.
for _ in $(seq 1 300); do
  grep -q "relay started" "$work/outboxd.log" && break
  kill -0 "$relay_pid" 2>/dev/null || { cat "$work/outboxd.log"; exit 1; }
  sleep 0.2
done

say "capture mode (capture.mode: auto)"
sed 's/\x1b\[[0-9;]*m//g' "$work/outboxd.log" | grep -E "capture mode auto chose|created the replication slot" || true

say "order service: placing orders in real business transactions (every fifth rolls back)"
"$bin/examples/order_service" write "$OUTBOXD_TEST_PG_URL" 25

lag_sql="SELECT count(*) FILTER (WHERE sent_at IS NULL) AS pending,
       count(*) FILTER (WHERE sent_at IS NOT NULL) AS sent,
       coalesce(round(extract(epoch FROM now() - min(created_at) FILTER (WHERE sent_at IS NULL))::numeric, 3), 0)
         AS oldest_unsent_s,
       round((percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM sent_at - created_at)) * 1000)::numeric, 1)
         AS p50_write_to_sent_ms,
       round((max(extract(epoch FROM sent_at - created_at)) * 1000)::numeric, 1) AS max_write_to_sent_ms
FROM outbox"
for _ in $(seq 1 100); do
  pending=$(psql "$OUTBOXD_TEST_PG_URL" -Atc "SELECT count(*) FROM outbox WHERE sent_at IS NULL")
  [ "$pending" = 0 ] && break
  sleep 0.2
done

say "relay lag (from the outbox table)"
psql "$OUTBOXD_TEST_PG_URL" -P pager=off -c "$lag_sql"

say "outboxd status: the lag view for a person"
"$bin/outboxd" status --config "$config"

say "GET /metrics (excerpt)"
python3 - <<'PY'
import urllib.request
text = urllib.request.urlopen("http://127.0.0.1:9464/metrics", timeout=5).read().decode()
for line in text.splitlines():
    if line.startswith(("outboxd_events_published_total", "outboxd_pending_rows", "outboxd_oldest_unsent",
                        "outboxd_leader", "outboxd_capture_mode", "outboxd_kafka_transactions_total",
                        "outboxd_event_latency_seconds_count", "outboxd_replication_slot_retained")):
        print("  " + line)
PY

say "replication slot lag (WAL the slot still holds, and how far its confirmed position is behind)"
psql "$OUTBOXD_TEST_PG_URL" -P pager=off -c "SELECT slot_name, plugin, active, wal_status,
       pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)) AS retained_wal,
       pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)) AS confirmed_behind
FROM pg_replication_slots"

say "events in Kafka, read with isolation.level=read_committed"
"$bin/examples/order_service" consume "$OUTBOXD_TEST_KAFKA" outbox.Order payments.captured

say "stopping the relay with SIGTERM"
kill -TERM "$relay_pid"
wait "$relay_pid" && echo "relay exited 0"
trap - EXIT
say "relay log"
sed 's/\x1b\[[0-9;]*m//g' "$work/outboxd.log" | grep -v "PartitionEOF" | tail -n 15
