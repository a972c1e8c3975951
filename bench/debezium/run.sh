#!/usr/bin/env bash
# Run Debezium Server (Postgres connector + Outbox Event Router + Kafka sink)
# in the foreground, configured from the environment. The last step is
# `exec java`, so the PID of this script is the JVM's PID.
#
# Required environment:
#   DBZ_WORK_DIR      config/application.properties, offsets.dat and
#                     debezium.log go here (created if missing); the JVM's cwd
#   PG_HOST PG_PORT PG_USER PG_DATABASE
#   DBZ_SLOT          replication slot (created on first start if missing)
#   DBZ_PUBLICATION   existing publication on the outbox table (never created
#                     or altered by Debezium)
#   KAFKA_BOOTSTRAP   host:port[,host:port]
#   TOPIC_PREFIX      events go to ${TOPIC_PREFIX}.${aggregatetype}
# Optional:
#   PG_PASSWORD       (default empty: no password sent)
#   OUTBOX_TABLE      schema.table (default public.outbox)
#   DBZ_SNAPSHOT_MODE (default no_data: stream only, no initial copy)
#   DBZ_HEAP          JVM heap flags, e.g. -Xmx512m (default: JVM defaults)
#   DBZ_JAVA_OPTS     any further JVM flags (default none)
#   DBZ_HTTP_PORT     Quarkus health/REST port (default 0: a free port)
#   DBZ_LOG_LEVEL     root log level (default INFO)
#   DBZ_PAYLOAD       expand (default): Kafka value = the payload parsed and
#                     re-serialised by Debezium (compact JSON); string: the
#                     payload's text as Postgres prints jsonb, byte for byte
#   DBZ_HOME, DBZ_JAVA, DBZ_VERSION: see fetch.sh
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
die() { echo "debezium/run.sh: ERROR: $*" >&2; exit 1; }

for v in DBZ_WORK_DIR PG_HOST PG_PORT PG_USER PG_DATABASE DBZ_SLOT DBZ_PUBLICATION KAFKA_BOOTSTRAP TOPIC_PREFIX; do
    [[ -n "${!v:-}" ]] || die "$v is not set"
done
OUTBOX_TABLE=${OUTBOX_TABLE:-public.outbox}
DBZ_SNAPSHOT_MODE=${DBZ_SNAPSHOT_MODE:-no_data}
DBZ_HTTP_PORT=${DBZ_HTTP_PORT:-0}
DBZ_LOG_LEVEL=${DBZ_LOG_LEVEL:-INFO}
DBZ_PAYLOAD=${DBZ_PAYLOAD:-expand}
[[ $DBZ_PAYLOAD == expand || $DBZ_PAYLOAD == string ]] || die "DBZ_PAYLOAD must be expand or string"

DBZ_HOME=$(bash "$HERE/fetch.sh")
JAVA=$(bash "$HERE/fetch.sh" --java)
RUNNER=$(compgen -G "$DBZ_HOME/debezium-server-dist-*-runner.jar" | head -n 1) \
    || die "no runner jar in $DBZ_HOME (delete it and run fetch.sh again)"

mkdir -p "$DBZ_WORK_DIR/config"
WORK=$(cd "$DBZ_WORK_DIR" && pwd -P)

# Values go into a .properties file read by SmallRye Config: escape
# backslashes (properties syntax) and "${" (SmallRye would expand it).
prop() {
    local v=$2
    [[ $v != *$'\n'* ]] || die "$1: newline in value"
    v=${v//\\/\\\\}
    v=${v//\$\{/\$\$\{}
    printf '%s=%s\n' "$1" "$v"
}

{
    echo "# Written by bench/debezium/run.sh at $(date -Is); overwritten on every start."
    echo
    echo "# --- sink: Kafka, producer defaults (acks=all, idempotence on) ---"
    prop debezium.sink.type kafka
    prop debezium.sink.kafka.producer.bootstrap.servers "$KAFKA_BOOTSTRAP"
    # Required by KafkaProducer: the key/value/header formats below hand it strings.
    prop debezium.sink.kafka.producer.key.serializer org.apache.kafka.common.serialization.StringSerializer
    prop debezium.sink.kafka.producer.value.serializer org.apache.kafka.common.serialization.StringSerializer
    echo
    echo "# --- source: Postgres, pgoutput, an existing publication ---"
    prop debezium.source.connector.class io.debezium.connector.postgresql.PostgresConnector
    prop debezium.source.database.hostname "$PG_HOST"
    prop debezium.source.database.port "$PG_PORT"
    prop debezium.source.database.user "$PG_USER"
    prop debezium.source.database.dbname "$PG_DATABASE"
    prop debezium.source.topic.prefix "$TOPIC_PREFIX"
    prop debezium.source.plugin.name pgoutput
    prop debezium.source.slot.name "$DBZ_SLOT"
    prop debezium.source.publication.name "$DBZ_PUBLICATION"
    prop debezium.source.publication.autocreate.mode disabled
    prop debezium.source.table.include.list "$OUTBOX_TABLE"
    prop debezium.source.snapshot.mode "$DBZ_SNAPSHOT_MODE"
    prop debezium.source.offset.storage.file.filename "$WORK/offsets.dat"
    # Output parity with outboxd: without this every record also carries four
    # __debezium.context.* headers (connector name, task id, run id).
    prop debezium.source.extended.headers.enabled false
    # As in Debezium Server's shipped example config: store the offset (and
    # confirm the LSN to Postgres) after every batch, not once a minute.
    prop debezium.source.offset.flush.interval.ms 0
    echo
    echo "# --- Outbox Event Router: column defaults match the outbox table ---"
    prop debezium.transforms outbox
    prop debezium.transforms.outbox.type io.debezium.transforms.outbox.EventRouter
    # ${routedByValue} is the router's placeholder, not a shell variable.
    # shellcheck disable=SC2016
    prop debezium.transforms.outbox.route.topic.replacement "$TOPIC_PREFIX"'.${routedByValue}'
    if [[ $DBZ_PAYLOAD == expand ]]; then
        # jsonb arrives as a JSON string; expand it so the value is the JSON
        # itself, and keep null members (by default the expansion drops them).
        prop debezium.transforms.outbox.table.expand.json.payload true
        prop debezium.transforms.outbox.table.json.payload.null.behavior optional_bytes
    fi
    echo
    echo "# --- formats: key = aggregateid as text, value = payload JSON, headers as text ---"
    prop debezium.format.key simplestring
    if [[ $DBZ_PAYLOAD == expand ]]; then
        prop debezium.format.value json
        prop debezium.format.value.schemas.enable false
    else
        # The payload's text as Postgres prints jsonb, unparsed.
        prop debezium.format.value simplestring
    fi
    # The header format can only be json (JsonConverter would write the id
    # as "\"<uuid>\""); override the converter class to write it as plain text.
    prop debezium.format.header json
    prop debezium.format.header.class org.apache.kafka.connect.storage.StringConverter
    echo
    echo "# --- server ---"
    # Health/REST endpoint: loopback only, a free port unless told otherwise
    # (the default 8080 would clash between runs and with other services).
    prop quarkus.http.host 127.0.0.1
    prop quarkus.http.port "$DBZ_HTTP_PORT"
    prop quarkus.log.level "$DBZ_LOG_LEVEL"
    # Plain-text log lines (as in the shipped example), also to a file.
    prop quarkus.log.console.json.enabled false
    prop quarkus.log.file.enabled true
    prop quarkus.log.file.path "$WORK/debezium.log"
    prop quarkus.log.file.json.enabled false
} >"$WORK/config/application.properties.tmp"
mv "$WORK/config/application.properties.tmp" "$WORK/config/application.properties"

# The password goes through the environment, not the file. SmallRye Config
# expands "${...}" in environment values too, so escape it as "$${".
if [[ -n "${PG_PASSWORD:-}" ]]; then
    export DEBEZIUM_SOURCE_DATABASE_PASSWORD=${PG_PASSWORD//\$\{/\$\$\{}
fi

# Quarkus reads config/application.properties from the working directory.
cd "$WORK"
# --add-opens: on Java 24+ jboss-threads (Quarkus) needs it for its
# thread-local reset, else worker threads die with IllegalAccessError at
# shutdown. Harmless on Java 21.
# shellcheck disable=SC2086  # DBZ_HEAP / DBZ_JAVA_OPTS are flag lists
exec "$JAVA" --add-opens=java.base/java.lang=ALL-UNNAMED ${DBZ_HEAP:-} ${DBZ_JAVA_OPTS:-} \
    -cp "$RUNNER:$DBZ_HOME/config/lib:$DBZ_HOME/lib/*" \
    io.debezium.server.Main
