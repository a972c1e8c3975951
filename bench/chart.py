#!/usr/bin/env python3
"""Draws bench/results.png from bench/results.json: drain rates (outboxd,
Debezium and the machine's ceilings) and steady-state latency percentiles.
A run the invariant checker failed is drawn as a hatched zero bar labelled
FAILED, never as a figure."""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def drain_panel(ax, results):
    sizes = sorted({d["rows"] for d in results["drains"]} | {c["rows"] for c in results["ceilings"]})
    bars = []  # (label, {rows: value or None})
    for system in dict.fromkeys(d["system"] for d in results["drains"]):
        bars.append((system, {d["rows"]: (None if d["failed"] else d["events_per_second"])
                              for d in results["drains"] if d["system"] == system}))
    for name in dict.fromkeys(c["name"] for c in results["ceilings"]):
        bars.append(("ceiling: " + name, {c["rows"]: c["events_per_second"]
                                          for c in results["ceilings"] if c["name"] == name}))
    width = 0.8 / max(len(bars), 1)
    for i, (label, values) in enumerate(bars):
        xs = [s + i * width for s in range(len(sizes))]
        ys = [values.get(size) or 0 for size in sizes]
        hatch = "//" if label.startswith("ceiling") else None
        drawn = ax.bar(xs, ys, width, label=label, hatch=hatch)
        for x, size, rect in zip(xs, sizes, drawn):
            if size in values and values[size] is None:
                ax.annotate("FAILED", (x, 0), rotation=90, ha="center", va="bottom", fontsize=7)
    ax.set_xticks([s + 0.4 - width / 2 for s in range(len(sizes))])
    ax.set_xticklabels([f"{size:,} rows" for size in sizes])
    ax.set_ylabel("events per second (cold start to all in Kafka)")
    ax.set_title("Backlog drain, ~256-byte payloads")
    ax.legend(fontsize=7)


def latency_panel(ax, results):
    runs = results["steady"] + [dict(r, system=r["system"] + " (highest)") for r in results["highest"]]
    labels = [f'{r["system"]}\n{r["target_rate"]:,}/s' for r in runs]
    width = 0.27
    for i, (key, name) in enumerate([("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9")]):
        xs = [j + i * width for j in range(len(runs))]
        ys = [0 if r["failed"] else r[key] for r in runs]
        ax.bar(xs, ys, width, label=name)
    ax.set_yscale("log")
    ax.set_xticks([j + width for j in range(len(runs))])
    ax.set_xticklabels(labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("commit → visible to read_committed consumer, ms (log)")
    ax.set_title("Steady-state latency")
    ax.axhline(50, color="grey", linestyle="--", linewidth=0.8)
    ax.legend(fontsize=7)


def main():
    source, target = sys.argv[1], sys.argv[2]
    with open(source) as f:
        results = json.load(f)
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6))
    drain_panel(left, results)
    latency_panel(right, results)
    fig.suptitle(results.get("machine", ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(target, dpi=110)


if __name__ == "__main__":
    main()
