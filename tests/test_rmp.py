"""The SNP RMP model (testbed/hw/rmp.py): Assigned and Validated per 4 KiB frame, what each host
RMPUPDATE and guest PVALIDATE does to them, and what it costs a large guest."""

from __future__ import annotations

import ctypes

from testbed.hw.memimage import resident_pages
from testbed.hw.rmp import PVALIDATE_SUCCESS, RMP_PG_SIZE_4K, Rmp

FRAMES_64G = 64 << 18


def test_assigning_every_frame_then_some_back_reads_exactly() -> None:
    """After SNP_LAUNCH_START assigns every frame, unassigning a range (sev_gmem_invalidate) and
    assigning part of it again read back frame by frame, Validated cleared where RMPUPDATE ran
    and kept by keep_assigned."""
    rmp = Rmp(64)
    rmp.keep_assigned(0, 64)
    assert all(rmp.is_assigned(f) for f in range(64))
    assert rmp.pvalidate(10, RMP_PG_SIZE_4K, True).eax == PVALIDATE_SUCCESS and rmp.validated[10] == 1
    rmp.keep_assigned(8, 12)  # an attribute turning private: Validated kept
    assert rmp.validated[10] == 1
    rmp.assign(8, 16, False)  # a punched hole while shared
    assert [rmp.is_assigned(f) for f in range(6, 18)] == [True] * 2 + [False] * 8 + [True] * 2
    assert rmp.validated[10] == 0
    rmp.keep_assigned(9, 11)
    assert [rmp.is_assigned(f) for f in range(8, 12)] == [False, True, True, False]
    assert rmp.validated[9] == rmp.validated[10] == 0
    rmp.assign(0, 64, False)
    assert not any(rmp.is_assigned(f) for f in range(64))
    rmp.close()


def test_assigning_a_64g_guest_touches_no_page_of_its_entries() -> None:
    """Assigning all frames of a 64 GiB guest (SNP_LAUNCH_START) and then unassigning a 2 MiB
    range touches at most that range's page of Assigned entries, not 16 MiB of them: the
    machine costs what the guest uses."""
    rmp = Rmp(FRAMES_64G)
    rmp.keep_assigned(0, FRAMES_64G)
    rmp.assign(4096, 4096 + 512, False)
    buf = (ctypes.c_char * FRAMES_64G).from_buffer(rmp._assigned_diff)
    resident = resident_pages(ctypes.addressof(buf), FRAMES_64G)
    del buf
    assert sum(b & 1 for b in resident) <= 1
    assert rmp.is_assigned(0) and rmp.is_assigned(FRAMES_64G - 1) and not rmp.is_assigned(4096)
    rmp.close()
