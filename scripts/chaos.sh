#!/usr/bin/env bash
# `make chaos`: the fault-injection suite at campaign size (OUTBOXD_CHAOS=long:
# hundreds of relay kills, tens of broker and Postgres restarts and of
# primary failovers to a synchronous standby per capture mode, and the
# campaigns of the WAL-message outbox and of rows without marks), one test at
# a time per stack, the mixed-release campaigns (the release before
# table-keyed checkpoints and this one, OUTBOXD_OLD_BINARY), then the table
# of what the checker found.
#
#   scripts/chaos.sh STACK_DIR
#
# The campaigns restart their servers, so each runs alone on a stack; two
# halves run side by side on two stacks (STACK_DIR/a and STACK_DIR/b), which
# about halves the wall time on 2 cores. The split puts the longest
# campaigns (random kills, broker restarts) in one half and the many shorter
# ones in the other, about 80 minutes each.
set -uo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$here/.."
stack_dir="${1:?usage: scripts/chaos.sh STACK_DIR}"
report="$root/chaos/report.jsonl"
logs="$stack_dir/logs"
rm -f "$report"
mkdir -p "$logs"

# run_half NAME CARGO_TEST_ARGS...: one half on its own stack, reporting to
# its own file; its output goes to $logs/NAME.log. A stack grows to about
# 6 GB over a half, so it is deleted once its half passed; a failed half's
# stack stays for its servers' logs.
run_half() {
  local name=$1
  shift
  OUTBOXD_CHAOS=long OUTBOXD_CHAOS_REPORT="$logs/$name.jsonl" \
    bash "$here/with-stack.sh" "$stack_dir/$name" \
    cargo test --locked --test faults "$@" >"$logs/$name.log" 2>&1 || return 1
  rm -rf "${stack_dir:?}/$name"
}

# Start the halves only once the test binary is built, so they do not build
# it twice at once.
cargo test --locked --test faults --no-run || exit 1
rm -f "$logs"/*.jsonl

started=$SECONDS
echo "chaos: two halves running; follow them in $logs/a.log and $logs/b.log"
# Half a: random kills, backlog drains, several outboxes, broker restarts, then the
# mixed-release campaigns (#[ignore]d in the plain runs; they fail without
# OUTBOXD_OLD_BINARY, which `make chaos` sets).
(
  run_half a -- random_kills backlog several_outboxes broker_killed_and_restarted --test-threads=1
  status=$?
  run_half a-versions versions:: -- --ignored --test-threads=1 || status=1
  exit "$status"
) &
half_a=$!
# Half b: everything else.
run_half b -- --skip random_kills --skip backlog --skip several_outboxes \
  --skip broker_killed_and_restarted --test-threads=1 &
half_b=$!

status=0
wait "$half_a" || { status=1; echo "chaos: half a failed; see $logs/a.log and $logs/a-versions.log" >&2; }
wait "$half_b" || { status=1; echo "chaos: half b failed; see $logs/b.log" >&2; }
cat "$logs"/*.jsonl >"$report" 2>/dev/null

echo
if [[ -s "$report" ]]; then
  python3 "$here/chaos_table.py" "$report" "$(( (SECONDS - started) / 60 ))" | tee "$root/chaos/results.md"
else
  echo "chaos: no campaign finished; see the logs in $logs" >&2
fi
exit "$status"
