#!/usr/bin/env bash
# The test stack's schema registry: Apicurio Registry, whose ccompat API is
# Confluent's Schema Registry REST API, as a plain Java process. Sourced by
# stack.sh for its functions; run on its own only to build:
#
#   registry.sh build     build the runnable jar once (Maven, ~1 min cold;
#                         then nothing) and print its path
#
# The Maven project is deploy/local/registry/ (a pom and a settings file
# that sends every repository to Maven Central); the build lives in
# ${XDG_CACHE_HOME:-~/.cache}/outboxd/registry-<hash of those files>/, so
# editing them builds anew and nothing else does.
set -euo pipefail

REGISTRY_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/registry" && pwd)
REGISTRY_TIMEOUT=120   # seconds for /health/ready (2-core CI under load)

registry_say() { echo "registry: $*"; }
registry_die() { echo "registry: ERROR: $*" >&2; exit 1; }

registry_build_dir() {
    local hash
    hash=$(cat "$REGISTRY_SRC/pom.xml" "$REGISTRY_SRC/settings.xml" | sha256sum | cut -c1-12)
    echo "${XDG_CACHE_HOME:-$HOME/.cache}/outboxd/registry-$hash"
}

# Builds the runner jar unless the cache has it; prints its path.
registry_build() {
    local build jar log
    build=$(registry_build_dir)
    jar=$build/target/apicurio-registry-runner-1.0-runner.jar
    if [[ -f "$build/.complete" && -f "$jar" ]]; then
        echo "$jar"
        return 0
    fi
    command -v mvn >/dev/null || registry_die "mvn not found (run install-deps.sh)"
    mkdir -p "$build"
    # Two stacks coming up at once build once.
    exec 9>"$build.lock"
    flock 9
    if [[ ! -f "$build/.complete" ]]; then
        cp "$REGISTRY_SRC/pom.xml" "$REGISTRY_SRC/settings.xml" "$build/"
        log=$build/build.log
        registry_say "building Apicurio Registry with Maven into $build (about a minute, once)" >&2
        (cd "$build" && mvn -B -ntp -s settings.xml package -DskipTests) >"$log" 2>&1 \
            || { tail -n 30 "$log" >&2; registry_die "Maven build failed (full log: $log)"; }
        [[ -f "$jar" ]] || registry_die "Maven built no $jar (log: $log)"
        touch "$build/.complete"
    fi
    exec 9>&-
    echo "$jar"
}

# The command line of the registry started for DIR contains this.
registry_marker() { echo "-Doutboxd.stack=$1/registry"; }

# Starts the registry for stack DIR on PORT and waits until it is ready.
# Its storage is in memory: a throwaway registry, empty at every start.
registry_start() {
    local dir=$1 port=$2 jar i
    jar=$(registry_build)
    mkdir -p "$dir/registry"
    # Small and quick to start: the C1 compiler only, a serial collector,
    # a 256 MB heap (the tests register tens of schemas). Its in-memory H2
    # waits up to 10 s for a table lock (default 1 s), so tests registering
    # schemas in parallel do not get a 500.
    (cd "$dir/registry" && REGISTRY_DATASOURCE_URL='jdbc:h2:mem:registry_db;LOCK_TIMEOUT=10000' exec java -XX:TieredStopAtLevel=1 -Xmx256m -XX:+UseSerialGC \
        "$(registry_marker "$dir")" \
        -Dquarkus.http.host=127.0.0.1 -Dquarkus.http.port="$port" \
        -Dregistry.ccompat.use-canonical-hash=true \
        -jar "$jar" >"$dir/registry/registry.log" 2>&1) &
    echo $! >"$dir/registry.pid"
    echo "$port" >"$dir/registry.port"
    for ((i = 0; i < REGISTRY_TIMEOUT * 2; i++)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null \
            && curl -sf "http://127.0.0.1:$port/health/ready" >/dev/null 2>&1; then
            return 0
        fi
        kill -0 "$(cat "$dir/registry.pid")" 2>/dev/null || break
        sleep 0.5
    done
    echo "----- last 40 lines of $dir/registry/registry.log -----" >&2
    tail -n 40 "$dir/registry/registry.log" >&2 || true
    registry_die "not ready on 127.0.0.1:$port within ${REGISTRY_TIMEOUT}s"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    case ${1:-} in
        build) registry_build ;;
        *) sed -n '2,12s/^# \{0,1\}//p' "$0" >&2; exit 2 ;;
    esac
fi
