#!/usr/bin/env bash
# `make bench`: fetches Debezium Server and the chart's Python packages
# (cached), runs the benchmark binary (bench/main.rs, release build) on the
# servers scripts/with-stack.sh started, then draws bench/results.png.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$here/.."
cache="${XDG_CACHE_HOME:-$HOME/.cache}/outboxd"

venv="$cache/bench-venv"
if ! "$venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
  echo "bench: installing matplotlib for the chart into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'matplotlib>=3.8,<4'
fi

if [[ ",${BENCH_SKIP:-}," != *",debezium,"* ]]; then
  bash "$root/bench/debezium/fetch.sh" >/dev/null
fi

kafka_version=$(grep -oE 'OUTBOXD_KAFKA_VERSION:-[0-9.]+' "$root/deploy/local/stack.sh" | cut -d- -f2)
export BENCH_VERSIONS="Apache Kafka ${OUTBOXD_KAFKA_VERSION:-$kafka_version} (KRaft, one broker), Debezium Server 3.6.0.Final, outboxd commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"

# The chart only from a results.json this run wrote: a run of sections
# that write elsewhere (`table`) leaves the committed figures alone.
started=$(mktemp)
trap 'rm -f "$started"' EXIT
status=0
cargo bench --locked --bench bench || status=$?
if [[ -s "$root/bench/results.json" && "$root/bench/results.json" -nt "$started" ]]; then
  "$venv/bin/python" "$root/bench/chart.py" "$root/bench/results.json" "$root/bench/results.png"
  echo "bench: wrote bench/results.md, bench/results.json and bench/results.png"
fi
if [[ -s "$root/bench/table-size.json" && "$root/bench/table-size.json" -nt "$started" ]]; then
  echo "bench: wrote bench/table-size.md and bench/table-size.json"
fi
if [[ -s "$root/bench/messages.json" && "$root/bench/messages.json" -nt "$started" ]]; then
  echo "bench: wrote bench/messages.md and bench/messages.json"
fi
exit "$status"
