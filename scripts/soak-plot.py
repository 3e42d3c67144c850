#!/usr/bin/env python3
"""Draws a soak's resource samples (target/soak/<seed>-<seconds>s.csv, written by the
soak) as one PNG of four panels: RSS and open descriptors of the API
instances and of the workers (each role's mean per process), PostgreSQL
connections, Redis's used memory.

    python3 scripts/soak-plot.py target/soak/<seed>-3600s.csv docs/soak-1h.png

Needs matplotlib (pip install matplotlib)."""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, out):
    with open(src) as f:
        rows = list(csv.DictReader(f))
    t = [float(r["seconds"]) / 60 for r in rows]
    col = lambda name: [float(r[name]) for r in rows]  # noqa: E731
    fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    panels = [
        ("RSS, MiB (mean per process)", [("API", "api_rss_mib"), ("worker", "worker_rss_mib")]),
        ("open descriptors (mean per process)", [("API", "api_fds"), ("worker", "worker_fds")]),
        ("PostgreSQL connections", [("all services", "pg_connections")]),
        ("Redis used memory, MiB", [("Redis", "redis_mib")]),
    ]
    for ax, (title, lines) in zip(axes, panels):
        for label, name in lines:
            ax.plot(t, col(name), label=label, linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    axes[-1].set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
