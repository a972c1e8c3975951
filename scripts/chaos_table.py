#!/usr/bin/env python3
"""Turns the fault campaigns' JSON lines into the `make chaos` table.

    chaos_table.py REPORT.jsonl [MINUTES]

One row per fault and mode (polling, replication, messages: the
WAL-message outbox, or unmarked: replication with `after_publish: none`):
faults injected, events checked, and
what the invariant checker found. A campaign whose check failed is in the
report too (its violations are counted), so a red run still shows here.
"""
import json
import sys
from collections import OrderedDict

COLUMNS = ["runs", "events", "lost", "duplicated", "out_of_order", "other"]


def main():
    rows = OrderedDict()
    with open(sys.argv[1]) as report:
        for line in report:
            line = line.strip()
            if not line:
                continue
            record = json.loads(line)
            key = (record["fault"], record["mode"])
            total = rows.setdefault(key, dict.fromkeys(COLUMNS, 0))
            for column in COLUMNS:
                total[column] += record[column]

    print("| fault | mode | runs | events | lost | duplicated | out of order | other violations |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for (fault, mode), total in sorted(rows.items()):
        print(f"| {fault} | {mode} | " + " | ".join(f"{total[c]:,}" for c in COLUMNS) + " |")

    print()
    for mode in sorted({mode for _, mode in rows}):
        runs = {fault: total["runs"] for (fault, m), total in rows.items() if m == mode}
        relay_kills = sum(
            runs.get(fault, 0)
            for fault in ["random-kills", "kill-points", "poison-mix", "backlog-drain",
                          "second-relay-same-name", "second-relay-other-name",
                          "window-kills", "several-outboxes"]
        )
        print(
            f"- {mode}: {relay_kills} relay kills ({runs.get('random-kills', 0)} at random moments, "
            f"{runs.get('kill-points', 0)} at named points), "
            f"{runs.get('broker-restarts', 0)} broker kills and restarts, "
            f"{runs.get('postgres-restarts', 0)} Postgres crashes and restarts, "
            f"{runs.get('primary-failovers', 0)} primary crashes with the synchronous standby promoted"
        )
    violations = sum(t[c] for t in rows.values() for c in ["lost", "duplicated", "out_of_order", "other"])
    minutes = f" in {sys.argv[2]} minutes" if len(sys.argv) > 2 else ""
    print(f"- violations: {violations}{minutes}")


if __name__ == "__main__":
    main()
