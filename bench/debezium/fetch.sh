#!/usr/bin/env bash
# Ensure Debezium Server is unpacked in a cache directory, for `make bench`.
#
#   fetch.sh          print the install dir (fetch + unpack on first use)
#   fetch.sh --java   print the java binary that can run it (and nothing else)
#
# The distribution tarball comes from Maven (`mvn dependency:get`, so ~/.m2
# serves it when present). Idempotent: a finished install is marked with
# .complete and reused; a half-done one is never published.
#
# Environment:
#   DBZ_VERSION   Debezium Server version (default 3.6.0.Final)
#   DBZ_HOME      install dir (default ${XDG_CACHE_HOME:-$HOME/.cache}/outboxd/debezium-server-$DBZ_VERSION)
#   DBZ_JAVA      a java binary to use instead of searching for one
set -euo pipefail

DBZ_VERSION=${DBZ_VERSION:-3.6.0.Final}
DBZ_HOME=${DBZ_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/outboxd/debezium-server-$DBZ_VERSION}
# Debezium Server 3.x is compiled for Java 21 (class file version 65): a
# Java 17 runtime fails with UnsupportedClassVersionError.
JAVA_MIN=21

die() { echo "debezium/fetch.sh: ERROR: $*" >&2; exit 1; }
note() { echo "debezium/fetch.sh: $*" >&2; }

# Major version of a java binary ("" if it does not run).
java_major() {
    local v
    v=$("$1" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java\.specification\.version = //p' | head -n 1) || true
    v=${v#1.}             # 1.8 -> 8
    echo "${v%%.*}"
}

# Prints $DBZ_JAVA if set (failing if it is too old), else the first
# java >= JAVA_MIN among $JAVA_HOME, PATH, /usr/lib/jvm/* (newest first).
pick_java() {
    local c m tried=()
    local candidates=()
    if [[ -n "${DBZ_JAVA:-}" ]]; then
        m=$(java_major "$DBZ_JAVA")
        [[ -n "$m" && "$m" -ge "$JAVA_MIN" ]] \
            || die "DBZ_JAVA=$DBZ_JAVA is Java ${m:-?(does not run)}; Debezium Server $DBZ_VERSION needs Java $JAVA_MIN or newer"
        echo "$DBZ_JAVA"
        return 0
    fi
    [[ -n "${JAVA_HOME:-}" ]] && candidates+=("$JAVA_HOME/bin/java")
    command -v java >/dev/null 2>&1 && candidates+=("$(command -v java)")
    while IFS= read -r c; do candidates+=("$c"); done < <(
        compgen -G '/usr/lib/jvm/*/bin/java' | sort -V -r || true)
    for c in "${candidates[@]}"; do
        [[ -x "$c" ]] || continue
        m=$(java_major "$c")
        tried+=("$c (${m:-?})")
        if [[ -n "$m" && "$m" -ge "$JAVA_MIN" ]]; then
            echo "$c"
            return 0
        fi
    done
    die "Debezium Server $DBZ_VERSION needs Java $JAVA_MIN or newer; found: ${tried[*]:-no java at all}. Install e.g. openjdk-21-jre-headless or Temurin 21+, or set DBZ_JAVA=/path/to/bin/java"
}

fetch() {
    if [[ -f "$DBZ_HOME/.complete" ]]; then
        echo "$DBZ_HOME"
        return 0
    fi
    command -v mvn >/dev/null || die "mvn not found (needed to fetch io.debezium:debezium-server-dist)"
    local artifact=io.debezium:debezium-server-dist:$DBZ_VERSION:tar.gz
    local rel=io/debezium/debezium-server-dist/$DBZ_VERSION/debezium-server-dist-$DBZ_VERSION.tar.gz
    local repo tarball log
    # A no-op download when the local repository already holds it.
    note "resolving $artifact with Maven (about 800 MB when not yet in the local repository)"
    log=$(mktemp /tmp/outboxd-dbz-mvn.XXXXXX.log)
    mvn -q -B dependency:get -Dartifact="$artifact" -Dtransitive=false >"$log" 2>&1 \
        || { tail -n 30 "$log" >&2; die "mvn could not fetch $artifact (log: $log)"; }
    rm -f "$log"
    tarball=$HOME/.m2/repository/$rel
    if [[ ! -f "$tarball" ]]; then
        # A settings.xml may move the local repository.
        repo=$(mvn -q -B -Dstyle.color=never help:evaluate -Dexpression=settings.localRepository -DforceStdout 2>/dev/null \
            | sed 's/\x1b\[[0-9;]*m//g' | tail -n 1 || true)
        tarball=$repo/$rel
    fi
    [[ -f "$tarball" ]] || die "mvn succeeded but debezium-server-dist-$DBZ_VERSION.tar.gz is not in the local repository (looked in $HOME/.m2/repository and '${repo:-}')"

    note "unpacking $tarball into $DBZ_HOME"
    local tmp=$DBZ_HOME.tmp.$$
    rm -rf "$tmp"
    mkdir -p "$tmp"
    # Everything but connectors/ (Cassandra/DSE add-ons, ~340 MB) and
    # lib_opt/ (scripting engines, Chronicle Queue): the Postgres connector,
    # the Kafka sink and the Outbox Event Router are all in lib/.
    tar -xzf "$tarball" -C "$tmp" --strip-components=1 \
        --exclude='debezium-server/connectors' --exclude='debezium-server/lib_opt' \
        || { rm -rf "$tmp"; die "could not unpack $tarball"; }
    local want
    for want in "debezium-server-dist-*-runner.jar" "lib/debezium-connector-postgres-*.jar" \
        "lib/debezium-server-kafka-*.jar" "lib/debezium-connect-plugins-*.jar"; do
        if ! compgen -G "$tmp/$want" >/dev/null; then
            rm -rf "$tmp"
            die "$tarball has no $want"
        fi
    done
    echo "$DBZ_VERSION" >"$tmp/.complete"
    # Publish atomically; if a concurrent run won the race, keep its copy.
    mkdir -p "$(dirname "$DBZ_HOME")"
    if ! mv -T "$tmp" "$DBZ_HOME" 2>/dev/null; then
        rm -rf "$tmp"
        [[ -f "$DBZ_HOME/.complete" ]] || die "$DBZ_HOME exists but is not a complete install; delete it and retry"
    fi
    echo "$DBZ_HOME"
}

case ${1:-} in
    --java) pick_java ;;
    "") pick_java >/dev/null; fetch ;;
    *) echo "usage: $0 [--java]" >&2; exit 2 ;;
esac
