"""Tests of testbed/workloads.py: the synthetic workloads have the shapes the seeds describe.

1. Every workload is deterministic for a seed and stays inside guest memory.
2. boot makes 20 static ranges shared; dma_churn adds single-page flips and 0x100-page buffers
   while the range count stays small; discontiguous holds ~60 regions; hostile is every other
   page, capped, spread over all memory, and poisons a bounded tracker.
3. write_log output replays to the same tracker state as the conversions themselves.
"""

from __future__ import annotations

import io
from collections import Counter
from itertools import pairwise

import pytest

from testbed.errors import UsageError
from testbed.replay import parse_log, replay
from testbed.tracker import DEFAULT_MAX_RANGES, check_range, make_tracker
from testbed.workloads import (
    MIN_GUEST_PAGES,
    WORKLOAD_NAMES,
    boot,
    discontiguous,
    dma_churn,
    hostile,
    make_workload,
    write_log,
)

GIB = 1 << 18  # pages in 1 GiB
TIB = 1 << 28


@pytest.mark.parametrize("name", WORKLOAD_NAMES)
@pytest.mark.parametrize("guest_pages", [MIN_GUEST_PAGES, GIB, TIB])
def test_workload_is_deterministic_and_inside_guest(name: str, guest_pages: int) -> None:
    """A workload yields the same (gfn, npages, bool) tuples for a seed, all inside guest memory."""
    first = list(make_workload(name, guest_pages, seed=3, conversions=2000))
    assert first == list(make_workload(name, guest_pages, seed=3, conversions=2000))
    assert first
    for gfn, npages, shared in first:
        check_range(gfn, npages, guest_pages)
        assert type(shared) is bool


@pytest.mark.parametrize("name", ["boot", "dma_churn", "discontiguous"])
def test_seed_changes_the_workload(name: str) -> None:
    """Different seeds give different conversions."""
    a = list(make_workload(name, GIB, seed=1, conversions=500))
    assert a != list(make_workload(name, GIB, seed=2, conversions=500))


@pytest.mark.parametrize("guest_pages", [MIN_GUEST_PAGES, GIB, TIB])
def test_boot_shares_twenty_static_ranges_below_4g(guest_pages: int) -> None:
    """boot makes 20 disjoint, non-adjacent ranges shared (18 firmware/MMIO, SWIOTLB, atomic pool)."""
    ops = list(boot(guest_pages))
    assert len(ops) == 20 and all(shared for _, _, shared in ops)
    tracker = make_tracker("ranges", guest_pages=guest_pages)
    tracker.apply(ops)
    assert tracker.range_count() == 20
    assert all(gfn + n <= 1 << 20 for gfn, n in tracker.shared_ranges())


def test_dma_churn_is_mostly_single_page_flips_with_some_buffers() -> None:
    """dma_churn follows boot with single-page alloc/free pairs and a few 0x100-page buffers."""
    ops = list(dma_churn(GIB, conversions=20_000))
    assert ops[:20] == list(boot(GIB))
    churn = ops[20:]
    assert len(churn) == 20_000
    sizes = Counter(n for _, n, _ in churn)
    assert set(sizes) == {1, 0x100}
    assert 0 < sizes[0x100] < sizes[1] / 50
    single = [(g, s) for g, n, s in churn if n == 1]
    shared = sum(1 for _, s in single if s)
    assert abs(shared - (len(single) - shared)) <= 10  # every allocation is freed again
    assert len({g for g, _ in single}) < 1000  # pages are reused over and over


@pytest.mark.parametrize("guest_pages", [GIB, 64 * GIB, TIB])
def test_dma_churn_keeps_the_list_small_whatever_the_guest_size(guest_pages: int) -> None:
    """Under dma_churn the ranges tracker stays under 30 ranges and 16 KB at every guest size."""
    tracker = make_tracker("ranges", guest_pages=guest_pages)
    peak = 0
    for op in dma_churn(guest_pages, conversions=5000):
        tracker.convert(*op)
        peak = max(peak, tracker.range_count())
    assert 20 < peak <= 30
    assert tracker.memory_bytes() <= 16 * 1024
    assert not tracker.poisoned


def test_discontiguous_holds_about_sixty_regions() -> None:
    """discontiguous makes 60 separate regions shared and keeps 59-60 while churning."""
    tracker = make_tracker("tree", guest_pages=GIB)
    ops = list(discontiguous(GIB, conversions=1000))
    tracker.apply(ops[:60])
    assert tracker.range_count() == 60
    for op in ops[60:]:
        tracker.convert(*op)
        assert 59 <= tracker.range_count() <= 60


def test_hostile_is_every_other_page_when_it_fits() -> None:
    """In a small guest hostile shares exactly the even pages, in a shuffled order."""
    ops = list(hostile(1 << 12, conversions=1 << 20))
    assert sorted(g for g, _, _ in ops) == list(range(0, 1 << 12, 2))
    assert [g for g, _, _ in ops] != sorted(g for g, _, _ in ops)
    assert all(n == 1 and s for _, n, s in ops)


def test_hostile_is_capped_and_spread_over_all_memory() -> None:
    """In a 1 TiB guest hostile stops at its cap and still reaches the end of memory."""
    gfns = sorted(g for g, _, _ in hostile(TIB, conversions=10_000))
    assert len(gfns) <= 10_000
    assert gfns[0] == 0 and gfns[-1] > TIB - TIB // 5000
    assert len({b - a for a, b in pairwise(gfns)}) == 1  # an even stride


@pytest.mark.parametrize("kind", ["ranges", "tree"])
def test_hostile_poisons_bounded_trackers_within_their_memory_bound(kind: str) -> None:
    """The hostile workload poisons the list and the tree, whose memory stays under the bound."""
    tracker = make_tracker(kind, guest_pages=GIB)
    tracker.apply(list(hostile(GIB, conversions=2 * DEFAULT_MAX_RANGES)))
    assert tracker.poisoned
    assert tracker.range_count() == DEFAULT_MAX_RANGES
    assert tracker.memory_bytes() <= tracker.memory_bound_bytes()


@pytest.mark.parametrize("name", WORKLOAD_NAMES)
def test_write_log_replays_to_the_same_state(name: str) -> None:
    """A workload written in the kernel log format replays to the state of its conversions."""
    ops = list(make_workload(name, MIN_GUEST_PAGES, conversions=3000))
    out = io.StringIO()
    assert write_log(ops, out) == len(ops)
    parsed = parse_log(out.getvalue().splitlines())
    assert parsed.malformed == [] and len(parsed.events) == len(ops)
    direct = make_tracker("bitmap", guest_pages=MIN_GUEST_PAGES)
    direct.apply(ops)
    replayed = make_tracker("ranges", guest_pages=MIN_GUEST_PAGES, max_ranges=1 << 16)
    assert replay(parsed.events, replayed) == []
    assert replayed.shared_ranges() == direct.shared_ranges()


def test_unknown_workload_and_tiny_guest_are_usage_errors() -> None:
    """An unknown workload name or a guest below the layouts' minimum is a UsageError."""
    with pytest.raises(UsageError, match="dma_churn"):
        make_workload("fio", GIB)
    with pytest.raises(UsageError):
        list(dma_churn(MIN_GUEST_PAGES - 1))
    with pytest.raises(UsageError):
        list(discontiguous(MIN_GUEST_PAGES - 1))
