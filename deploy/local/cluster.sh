#!/usr/bin/env bash
# A three-node Apache Kafka cluster (KRaft; every node both broker and
# controller) as plain processes, for the fault tests that need partition
# leaders and the transaction coordinator to move when a broker dies. Like
# Kafka's own transaction system tests: replication factor 3 and
# min.insync.replicas 2 for every topic, the transaction state log and the
# consumer offsets included, so one dead broker never stops a commit.
#
#   cluster.sh up DIR          start three nodes, write DIR/env
#   cluster.sh down DIR        stop them (idempotent)
#   cluster.sh kill DIR N      SIGKILL node N (1, 2 or 3)
#   cluster.sh start DIR N     start node N again on its ports and data
#
# Uses stack.sh's helpers and jar cache (OUTBOXD_KAFKA_VERSION).
set -euo pipefail

# shellcheck source=stack.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/stack.sh"

NODES=(1 2 3)

# write_node_config DIR N VOTERS PORT CPORT
write_node_config() {
    local kdir=$1/node$2/kafka n=$2 voters=$3 port=$4 cport=$5
    mkdir -p "$kdir/data"
    ln -sfn "$KAFKA_LIBS" "$kdir/libs"
    cat >"$kdir/server.properties" <<CONF
process.roles=broker,controller
node.id=$n
controller.quorum.voters=$voters
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$kdir/data
num.partitions=3
default.replication.factor=3
min.insync.replicas=2
auto.create.topics.enable=true
unclean.leader.election.enable=false
group.initial.rebalance.delay.ms=0
offsets.topic.replication.factor=3
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
transaction.state.log.num.partitions=3
share.coordinator.state.topic.replication.factor=3
share.coordinator.state.topic.min.isr=2
# A killed node is noticed in seconds, not the default 9 s, so leaders
# and coordinators move while the writers are still committing.
broker.session.timeout.ms=4000
broker.heartbeat.interval.ms=500
CONF
    write_log4j "$kdir/log4j2.properties" INFO out
    write_log4j "$kdir/tools-log4j2.properties" WARN err
}

node_running() {
    is_ours "$(read_pid "$1/node$2/kafka.pid")" "$(kafka_marker "$1/node$2")"
}

cluster_up() {
    local dir n
    dir=$(abs_dir "$1")
    for n in "${NODES[@]}"; do
        node_running "$dir" "$n" && die "a cluster is already running in $dir (run: $0 down $dir)"
    done
    bash "$HERE/install-deps.sh"
    rm -rf "$dir"/node* "$dir/env"
    UP_DIR=$dir
    trap 'rc=$?; [[ $rc -eq 0 ]] || { cluster_down "$UP_DIR" >/dev/null 2>&1 || true; }; exit $rc' EXIT
    fetch_kafka

    local -A port cport
    local voters=""
    for n in "${NODES[@]}"; do
        free_port "port[$n]"
        free_port "cport[$n]"
        voters+="${voters:+,}$n@127.0.0.1:${cport[$n]}"
    done
    local id
    for n in "${NODES[@]}"; do
        write_node_config "$dir" "$n" "$voters" "${port[$n]}" "${cport[$n]}"
    done
    id=$(kafka_java "$dir/node1" kafka.tools.StorageTool random-uuid 2>"$dir/format.log") \
        || die_with_log "$dir/format.log" "kafka: could not generate a cluster id"
    for n in "${NODES[@]}"; do
        kafka_java "$dir/node$n" kafka.tools.StorageTool format -t "$id" \
            -c "$dir/node$n/kafka/server.properties" >>"$dir/format.log" 2>&1 \
            || die_with_log "$dir/format.log" "kafka: storage format of node $n failed"
    done
    # A node serves only once the controller quorum (two of three) has a
    # leader: start all three, then wait for each.
    say "cluster: starting three Kafka $KAFKA_VERSION nodes"
    local waiters=()
    for n in "${NODES[@]}"; do
        launch_kafka "$dir/node$n" &
        waiters+=($!)
    done
    local waiter
    for waiter in "${waiters[@]}"; do
        wait "$waiter" || exit 1
    done
    local bootstrap=""
    for n in "${NODES[@]}"; do
        bootstrap+="${bootstrap:+,}127.0.0.1:${port[$n]}"
    done
    cat >"$dir/env" <<ENV
export OUTBOXD_TEST_CLUSTER=$bootstrap
export OUTBOXD_TEST_CLUSTER_DIR=$dir
ENV
    trap - EXIT
    say "cluster up in ${SECONDS}s: $bootstrap"
}

cluster_down() {
    local dir=$1 n
    [[ -d "$dir" ]] || return 0
    dir=$(cd "$dir" && pwd -P)
    for n in "${NODES[@]}"; do
        [[ -d "$dir/node$n" ]] && stop_kafka "$dir/node$n"
    done
    return 0
}

node_dir() {
    local dir=$1 n=$2
    [[ " ${NODES[*]} " == *" $n "* ]] || die "no node $n; nodes are ${NODES[*]}"
    dir=$(cd "$dir" && pwd -P)
    [[ -f "$dir/node$n/kafka/server.properties" ]] || die "no cluster in $dir (run: $0 up $dir)"
    echo "$dir/node$n"
}

cluster_main() {
    [[ $# -ge 2 ]] || { sed -n '2,13s/^# \{0,1\}//p' "$0" >&2; exit 2; }
    local cmd=$1; shift
    case $cmd in
        up) cluster_up "$1" ;;
        down) cluster_down "$1" ;;
        kill) cmd_kafka_kill "$(node_dir "$1" "$2")" ;;
        start)
            local node
            node=$(node_dir "$1" "$2")
            launch_kafka "$node"
            say "node $2 started on 127.0.0.1:$KAFKA_PORT (pid $(cat "$node/kafka.pid"))"
            ;;
        *) sed -n '2,13s/^# \{0,1\}//p' "$0" >&2; exit 2 ;;
    esac
}

cluster_main "$@"
