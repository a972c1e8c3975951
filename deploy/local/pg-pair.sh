#!/usr/bin/env bash
# A PostgreSQL primary with one physical streaming standby that it waits
# for (synchronous_standby_names), as plain processes, for the tests of
# what a failover does to the relay.
#
#   pg-pair.sh up DIR              initdb the primary (wal_level=logical,
#                                  synchronous_commit=on), pg_basebackup -R
#                                  the standby, start both, write DIR/env
#   pg-pair.sh down DIR            stop both (idempotent)
#   pg-pair.sh stop-standby DIR    stop the standby: the primary's commits
#                                  then wait for it
#   pg-pair.sh start-standby DIR   start it again on its port and data
#   pg-pair.sh crash-primary DIR   stop the primary with `-m immediate`
#   pg-pair.sh promote DIR         promote the standby and wait until it
#                                  takes writes
#
# The standby is `standby1` to the primary (its application_name) and has
# no synchronous standby of its own, so once promoted it commits alone.
# Uses stack.sh's helpers (server binaries, ports, the postgres user).
set -euo pipefail

# shellcheck source=stack.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/stack.sh"

STANDBY_NAME=standby1

pair_up() {
    local dir bin port sport
    dir=$(abs_dir "$1")
    if is_ours "$(read_pid "$dir/primary.pid")" "$dir/primary/data" \
        || is_ours "$(read_pid "$dir/standby.pid")" "$dir/standby/data"; then
        die "a pair is already running in $dir (run: $0 down $dir)"
    fi
    rm -rf "$dir/primary" "$dir/standby" "$dir"/*.pid "$dir"/*.port "$dir/env"
    [[ $EUID -eq 0 ]] && chmod o+x "$dir"
    # OUTBOXD_PG_VERSION's server, recorded for the later commands.
    use_pg_bin "$dir"
    bin=$(pg_bin "$dir")

    start_pg "$dir" primary logical
    port=$(cat "$dir/primary.port")
    # The stack's test profile turns synchronous_commit off; commits must
    # wait for the standby here, which is the point of the pair.
    cat >>"$dir/primary/data/postgresql.conf" <<EOF

# --- synchronous standby (pg-pair.sh) ---
synchronous_commit = on
synchronous_standby_names = '$STANDBY_NAME'
EOF
    as_pg "$bin/pg_ctl" -D "$dir/primary/data" reload >/dev/null 2>&1 \
        || die_with_log "$dir/primary/postgres.log" "primary did not reload its settings"

    free_port sport
    mkdir -p "$dir/standby"
    [[ $EUID -eq 0 ]] && chown postgres: "$dir/standby"
    chmod 700 "$dir/standby"
    say "postgres: base backup of the primary for the standby"
    as_pg "$(client_tool "$bin" pg_basebackup)" -h 127.0.0.1 -p "$port" -U postgres -D "$dir/standby/data" \
        -R -X stream -c fast >"$dir/standby/basebackup.log" 2>&1 \
        || die_with_log "$dir/standby/basebackup.log" "pg_basebackup failed"
    # Later lines win: the standby's own port, no synchronous standby of
    # its own (it inherited the primary's), and a primary_conninfo naming
    # it so the primary's synchronous_standby_names matches it.
    cat >>"$dir/standby/data/postgresql.conf" <<EOF

# --- standby (pg-pair.sh) ---
port = $sport
synchronous_standby_names = ''
EOF
    cat >>"$dir/standby/data/postgresql.auto.conf" <<EOF
primary_conninfo = 'host=127.0.0.1 port=$port user=postgres application_name=$STANDBY_NAME'
EOF
    echo "$sport" >"$dir/standby.port"
    start_standby "$dir"

    # Up means the primary counts the standby as synchronous.
    local i state
    for ((i = 0; i < 240; i++)); do
        state=$(psql_at "$port" "SELECT sync_state FROM pg_stat_replication WHERE application_name = '$STANDBY_NAME'")
        [[ $state == sync ]] && break
        sleep 0.25
    done
    [[ $state == sync ]] || die_with_log "$dir/standby/postgres.log" "the standby did not become synchronous"

    cat >"$dir/env" <<EOF
export OUTBOXD_PAIR_PRIMARY_URL=postgres://postgres@127.0.0.1:$port/postgres
export OUTBOXD_PAIR_STANDBY_URL=postgres://postgres@127.0.0.1:$sport/postgres
EOF
    say "pair up: primary 127.0.0.1:$port (pid $(cat "$dir/primary.pid")), synchronous standby 127.0.0.1:$sport (pid $(cat "$dir/standby.pid"))"
}

# A client tool from the server's build, else Debian's (the npm server
# builds ship no client tools).
client_tool() {
    if [[ -x "$1/$2" ]]; then echo "$1/$2"; else echo "$(debian_pg_bin)/$2"; fi
}

# A one-value query as the postgres superuser; empty when it fails.
psql_at() {
    "$(debian_pg_bin)/psql" -X -A -t -q -h 127.0.0.1 -p "$1" -U postgres -d postgres -c "$2" 2>/dev/null || true
}

start_standby() {
    local dir=$1 bin port i
    bin=$(pg_bin "$dir")
    port=$(cat "$dir/standby.port")
    as_pg "$bin/pg_ctl" -D "$dir/standby/data" -l "$dir/standby/postgres.log" -w -t 60 start >/dev/null 2>&1 \
        || die_with_log "$dir/standby/postgres.log" "the standby failed to start"
    head -n 1 "$dir/standby/data/postmaster.pid" >"$dir/standby.pid"
    for ((i = 0; i < 120; i++)); do
        "$bin/pg_isready" -q -h 127.0.0.1 -p "$port" -U postgres && return 0
        sleep 0.25
    done
    die_with_log "$dir/standby/postgres.log" "the standby does not answer pg_isready"
}

pair_down() {
    local dir=$1
    [[ -d "$dir" ]] || return 0
    dir=$(cd "$dir" && pwd -P)
    stop_pg "$dir" standby
    stop_pg "$dir" primary
}

pair_dir() {
    local dir
    dir=$(cd "$1" && pwd -P)
    [[ -f "$dir/standby.port" ]] || die "no pair in $dir (run: $0 up $dir)"
    echo "$dir"
}

stop_standby() {
    local dir pid
    dir=$(pair_dir "$1")
    pid=$(read_pid "$dir/standby.pid")
    if is_ours "$pid" "$dir/standby/data"; then
        as_pg "$(pg_bin "$dir")/pg_ctl" -D "$dir/standby/data" -m fast -w -t "$STOP_TIMEOUT" stop >/dev/null 2>&1 \
            || die_with_log "$dir/standby/postgres.log" "the standby did not stop"
        wait_gone "$pid"
    fi
    rm -f "$dir/standby.pid"
    say "standby stopped"
}

crash_primary() {
    local dir pid
    dir=$(pair_dir "$1")
    pid=$(read_pid "$dir/primary.pid")
    if is_ours "$pid" "$dir/primary/data"; then
        as_pg "$(pg_bin "$dir")/pg_ctl" -D "$dir/primary/data" -m immediate -w -t "$STOP_TIMEOUT" stop >/dev/null 2>&1 \
            || die_with_log "$dir/primary/postgres.log" "the primary did not stop"
        wait_gone "$pid"
    fi
    say "primary crashed (stopped with -m immediate)"
}

promote() {
    local dir port i
    dir=$(pair_dir "$1")
    port=$(cat "$dir/standby.port")
    as_pg "$(pg_bin "$dir")/pg_ctl" -D "$dir/standby/data" -w -t 60 promote >/dev/null 2>&1 \
        || die_with_log "$dir/standby/postgres.log" "the standby was not promoted"
    for ((i = 0; i < 240; i++)); do
        [[ $(psql_at "$port" "SELECT pg_is_in_recovery()") == f ]] && break
        sleep 0.25
    done
    [[ $(psql_at "$port" "SELECT pg_is_in_recovery()") == f ]] \
        || die_with_log "$dir/standby/postgres.log" "the promoted standby still reports recovery"
    say "standby promoted: 127.0.0.1:$port takes writes"
}

pair_main() {
    [[ $# -ge 2 ]] || { sed -n '2,19s/^# \{0,1\}//p' "$0" >&2; exit 2; }
    local cmd=$1; shift
    case $cmd in
        up) pair_up "$1" ;;
        down) pair_down "$1" ;;
        stop-standby) stop_standby "$1" ;;
        start-standby) start_standby "$(pair_dir "$1")" ;;
        crash-primary) crash_primary "$1" ;;
        promote) promote "$1" ;;
        *) sed -n '2,19s/^# \{0,1\}//p' "$0" >&2; exit 2 ;;
    esac
}

pair_main "$@"
