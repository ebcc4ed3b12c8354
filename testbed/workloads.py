"""Synthetic conversion workloads shaped like the seed thread's observations, for tests and benches.

Each generator yields `(gfn, npages, shared)` tuples (tracker.Conversion) for a guest of `guest_pages` pages,
deterministically for a given `seed`:

* `boot` -- what firmware and an early kernel make shared: ~20 static ranges (OVMF's MMIO and
  firmware ranges, "15-20 nodes"), the SWIOTLB bounce buffer and the atomic DMA pool.
* `dma_churn` -- `boot`, then dma_alloc_coherent/dma_free_coherent: single pages flipped shared
  and back over and over, reusing a small hot set of pages two frames apart (the log's
  1f008000/1f006000 pairs), plus a block-I/O buffer of 0x100 pages toggled now and then. The
  seed's "npages = 100" is the kernel's %lx, so 0x100 = 256 pages.
* `discontiguous` -- ~60 discontiguous shared regions anywhere in memory (the GCP Ubuntu sample),
  then regions freed and allocated elsewhere so the count stays near 60.
* `hostile` -- a guest sharing every other page, the worst case for any list of ranges. All of
  a 1 TiB guest would be 2^27 conversions, which no benchmark can run, so the pattern is thinned
  to at most `conversions` isolated pages spread evenly over all of memory (every other page
  when that fits) and issued in a shuffled order (inserts land mid-list, not at its cheap end).
  With the default cap it is still 24x the default max_ranges.

`write_log` prints any workload in the kernel's `page_enc_status_hc` log format, so it can be
fed to `testbed replay` (testbed/replay.py).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from typing import TextIO

from testbed.errors import UsageError
from testbed.replay import format_log_line
from testbed.tracker import Conversion

#: The smallest guest the layouts fit in (64 MiB).
MIN_GUEST_PAGES = 1 << 14
#: Churn conversions after boot when the caller does not say (dma_churn, discontiguous).
DEFAULT_CONVERSIONS = 100_000
#: The hostile workload's cap on conversions.
DEFAULT_HOSTILE_CONVERSIONS = 100_000

_FIRMWARE_RANGES = 18  # + SWIOTLB + atomic pool = 20 static ranges
_FIRMWARE_SIZES = (1, 1, 2, 4, 8, 16, 32, 64, 256, 512)
_CHURN_AREA_PAGES = 4096  # where the DMA allocator hands out coherent pages
_HOT_PAGES = 32  # how many recently used DMA pages get reused (the seed's "page re-use")
_BLOCK_IO_PAGES = 0x100


class _Layout:
    """Where boot puts its static ranges, and the DMA area kept clear for the churn."""

    def __init__(self, guest_pages: int, seed: int) -> None:
        if guest_pages < MIN_GUEST_PAGES:
            raise UsageError(f"workload guest_pages = 0x{guest_pages:x}: need >= 0x{MIN_GUEST_PAGES:x}")
        rng = random.Random(seed)
        # Firmware, SWIOTLB and the pools live below 4 GiB, as on a real guest; keep the top
        # quarter of that low memory for the kernel's own use.
        low = min(guest_pages, 1 << 20) * 3 // 4
        # Linux sizes SWIOTLB at 64 MiB and the atomic pool at 128 KiB per GiB of RAM
        # (at least 128 KiB, at most 4 MiB); scale SWIOTLB down for tiny guests.
        swiotlb = min(1 << 14, guest_pages // 16)
        pool = min(1024, max(32, guest_pages >> 13))
        self.swiotlb = (low - swiotlb, swiotlb)
        self.churn_base = low - swiotlb - 1 - _CHURN_AREA_PAGES - _BLOCK_IO_PAGES - 2
        self.block_io = self.churn_base + _CHURN_AREA_PAGES + 1
        self.pool = (self.churn_base - 1 - pool, pool)
        # 18 firmware/MMIO ranges, one per slot so they never touch each other.
        top = self.pool[0] - 1
        slot = (top - 256) // _FIRMWARE_RANGES
        self.firmware: list[tuple[int, int]] = []
        for i in range(_FIRMWARE_RANGES):
            size = min(rng.choice(_FIRMWARE_SIZES), slot - 1)
            base = 256 + i * slot + rng.randrange(slot - size)
            self.firmware.append((base, size))

    def static_ranges(self) -> list[tuple[int, int]]:
        return [*self.firmware, self.pool, self.swiotlb]


def boot(guest_pages: int, *, seed: int = 0) -> Iterator[Conversion]:
    """The ~20 static ranges firmware and the early kernel make shared (and nothing else)."""
    for gfn, npages in _Layout(guest_pages, seed).static_ranges():
        yield (gfn, npages, True)


def dma_churn(
    guest_pages: int, *, seed: int = 0, conversions: int = DEFAULT_CONVERSIONS
) -> Iterator[Conversion]:
    """`boot`, then `conversions` coherent-DMA conversions: mostly single pages, a few 0x100-page buffers."""
    layout = _Layout(guest_pages, seed)
    for gfn, npages in layout.static_ranges():
        yield (gfn, npages, True)
    rng = random.Random(seed ^ 0xD3A)
    # Allocations are two frames apart, so neighbours in flight never coalesce: every
    # allocation is a range of its own, the list's worst realistic case.
    slots = _CHURN_AREA_PAGES // 2
    hot = [layout.churn_base + 2 * rng.randrange(slots) for _ in range(_HOT_PAGES)]
    in_flight: list[int] = []
    block_io_shared = False
    done = 0
    while done < conversions:
        r = rng.random()
        if r < 0.005:
            # A block-I/O buffer toggles as a whole, like the log's 1d767000/npages = 100.
            block_io_shared = not block_io_shared
            yield (layout.block_io, _BLOCK_IO_PAGES, block_io_shared)
        elif in_flight and (len(in_flight) >= 8 or r < 0.5):
            # dma_free_coherent: mostly the newest buffer first.
            i = len(in_flight) - 1 if rng.random() < 0.8 else rng.randrange(len(in_flight))
            yield (in_flight.pop(i), 1, False)
        else:
            # dma_alloc_coherent: mostly a recently used page.
            if rng.random() < 0.9:
                gfn = rng.choice(hot)
            else:
                gfn = layout.churn_base + 2 * rng.randrange(slots)
                hot[rng.randrange(_HOT_PAGES)] = gfn
            if gfn in in_flight:
                continue
            in_flight.append(gfn)
            yield (gfn, 1, True)
        done += 1


def discontiguous(
    guest_pages: int, *, seed: int = 0, conversions: int = DEFAULT_CONVERSIONS, regions: int = 60
) -> Iterator[Conversion]:
    """`regions` discontiguous shared regions anywhere, then `conversions` frees and re-allocations."""
    if guest_pages < MIN_GUEST_PAGES:
        raise UsageError(f"workload guest_pages = 0x{guest_pages:x}: need >= 0x{MIN_GUEST_PAGES:x} (64 MiB)")
    rng = random.Random(seed ^ 0xD15C)
    live: dict[int, int] = {}  # gfn -> npages

    def place() -> tuple[int, int]:
        while True:
            size = rng.choice((1, 1, 2, 4, 8, 16, 64, 256, 512))
            gfn = rng.randrange(guest_pages - size)
            # Keep one private page around each region so regions never merge.
            if all(gfn + size < g or g + n < gfn for g, n in live.items()):
                return gfn, size

    for _ in range(regions):
        gfn, size = place()
        live[gfn] = size
        yield (gfn, size, True)
    for i in range(conversions):
        if i % 2 == 0:
            gfn = rng.choice(list(live))
            yield (gfn, live.pop(gfn), False)
        else:
            gfn, size = place()
            live[gfn] = size
            yield (gfn, size, True)


def hostile(
    guest_pages: int, *, seed: int = 0, conversions: int = DEFAULT_HOSTILE_CONVERSIONS
) -> Iterator[Conversion]:
    """Every other page shared, thinned to at most `conversions` pages spread over all memory."""
    if guest_pages < 2 or conversions < 1:
        raise UsageError("hostile workload needs guest_pages >= 2 and conversions >= 1")
    candidates = guest_pages // 2
    stride = 2 * -(-candidates // conversions)  # 2 * ceil: every other page when it fits
    gfns = list(range(0, guest_pages, stride))
    random.Random(seed ^ 0xBAD).shuffle(gfns)
    for gfn in gfns:
        yield (gfn, 1, True)


WORKLOADS = {
    "boot": boot,
    "dma_churn": dma_churn,
    "discontiguous": discontiguous,
    "hostile": hostile,
}
WORKLOAD_NAMES: tuple[str, ...] = tuple(WORKLOADS)


def make_workload(
    name: str, guest_pages: int, *, seed: int = 0, conversions: int | None = None
) -> Iterator[Conversion]:
    """The workload `name` for `guest_pages`; `conversions` sizes those that churn (not boot)."""
    if name == "boot":
        return boot(guest_pages, seed=seed)
    if name == "dma_churn":
        return dma_churn(guest_pages, seed=seed, conversions=conversions or DEFAULT_CONVERSIONS)
    if name == "discontiguous":
        return discontiguous(guest_pages, seed=seed, conversions=conversions or DEFAULT_CONVERSIONS)
    if name == "hostile":
        return hostile(guest_pages, seed=seed, conversions=conversions or DEFAULT_HOSTILE_CONVERSIONS)
    raise UsageError(f"unknown workload {name!r}: expected one of {', '.join(WORKLOAD_NAMES)}")


def write_log(
    conversions: Iterable[tuple[int, int, bool]],
    out: TextIO,
    *,
    start_usecs: int = 56_146_336,
    step_usecs: int = 11,
) -> int:
    """Write conversions to `out` in the kernel log format, one line each; return the count.

    Time stamps start at `start_usecs` and advance `step_usecs` per line, so the output is
    deterministic and `testbed replay` (or replay.parse_log) reads it back exactly.
    """
    n = 0
    for n, (gfn, npages, shared) in enumerate(conversions, 1):
        out.write(format_log_line(start_usecs + (n - 1) * step_usecs, gfn, npages, shared))
        out.write("\n")
    return n
