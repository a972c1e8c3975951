#!/usr/bin/env bash
# A PostgreSQL primary with one physical streaming standby that it waits
# for (synchronous_standby_names), as plain processes, for the tests of
# what a failover does to the relay.
#
#   pg-pair.sh up DIR [OPTIONS]    initdb the primary (wal_level=logical,
#                                  synchronous_commit=on), base-backup the
#                                  standby, start both, write DIR/env
#   pg-pair.sh down DIR            stop every server of the pair (idempotent)
#   pg-pair.sh stop-standby DIR    stop the standby: the primary's commits
#                                  then wait for it
#   pg-pair.sh start-standby DIR   start it again on its port and data
#   pg-pair.sh crash-primary DIR   stop the primary with `-m immediate`
#   pg-pair.sh promote DIR         promote the standby and wait until it
#                                  takes writes; it is the primary from now
#                                  on, and the pair has no standby
#   pg-pair.sh new-standby DIR     after a promotion: base-backup a new
#                                  standby from the promoted server, make it
#                                  the synchronous one, write DIR/env
#   pg-pair.sh fork-crashed-primary DIR
#                                  after crash-primary: start the old
#                                  primary in recovery with nothing to
#                                  stream from, promote it (a new timeline
#                                  holding all it had), stop it, and give
#                                  its timeline history file to the standby
#                                  (as a shared WAL archive would)
#
# OPTIONS (remembered for every later standby of the pair):
#   --strict          a standby, once promoted, waits for the next standby
#                     (synchronous_standby_names names it before it exists),
#                     as Patroni's synchronous_mode_strict: no commit returns
#                     and nothing is released to a relay until `new-standby`
#   --failover-slots  PostgreSQL 17+: the standby synchronises failover
#                     slots (sync_replication_slots = on, hot_standby_feedback
#                     = on, primary_slot_name, dbname in primary_conninfo) and
#                     the primary has synchronized_standby_slots name the
#                     standby's physical slot. Fails on older servers.
#
# Servers are DIR/nodeN (node0 the first primary); the standby of node N is
# `standbyN` to its primary (application_name) and streams through the
# physical slot `standbyN_slot`. Without --strict a promoted standby has no
# synchronous standby of its own, so it commits alone. The server is the
# stack's PostgreSQL (OUTBOXD_PG_VERSION, as stack.sh picks it); client
# tools the npm builds lack (psql, pg_basebackup) are Debian's, and where
# Debian's pg_basebackup is older than the server the base backup is taken
# with pg_backup_start/pg_backup_stop and a copy of the data directory.
# Uses stack.sh's helpers (server binaries, ports, the postgres user).
set -euo pipefail

# shellcheck source=stack.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/stack.sh"

usage() { sed -n '2,46s/^# \{0,1\}//p' "$0" >&2; exit 2; }

# A client tool: the server's own when it has one, else Debian's newest.
client_tool() {
    local dir=$1 tool=$2 bin d
    bin=$(pg_bin "$dir")
    if [[ -x "$bin/$tool" ]]; then echo "$bin/$tool"; return 0; fi
    d=$(printf '%s\n' /usr/lib/postgresql/*/bin/"$tool" | grep -v '\*' | sort -V | tail -n 1)
    if [[ -z "$d" ]]; then d=$(command -v "$tool") || die "$tool not found (run install-deps.sh)"; fi
    echo "$d"
}

# A one-value query as the postgres superuser; empty when it fails.
psql_at() {
    "$(client_tool "$PAIR" psql)" -X -A -t -q -h 127.0.0.1 -p "$1" -U postgres -d postgres -c "$2" 2>/dev/null || true
}

# A statement that must succeed.
psql_must() {
    "$(client_tool "$PAIR" psql)" -X -A -t -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$1" -U postgres -d postgres -c "$2" >/dev/null \
        || die "on 127.0.0.1:$1: $2 failed"
}

option() { [[ -f "$PAIR/options" ]] && grep -qx -- "$1" "$PAIR/options"; }
node_port() { cat "$PAIR/$1.port"; }
node_data() { echo "$PAIR/$1/data"; }
primary_node() { cat "$PAIR/primary.node"; }
standby_node() {
    [[ -s "$PAIR/standby.node" ]] || die "the pair in $PAIR has no standby (run: $0 new-standby $PAIR)"
    cat "$PAIR/standby.node"
}
# node3 -> 3
node_index() { echo "${1#node}"; }

server_major() {
    local v
    v=$(psql_at "$1" "SHOW server_version_num")
    [[ -n "$v" ]] || die "no answer from 127.0.0.1:$1"
    echo $((v / 10000))
}

appendconf() {
    local file=$1
    shift
    printf '%s\n' "" "$@" >>"$file"
}

reload() {
    local node=$1
    as_pg "$(pg_bin "$PAIR")/pg_ctl" -D "$(node_data "$node")" reload >/dev/null 2>&1 \
        || die_with_log "$PAIR/$node/postgres.log" "$node did not reload its settings"
}

# A base backup of the server on port SRC_PORT (data directory SRC_DATA)
# into DEST_DATA, its WAL kept by the physical slot SLOT.
base_backup() {
    local src_port=$1 src_data=$2 dest=$3 slot=$4 basebackup client server log
    log=$(dirname "$dest")/basebackup.log
    basebackup=$(client_tool "$PAIR" pg_basebackup)
    client=$("$basebackup" --version | sed -E 's/^[^0-9]*([0-9]+).*/\1/')
    server=$(server_major "$src_port")
    if ((client >= server)); then
        say "postgres: base backup of 127.0.0.1:$src_port (pg_basebackup $client)"
        as_pg "$basebackup" -h 127.0.0.1 -p "$src_port" -U postgres -D "$dest" \
            -X stream -c fast -S "$slot" >"$log" 2>&1 \
            || die_with_log "$log" "pg_basebackup failed"
        return 0
    fi
    # pg_basebackup refuses servers newer than itself: the low-level API,
    # as the manual's "Making a Base Backup Using the Low Level API".
    say "postgres: base backup of PostgreSQL $server at 127.0.0.1:$src_port (pg_backup_start, copy, pg_backup_stop)"
    mkdir -p "$dest"
    "$(client_tool "$PAIR" psql)" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$src_port" -U postgres -d postgres \
        >"$log" 2>&1 <<EOF || die_with_log "$log" "the base backup failed"
SELECT pg_backup_start('pg-pair', true);
\\! tar -C '$src_data' --exclude=./postmaster.pid --exclude=./postmaster.opts --exclude='./pg_wal/*' --exclude='./pg_replslot/*' --exclude='./pg_stat_tmp/*' --exclude=./standby.signal --exclude=./backup_label --warning=none --ignore-failed-read -cf - . | tar -C '$dest' -xf -
\\pset format unaligned
\\pset tuples_only on
\\o '$dest/backup_label'
SELECT labelfile FROM pg_backup_stop(false);
\\o
EOF
    [[ -s "$dest/backup_label" && -f "$dest/PG_VERSION" ]] || die_with_log "$log" "the base backup is incomplete"
    mkdir -p "$dest/pg_wal/archive_status"
    [[ $EUID -eq 0 ]] && chown -R postgres: "$dest"
    chmod 700 "$dest"
}

# Base-backs up node PRIMARY into a new node (the next number), configures
# it as its standby, starts it and waits until PRIMARY counts it as its
# synchronous standby.
add_standby() {
    local primary=$1 pport index node sport name slot data conninfo
    pport=$(node_port "$primary")
    index=$(( $(cat "$PAIR/next.node") ))
    echo $((index + 1)) >"$PAIR/next.node"
    node=node$index
    name=standby$index
    slot=${name}_slot

    # The slot keeps the WAL from the backup's start until the standby
    # streams; the standby streams through it from then on.
    psql_must "$pport" "SELECT pg_create_physical_replication_slot('$slot', true)"
    free_port sport
    mkdir -p "$PAIR/$node"
    [[ $EUID -eq 0 ]] && chown postgres: "$PAIR/$node"
    chmod 700 "$PAIR/$node"
    data=$(node_data "$node")
    base_backup "$pport" "$(node_data "$primary")" "$data" "$slot"
    as_pg touch "$data/standby.signal"

    conninfo="host=127.0.0.1 port=$pport user=postgres application_name=$name"
    # Later lines win over what the backup copied from the primary: its own
    # port, and, once promoted, its own synchronous standby (none, or the
    # next one with --strict) and no standby slots of the old primary's.
    local next_sync=""
    option --strict && next_sync="standby$((index + 1))"
    appendconf "$data/postgresql.conf" "# --- standby $name (pg-pair.sh) ---" \
        "port = $sport" \
        "synchronous_standby_names = '$next_sync'"
    if option --failover-slots; then
        conninfo="$conninfo dbname=postgres"
        appendconf "$data/postgresql.conf" \
            "sync_replication_slots = on" \
            "hot_standby_feedback = on" \
            "synchronized_standby_slots = ''"
    fi
    appendconf "$data/postgresql.auto.conf" \
        "primary_conninfo = '$conninfo'" \
        "primary_slot_name = '$slot'"
    echo "$sport" >"$PAIR/$node.port"
    echo "$node" >"$PAIR/standby.node"
    start_node "$node"

    # The primary waits for this standby, and with --failover-slots its
    # failover slots' walsenders wait for this standby's slot.
    local lines=("# --- synchronous standby $name (pg-pair.sh) ---" "synchronous_standby_names = '$name'")
    option --failover-slots && lines+=("synchronized_standby_slots = '$slot'")
    appendconf "$(node_data "$primary")/postgresql.conf" "${lines[@]}"
    reload "$primary"

    # Up means the primary counts the standby as synchronous.
    local i state
    for ((i = 0; i < 240; i++)); do
        state=$(psql_at "$pport" "SELECT sync_state FROM pg_stat_replication WHERE application_name = '$name'")
        [[ $state == sync ]] && break
        sleep 0.25
    done
    [[ $state == sync ]] || die_with_log "$PAIR/$node/postgres.log" "the standby did not become synchronous"
    if option --failover-slots; then
        [[ $(psql_at "$pport" "SHOW synchronized_standby_slots") == "$slot" ]] \
            || die "the primary did not take synchronized_standby_slots = '$slot'"
    fi
    write_env
    say "standby $name (pid $(cat "$PAIR/$node.pid")) on 127.0.0.1:$sport is synchronous to $primary on 127.0.0.1:$pport"
}

write_env() {
    local primary standby
    primary=$(primary_node)
    {
        echo "export OUTBOXD_PAIR_PRIMARY_URL=postgres://postgres@127.0.0.1:$(node_port "$primary")/postgres"
        if [[ -s "$PAIR/standby.node" ]]; then
            standby=$(cat "$PAIR/standby.node")
            echo "export OUTBOXD_PAIR_STANDBY_URL=postgres://postgres@127.0.0.1:$(node_port "$standby")/postgres"
        fi
    } >"$PAIR/env"
}

pair_up() {
    local dir port arg
    dir=$(abs_dir "$1")
    shift
    local node
    for node in "$dir"/node*.pid; do
        [[ -f $node ]] || continue
        is_ours "$(read_pid "$node")" "$dir/" && die "a pair is already running in $dir (run: $0 down $dir)"
    done
    rm -rf "$dir"/node* "$dir"/*.pid "$dir"/*.port "$dir/env" "$dir/options" "$dir"/*.node "$dir/pg.bin" "$dir/pg-server"
    [[ $EUID -eq 0 ]] && chmod o+x "$dir"
    PAIR=$dir
    for arg in "$@"; do
        case $arg in
            --strict | --failover-slots) echo "$arg" >>"$dir/options" ;;
            *) die "unknown option $arg" ;;
        esac
    done
    # The stack's server version (OUTBOXD_PG_VERSION), recorded in DIR/pg.bin.
    use_pg_bin "$dir"

    start_pg "$dir" node0 logical
    port=$(node_port node0)
    echo node0 >"$dir/primary.node"
    echo 1 >"$dir/next.node"
    if option --failover-slots && (($(server_major "$port") < 17)); then
        die "--failover-slots needs PostgreSQL 17 or later; this is $(server_major "$port") (set OUTBOXD_PG_VERSION)"
    fi
    # The stack's test profile turns synchronous_commit off; commits must
    # wait for the standby here, which is the point of the pair.
    appendconf "$(node_data node0)/postgresql.conf" "# --- primary (pg-pair.sh) ---" \
        "synchronous_commit = on"
    reload node0
    add_standby node0
    say "pair up: primary 127.0.0.1:$port (pid $(cat "$dir/node0.pid")), synchronous standby 127.0.0.1:$(node_port "$(standby_node)")"
}

start_node() {
    local node=$1 bin port i data
    bin=$(pg_bin "$PAIR")
    port=$(node_port "$node")
    data=$(node_data "$node")
    as_pg "$bin/pg_ctl" -D "$data" -l "$PAIR/$node/postgres.log" -w -t 60 start >/dev/null 2>&1 \
        || die_with_log "$PAIR/$node/postgres.log" "$node failed to start"
    head -n 1 "$data/postmaster.pid" >"$PAIR/$node.pid"
    for ((i = 0; i < 120; i++)); do
        "$(pg_isready_cmd "$bin")" -q -h 127.0.0.1 -p "$port" -U postgres && return 0
        sleep 0.25
    done
    die_with_log "$PAIR/$node/postgres.log" "$node does not answer pg_isready"
}

pair_down() {
    local dir=$1 pidfile
    [[ -d "$dir" ]] || return 0
    dir=$(cd "$dir" && pwd -P)
    for pidfile in "$dir"/node*.pid; do
        [[ -f $pidfile ]] || continue
        stop_pg "$dir" "$(basename "$pidfile" .pid)"
    done
}

pair_dir() {
    local dir
    dir=$(cd "$1" && pwd -P)
    [[ -f "$dir/primary.node" ]] || die "no pair in $dir (run: $0 up $dir)"
    echo "$dir"
}

stop_standby() {
    local node pid
    node=$(standby_node)
    pid=$(read_pid "$PAIR/$node.pid")
    if is_ours "$pid" "$(node_data "$node")"; then
        as_pg "$(pg_bin "$PAIR")/pg_ctl" -D "$(node_data "$node")" -m fast -w -t "$STOP_TIMEOUT" stop >/dev/null 2>&1 \
            || die_with_log "$PAIR/$node/postgres.log" "the standby did not stop"
        wait_gone "$pid"
    fi
    rm -f "$PAIR/$node.pid"
    say "standby stopped"
}

crash_primary() {
    local node pid
    node=$(primary_node)
    pid=$(read_pid "$PAIR/$node.pid")
    if is_ours "$pid" "$(node_data "$node")"; then
        as_pg "$(pg_bin "$PAIR")/pg_ctl" -D "$(node_data "$node")" -m immediate -w -t "$STOP_TIMEOUT" stop >/dev/null 2>&1 \
            || die_with_log "$PAIR/$node/postgres.log" "the primary did not stop"
        wait_gone "$pid"
    fi
    rm -f "$PAIR/$node.pid"
    say "primary crashed (stopped with -m immediate)"
}

promote() {
    local node port i
    node=$(standby_node)
    port=$(node_port "$node")
    as_pg "$(pg_bin "$PAIR")/pg_ctl" -D "$(node_data "$node")" -w -t 60 promote >/dev/null 2>&1 \
        || die_with_log "$PAIR/$node/postgres.log" "the standby was not promoted"
    for ((i = 0; i < 240; i++)); do
        [[ $(psql_at "$port" "SELECT pg_is_in_recovery()") == f ]] && break
        sleep 0.25
    done
    [[ $(psql_at "$port" "SELECT pg_is_in_recovery()") == f ]] \
        || die_with_log "$PAIR/$node/postgres.log" "the promoted standby still reports recovery"
    echo "$node" >"$PAIR/primary.node"
    rm -f "$PAIR/standby.node"
    write_env
    say "standby promoted: 127.0.0.1:$port takes writes"
}

fork_crashed_primary() {
    local node data port standby i history bin
    node=$(primary_node)
    data=$(node_data "$node")
    port=$(node_port "$node")
    standby=$(standby_node)
    bin=$(pg_bin "$PAIR")
    [[ ! -s "$PAIR/$node.pid" ]] || die "the primary $node still runs (run: $0 crash-primary $PAIR)"
    as_pg touch "$data/standby.signal"
    start_node "$node"
    as_pg "$bin/pg_ctl" -D "$data" -w -t 60 promote >/dev/null 2>&1 \
        || die_with_log "$PAIR/$node/postgres.log" "the old primary was not promoted"
    for ((i = 0; i < 240; i++)); do
        [[ $(psql_at "$port" "SELECT pg_is_in_recovery()") == f ]] && break
        sleep 0.25
    done
    [[ $(psql_at "$port" "SELECT pg_is_in_recovery()") == f ]] \
        || die_with_log "$PAIR/$node/postgres.log" "the promoted old primary still reports recovery"
    history=$(ls "$data/pg_wal"/*.history | sort | tail -n 1)
    crash_primary
    cp "$history" "$(node_data "$standby")/pg_wal/"
    [[ $EUID -eq 0 ]] && chown postgres: "$(node_data "$standby")/pg_wal/$(basename "$history")"
    say "the old primary forked $(basename "$history") and stopped; the standby has the history file"
}

new_standby() {
    [[ ! -s "$PAIR/standby.node" ]] || die "the pair in $PAIR has a standby already"
    local primary
    primary=$(primary_node)
    is_ours "$(read_pid "$PAIR/$primary.pid")" "$(node_data "$primary")" || die "the primary $primary is not running"
    add_standby "$primary"
}

pair_main() {
    [[ $# -ge 2 ]] || usage
    local cmd=$1; shift
    if [[ $cmd == up ]]; then pair_up "$@"; return; fi
    if [[ $cmd == down ]]; then pair_down "$1"; return; fi
    PAIR=$(pair_dir "$1")
    case $cmd in
        stop-standby) stop_standby ;;
        start-standby) start_node "$(standby_node)" ;;
        crash-primary) crash_primary ;;
        promote) promote ;;
        new-standby) new_standby ;;
        fork-crashed-primary) fork_crashed_primary ;;
        *) usage ;;
    esac
}

pair_main "$@"
