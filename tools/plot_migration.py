"""Resync cost per migration round: bitmap vs ranges vs tree, guest sizes 1 GiB .. 1 TiB.

    python tools/plot_migration.py [--quick] [--out docs/plots] [--json]

Each pre-copy round of `testbed migrate` exports the encryption status and XORs it with the
previous export (testbed/migrate/status.py). This measures that step on the trackers
themselves, fed with the seed workloads of testbed/workloads.py: boot, then each round a slice
of DMA-churn conversions (and of the discontiguous workload), then the export (the bitmap, or
the 16-byte records) and the XOR with the last one. No guest is booted - a 1 TiB guest could
not be - so the figures are the host's resync cost alone, per tracker and size: status bytes
exported per round, and export + XOR time (median over the rounds). The native C trackers are
included where the extension is built. PNGs: docs/plots/migration_resync_bytes.png and
docs/plots/migration_resync_time.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed.migrate.status import export_tracker, status_changes
from testbed.tracker import NATIVE_TRACKER_KINDS, TRACKER_KINDS, make_tracker
from testbed.workloads import boot, make_workload

GIB_PAGES = 1 << 18
SIZES = [1, 8, 64, 512, 1024]  # GiB


def measure(kind: str, guest_pages: int, workload: str, rounds: int, per_round: int) -> dict[str, Any]:
    """Boot, then `rounds` rounds of `per_round` conversions each: per round the status bytes,
    the status changes found, and the export + XOR time."""
    tracker = make_tracker(kind, guest_pages=guest_pages, max_ranges=1 << 20)
    tracker.apply(boot(guest_pages, seed=1))
    previous = export_tracker(tracker, kind)
    stream = make_workload(workload, guest_pages, seed=1, conversions=rounds * per_round)
    per: list[dict[str, float]] = []
    for _ in range(rounds):
        tracker.apply(itertools.islice(stream, per_round))
        t0 = time.perf_counter()
        current = export_tracker(tracker, kind)
        changes = status_changes(previous, current, guest_pages)
        seconds = time.perf_counter() - t0
        per.append({"bytes": current.nbytes, "changes": sum(n for _, n in changes), "seconds": seconds})
        previous = current
    return {
        "tracker": kind, "guest_gib": guest_pages // GIB_PAGES, "workload": workload,
        "status_bytes": statistics.median(r["bytes"] for r in per),
        "status_changes": statistics.median(r["changes"] for r in per),
        "resync_s": statistics.median(r["seconds"] for r in per),
    }


def plot(results: list[dict[str, Any]], out: Path) -> list[Path]:
    """Two log-log plots (bytes, time) against guest size, one line per tracker and workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, label, name in (("status_bytes", "status bytes exported per round", "migration_resync_bytes.png"),
                             ("resync_s", "export + XOR per round (s, median)", "migration_resync_time.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (kind, workload), rows in itertools.groupby(
                sorted(results, key=lambda r: (r["tracker"], r["workload"], r["guest_gib"])),
                key=lambda r: (r["tracker"], r["workload"])):
            rows_l = list(rows)
            ax.plot([r["guest_gib"] for r in rows_l], [max(r[key], 1e-9) for r in rows_l], marker="o",
                    linestyle="-" if workload == "dma_churn" else "--", label=f"{kind} ({workload})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("guest memory (GiB)")
        ax.set_ylabel(label)
        ax.set_title(f"Live-migration status resync: {label}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    """Run the measurements, print a table (or JSON), write the plots."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, sizes up to 64 GiB")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "plots")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    sizes = SIZES[:3] if args.quick else SIZES
    rounds, per_round = (3, 200) if args.quick else (5, 1000)
    kinds = [*TRACKER_KINDS, *NATIVE_TRACKER_KINDS]
    results = [measure(kind, gib * GIB_PAGES, workload, rounds, per_round)
               for workload in ("dma_churn", "discontiguous") for gib in sizes for kind in kinds]
    args.out.mkdir(parents=True, exist_ok=True)
    paths = plot(results, args.out)
    if args.json:
        print(json.dumps({"results": results, "plots": [str(p) for p in paths]}, indent=2))
    else:
        print(f"{'tracker':15s} {'workload':14s} {'GiB':>5s} {'bytes/round':>12s} {'changes':>8s} {'resync ms':>10s}")
        for r in results:
            print(f"{r['tracker']:15s} {r['workload']:14s} {r['guest_gib']:5d} {r['status_bytes']:12.0f} "
                  f"{r['status_changes']:8.0f} {r['resync_s'] * 1e3:10.3f}")
        print("plots:", ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
