#!/usr/bin/env bash
# `make chaos`: the fault-injection suite at campaign size (OUTBOXD_CHAOS=long:
# hundreds of relay kills, tens of broker and Postgres restarts and of
# primary failovers to a synchronous standby per capture mode, and the
# campaigns that apply to the WAL-message outbox, `…::messages`), one test at a
# time, the mixed-release campaigns (the release before
# table-keyed checkpoints and this one, OUTBOXD_OLD_BINARY), then the table
# of what the checker found.
# Runs inside scripts/with-stack.sh, which provides the servers.
set -uo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$here/.."
report="$root/chaos/report.jsonl"
rm -f "$report"

started=$SECONDS
OUTBOXD_CHAOS=long OUTBOXD_CHAOS_REPORT="$report" \
  cargo test --locked --test faults -- --test-threads=1
status=$?
# The mixed-release campaigns (tests/faults/versions.rs), #[ignore]d in the
# run above; they fail without OUTBOXD_OLD_BINARY (`make chaos` sets it).
OUTBOXD_CHAOS=long OUTBOXD_CHAOS_REPORT="$report" \
  cargo test --locked --test faults versions:: -- --ignored --test-threads=1
versions_status=$?
(( status == 0 )) && status=$versions_status

echo
if [[ -s "$report" ]]; then
  python3 "$here/chaos_table.py" "$report" "$(( (SECONDS - started) / 60 ))" | tee "$root/chaos/results.md"
else
  echo "chaos: no campaign finished; see the test output above" >&2
fi
exit "$status"
