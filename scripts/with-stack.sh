#!/usr/bin/env bash
# Runs a command with a throwaway PostgreSQL, Kafka and schema registry,
# then stops them.
#
#   scripts/with-stack.sh DIR COMMAND [ARGS...]
#
# The servers' addresses reach COMMAND as OUTBOXD_TEST_PG_URL,
# OUTBOXD_TEST_KAFKA, OUTBOXD_TEST_SCHEMA_REGISTRY and the rest of the
# stack's env file. They are stopped by PID whatever COMMAND does, and
# COMMAND's exit status is this script's.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
stack_dir="$1"
shift

stop_stack() {
  bash "$here/../deploy/local/stack.sh" down "$stack_dir" >/dev/null 2>&1 || true
}
trap stop_stack EXIT

# A previous run that was killed may have left servers behind in this folder.
stop_stack
rm -rf "$stack_dir"
bash "$here/../deploy/local/stack.sh" up "$stack_dir"
# shellcheck disable=SC1091
source "$stack_dir/env"
"$@"
