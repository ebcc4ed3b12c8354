"""Tests of the SNP Page State Change VMGEXIT in testbed/kvm/sev.py (sev.c, snp_begin_psc).

1. Each range of the guest's PSC buffer becomes one KVM_HC_MAP_GPA_RANGE exit: contiguous entries
   with the same operation and page size are batched, a 2M entry is 512 pages.
2. Progress is recorded in the guest's buffer (cur_page, cur_entry); partly-done entries resume.
3. Malformed headers and entries, other operations, a VMM error and disabled user exits are
   answered in SW_EXITINFO2 as KVM answers them.
4. One VMGEXIT drives many exits, whether the VMM answers at once or after stopping the vCPU, and
   a guest that rewrites its buffer between two exits is handled as KVM handles it: the header's
   indices are read once per VMGEXIT (ce6ea7b33e00, in the reference tree and in 7.1).
5. The VMM's ret: the reference tree accepts only 0, EINVAL and EAGAIN (5d40e5b49442), 7.1 any.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable

import pytest

from testbed.hw.exits import GhcbMsrRegister
from testbed.hw.memory import BytesMemory
from testbed.kvm.ghcb import (
    GHCB_SHARED_BUFFER_OFFSET,
    Ghcb,
    GhcbErr,
    GhcbHvResp,
    GhcbSave,
    PscEntry,
    PscError,
    PscHdr,
    PscOp,
    SwExitCode,
    psc_entry_offset,
)
from testbed.kvm.sev import SevEsHandler, SevFatalError, SevState
from testbed.kvm.uapi import (
    KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_DECRYPTED,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_MAP_GPA_RANGE_PAGE_SZ_2M,
    KVM_MAP_GPA_RANGE_PAGE_SZ_4K,
    HypercallExit,
    KvmExit,
)
from testbed.kvm.version import KvmVersion

GHCB_GPA = 0x2000
BUF = GHCB_GPA + GHCB_SHARED_BUFFER_OFFSET
PRIVATE, SHARED = PscOp.VMGEXIT_PSC_OP_PRIVATE, PscOp.VMGEXIT_PSC_OP_SHARED
ENC_4K = KVM_MAP_GPA_RANGE_ENCRYPTED | KVM_MAP_GPA_RANGE_PAGE_SZ_4K
DEC_4K = KVM_MAP_GPA_RANGE_DECRYPTED | KVM_MAP_GPA_RANGE_PAGE_SZ_4K
ENC_2M = KVM_MAP_GPA_RANGE_ENCRYPTED | KVM_MAP_GPA_RANGE_PAGE_SZ_2M
GENERIC = PscError.VMGEXIT_PSC_ERROR_GENERIC
INVALID_HDR = PscError.VMGEXIT_PSC_ERROR_INVALID_HDR
INVALID_ENTRY = PscError.VMGEXIT_PSC_ERROR_INVALID_ENTRY


class FakeOps:
    """SevVcpuOps whose VMM records MAP_GPA_RANGE exits; `vmm(run)` may answer (set ret) or play
    a hostile guest, and with `defer` completions wait for `resume_one()`."""

    def __init__(self) -> None:
        self.memory = BytesMemory(0x8000)
        self.exits: list[KvmExit] = []
        self.vmm: Callable[[HypercallExit], None] | None = None
        self.defer = False
        self.pending: list[Callable[[], None]] = []

    def cpuid(self, function: int, index: int) -> tuple[int, int, int, int]:
        raise AssertionError("PSC does no CPUID")

    def maxphyaddr(self) -> int:
        raise AssertionError("PSC reads no MAXPHYADDR")

    def hypercall(self, nr: int, a0: int, a1: int, a2: int, a3: int, cpl: int,
                  complete: Callable[[int], None]) -> None:
        raise AssertionError("PSC exits to userspace directly, not through the hypercall path")

    def exit_to_userspace(self, run: KvmExit, complete: Callable[[], None] | None) -> None:
        assert isinstance(run, HypercallExit) and complete is not None
        self.exits.append(run)
        if self.vmm is not None:
            self.vmm(run)
        if self.defer:
            self.pending.append(complete)
        else:
            complete()

    def pio(self, port: int, size: int, is_in: bool, value: int, complete: Callable[[int], None]) -> None:
        raise AssertionError("PSC does no port I/O")

    def msr(self, index: int, write: bool, value: int, complete: Callable[[bool, int], None]) -> None:
        raise AssertionError("PSC does no MSR access")

    def resume_one(self) -> None:
        self.pending.pop(0)()

    def ranges(self) -> list[tuple[int, int, int]]:
        return [r.args[:3] for r in self.exits if isinstance(r, HypercallExit)]


class Psc:
    """An SNP vCPU with a registered GHCB and a PSC buffer in its shared buffer."""

    def __init__(self, entries: list[PscEntry], cur: int = 0, end: int | None = None, scratch: int = BUF,
                 exits: bool = True, kvm: KvmVersion = KvmVersion.KVM_X86) -> None:
        self.ops = FakeOps()
        self.state = SevState(snp=True, msr=GhcbMsrRegister(GHCB_GPA), registered_ghcb_gpa=GHCB_GPA,
                              hypercall_exit_enabled=exits, kvm_version=kvm)
        self.handler = SevEsHandler(self.state, self.ops)
        self.ghcb = Ghcb(self.ops.memory, GHCB_GPA)
        self.scratch = scratch
        self.write_hdr(PscHdr(cur, len(entries) - 1 if end is None else end))
        for i, e in enumerate(entries):
            self.write_entry(i, e)

    def write_hdr(self, hdr: PscHdr) -> None:
        self.ops.memory.write(self.scratch, hdr.to_bytes())

    def hdr(self) -> PscHdr:
        return PscHdr.from_bytes(self.ops.memory.read(self.scratch, 8))

    def write_entry(self, i: int, e: PscEntry) -> None:
        self.ops.memory.write(self.scratch + psc_entry_offset(i), e.to_u64().to_bytes(8, "little"))

    def entry(self, i: int) -> PscEntry:
        return PscEntry.from_u64(int.from_bytes(self.ops.memory.read(self.scratch + psc_entry_offset(i), 8), "little"))

    def vmgexit(self) -> None:
        g = self.ghcb
        g.set(GhcbSave.sw_exit_code, SwExitCode.SVM_VMGEXIT_PSC)
        g.set(GhcbSave.sw_exit_info_1, 0)
        g.set(GhcbSave.sw_exit_info_2, 0)
        g.set(GhcbSave.sw_scratch, self.scratch)
        self.handler.handle_vmgexit()

    def status(self) -> int:
        assert self.ghcb.get(GhcbSave.sw_exit_info_1) == GhcbHvResp.GHCB_HV_RESP_NO_ACTION
        return self.ghcb.get(GhcbSave.sw_exit_info_2)


def e4k(gfn: int, op: int = PRIVATE, cur_page: int = 0) -> PscEntry:
    return PscEntry(cur_page=cur_page, gfn=gfn, operation=op, pagesize=0)


def e2m(gfn: int, op: int = PRIVATE, cur_page: int = 0) -> PscEntry:
    return PscEntry(cur_page=cur_page, gfn=gfn, operation=op, pagesize=1)


# -------------------------------------------------------------------------------- exits
def test_single_entry() -> None:
    """One 4K entry is one MAP_GPA_RANGE exit; success marks it done, cur_entry past it (sev.c, snp_begin_psc)."""
    p = Psc([e4k(0x123, SHARED)])
    p.vmgexit()
    assert p.ops.exits == [HypercallExit(nr=KVM_HC_MAP_GPA_RANGE, args=(0x123000, 1, DEC_4K, 0, 0, 0), ret=0)]
    assert p.status() == 0
    assert p.hdr() == PscHdr(1, 0)
    assert p.entry(0).cur_page == 1


def test_batching_contiguous_entries() -> None:
    """Contiguous entries with the same operation and size share one exit (sev.c, snp_begin_psc batching)."""
    p = Psc([e4k(0x10), e4k(0x11), e4k(0x12), e4k(0x20), e4k(0x21, SHARED), e4k(0x22, SHARED), e2m(0x200),
             e4k(0x400)])
    p.vmgexit()
    assert p.ops.ranges() == [(0x10000, 3, ENC_4K), (0x20000, 1, ENC_4K), (0x21000, 2, DEC_4K),
                              (0x200000, 512, ENC_2M), (0x400000, 1, ENC_4K)]
    assert p.status() == 0
    assert p.hdr().cur_entry == 8
    assert [p.entry(i).cur_page for i in range(8)] == [1, 1, 1, 1, 1, 1, 512, 1]


def test_2m_entries_are_512_pages_each() -> None:
    """A 2M entry is sent as 512 4K pages; contiguous 2M entries add up (sev.c, snp_begin_psc)."""
    p = Psc([e2m(0x400), e2m(0x600), e2m(0xA00)])
    p.vmgexit()
    assert p.ops.ranges() == [(0x400000, 1024, ENC_2M), (0xA00000, 512, ENC_2M)]


def test_size_change_breaks_a_batch() -> None:
    """A 4K entry right after a 2M range starts a new exit (sev.c, snp_begin_psc: same pagesize)."""
    p = Psc([e2m(0x200), e4k(0x400), e4k(0x401)])
    p.vmgexit()
    assert p.ops.ranges() == [(0x200000, 512, ENC_2M), (0x400000, 2, ENC_4K)]


# ---------------------------------------------------------------------------- cur_page
def test_partial_2m_entry_resumes_as_4k() -> None:
    """A 2M entry with cur_page set resumes at gfn+cur_page as 4K pages, hint still 2M (sev.c, snp_begin_psc)."""
    p = Psc([e2m(0x200, cur_page=100)])
    p.vmgexit()
    assert p.ops.ranges() == [(0x200000 + 100 * 0x1000, 412, ENC_2M)]
    assert p.entry(0).cur_page == 512 and p.status() == 0


def test_partial_entry_contiguity_quirk() -> None:
    """After a partial 2M entry, contiguity is measured from the entry's own GFN, as in KVM (sev.c, snp_begin_psc)."""
    c = 500
    p = Psc([e2m(0x200, cur_page=c), e4k(0x200 + 512), e4k(0x200 + 512 - c)])
    p.vmgexit()
    # Entry 1 (really contiguous) does not join; entry 2 would, but entry 1 ends the batch first.
    assert p.ops.ranges() == [(0x200000 + c * 0x1000, 512 - c, ENC_2M), (0x400000, 1, ENC_4K),
                              (0x400000 - c * 0x1000, 1, ENC_4K)]
    q = Psc([e2m(0x200, cur_page=c), e4k(0x200 + 512 - c)])
    q.vmgexit()
    assert q.ops.ranges() == [(0x200000 + c * 0x1000, 512 - c + 1, ENC_2M)]


def test_done_entries_are_skipped() -> None:
    """Entries already done are skipped and cur_entry steps over them (sev.c, snp_begin_psc)."""
    p = Psc([e4k(0x10, cur_page=1), e2m(0x200, cur_page=512), e4k(0x30)])
    p.vmgexit()
    assert p.ops.ranges() == [(0x30000, 1, ENC_4K)]
    assert p.hdr().cur_entry == 3


def test_cur_page_entry_not_batched_after_start() -> None:
    """An entry with progress never joins a batch behind another entry (sev.c, snp_begin_psc: entry.cur_page)."""
    p = Psc([e2m(0x200), e2m(0x400, cur_page=10)])
    p.vmgexit()
    assert p.ops.ranges() == [(0x200000, 512, ENC_2M), (0x40A000, 502, ENC_2M)]


def test_cur_entry_starts_the_scan() -> None:
    """Processing starts at hdr.cur_entry (sev.c, snp_begin_psc)."""
    p = Psc([e4k(0x10), e4k(0x20), e4k(0x30)], cur=2)
    p.vmgexit()
    assert p.ops.ranges() == [(0x30000, 1, ENC_4K)]


def test_cur_entry_past_end_is_success() -> None:
    """cur_entry > end_entry means nothing to do: success without an exit (sev.c, snp_begin_psc)."""
    p = Psc([e4k(0x10), e4k(0x20)], cur=5, end=1)
    p.vmgexit()
    assert p.ops.exits == [] and p.status() == 0


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(("scratch", "end"), [(BUF, 253), (BUF, 0xFFFF), (GHCB_GPA + 0xF00, 29)])
def test_end_entry_beyond_buffer_is_invalid_hdr(scratch: int, end: int) -> None:
    """end_entry >= (scratch length - 8) / 8 is INVALID_HDR (sev.c, snp_begin_psc)."""
    p = Psc([e4k(0x10)], end=end, scratch=scratch)
    p.vmgexit()
    assert p.ops.exits == [] and p.status() == INVALID_HDR


def test_full_buffer_is_accepted() -> None:
    """end_entry 252 (253 entries) fits the shared buffer (sev-common.h, VMGEXIT_PSC_MAX_COUNT)."""
    p = Psc([e4k(2 * i) for i in range(253)])
    p.vmgexit()
    assert len(p.ops.exits) == 253 and p.status() == 0
    assert p.hdr().cur_entry == 253


def test_misaligned_2m_gfn_is_invalid_entry() -> None:
    """A 2M entry whose GFN is not 512-aligned is INVALID_ENTRY, with no exit (sev.c, snp_begin_psc)."""
    p = Psc([e2m(0x201)])
    p.vmgexit()
    assert p.ops.exits == [] and p.status() == INVALID_ENTRY


def test_invalid_entry_after_progress() -> None:
    """A bad entry reached after earlier exits stops the request there (sev.c, snp_begin_psc)."""
    p = Psc([e4k(0x10), e4k(0x20, cur_page=2)])
    p.vmgexit()
    assert p.ops.ranges() == [(0x10000, 1, ENC_4K)]
    assert p.status() == INVALID_ENTRY and p.hdr().cur_entry == 1


@pytest.mark.parametrize("entry", [e4k(0x10, cur_page=2), e2m(0x200, cur_page=513), e2m(0x200, cur_page=0xFFF)])
def test_cur_page_beyond_entry_is_invalid_entry(entry: PscEntry) -> None:
    """cur_page larger than the entry's page count is INVALID_ENTRY (sev.c, snp_begin_psc)."""
    p = Psc([entry])
    p.vmgexit()
    assert p.ops.exits == [] and p.status() == INVALID_ENTRY


@pytest.mark.parametrize("op", [0, PscOp.VMGEXIT_PSC_OP_PSMASH, PscOp.VMGEXIT_PSC_OP_UNSMASH, 5, 15])
def test_other_ops_complete_without_exit(op: int) -> None:
    """Operations other than private/shared are marked done without an exit; the scan goes on (sev.c, snp_begin_psc)."""
    p = Psc([e2m(0x200, op), e4k(0x400, op), e4k(0x10, SHARED)])
    p.vmgexit()
    assert p.ops.ranges() == [(0x10000, 1, DEC_4K)]
    assert [p.entry(i).cur_page for i in range(3)] == [512, 1, 1]
    assert p.status() == 0 and p.hdr().cur_entry == 3


@pytest.mark.parametrize("kvm", list(KvmVersion))
@pytest.mark.parametrize("ret", [errno.EINVAL, errno.EAGAIN])
def test_vmm_error_is_generic(kvm: KvmVersion, ret: int) -> None:
    """A VMM error (EINVAL, EAGAIN) stops with GENERIC, the failed batch not marked (sev.c, snp_complete_one_psc)."""
    p = Psc([e4k(0x10), e4k(0x20), e4k(0x21)], kvm=kvm)
    p.ops.vmm = lambda run: setattr(run, "ret", ret if run.args[0] == 0x20000 else 0)
    p.vmgexit()
    assert p.ops.ranges() == [(0x10000, 1, ENC_4K), (0x20000, 2, ENC_4K)]
    assert p.status() == GENERIC
    assert p.hdr().cur_entry == 1 and p.entry(1).cur_page == 0


BAD_RETS = [1, (-errno.EINVAL) & ((1 << 64) - 1), errno.EIO, 1 << 63]


@pytest.mark.parametrize("ret", BAD_RETS)
def test_other_vmm_ret_fails_kvm_run(ret: int) -> None:
    """Reference tree: a ret other than 0/EINVAL/EAGAIN fails KVM_RUN with -EINVAL and nothing is marked done
    (sev.c snp_complete_one_psc, x86.h kvm_is_valid_map_gpa_range_ret; commit 5d40e5b49442)."""
    p = Psc([e4k(0x10), e4k(0x20)])
    p.ops.vmm = lambda run: setattr(run, "ret", ret)
    with pytest.raises(SevFatalError, match="EAGAIN") as err:
        p.vmgexit()
    assert err.value.errno == errno.EINVAL
    assert len(p.ops.exits) == 1
    assert p.hdr().cur_entry == 0 and p.entry(0).cur_page == 0
    assert p.ghcb.get(GhcbSave.sw_exit_info_2) == 0  # svm_vmgexit_success(0) only: no PSC status


def test_other_vmm_ret_fails_kvm_run_when_resumed_later() -> None:
    """A bad ret seen only when the stopped vCPU resumes fails that KVM_RUN (sev.c, snp_complete_one_psc)."""
    p = Psc([e4k(0x10), e4k(0x20)])
    p.ops.defer = True
    p.vmgexit()
    run = p.ops.exits[0]
    assert isinstance(run, HypercallExit)
    run.ret = 2
    with pytest.raises(SevFatalError):
        p.ops.resume_one()
    assert len(p.ops.exits) == 1


@pytest.mark.parametrize("ret", BAD_RETS)
def test_any_vmm_ret_is_generic_in_7_1(ret: int) -> None:
    """7.1: any non-zero ret stops the request with GENERIC (sev.c @00b9744a, snp_complete_one_psc)."""
    p = Psc([e4k(0x10), e4k(0x20)], kvm=KvmVersion.RELEASED)
    p.ops.vmm = lambda run: setattr(run, "ret", ret)
    p.vmgexit()
    assert len(p.ops.exits) == 1 and p.status() == GENERIC


def test_user_exits_disabled_is_generic() -> None:
    """Without KVM_HC_MAP_GPA_RANGE user exits PSC answers GENERIC (sev.c, snp_begin_psc)."""
    p = Psc([e4k(0x10)], exits=False)
    p.vmgexit()
    assert p.ops.exits == [] and p.status() == GENERIC


@pytest.mark.parametrize("scratch", [GHCB_GPA + 0x400, 0x6000])
def test_scratch_outside_shared_buffer(scratch: int) -> None:
    """The PSC buffer must be in the GHCB shared buffer, else INVALID_SCRATCH_AREA (sev.c, setup_vmgexit_scratch)."""
    p = Psc([e4k(0x10)], scratch=scratch)
    p.vmgexit()
    assert p.ops.exits == []
    assert (p.ghcb.get(GhcbSave.sw_exit_info_1), p.ghcb.get(GhcbSave.sw_exit_info_2)) == (
        GhcbHvResp.GHCB_HV_RESP_MALFORMED_INPUT, GhcbErr.GHCB_ERR_INVALID_SCRATCH_AREA)


def test_reserved_header_field_is_ignored() -> None:
    """KVM does not look at psc_hdr.reserved (sev.c, snp_begin_psc)."""
    p = Psc([e4k(0x10)])
    p.write_hdr(PscHdr(0, 0, 0xDEAD))
    p.vmgexit()
    assert p.ops.ranges() == [(0x10000, 1, ENC_4K)] and p.status() == 0


# ------------------------------------------------------------------ many exits, hostile
def test_deferred_completions_continue_the_loop() -> None:
    """With a VMM that stops after each exit, each completion issues the next exit (sev.c, snp_complete_one_psc)."""
    p = Psc([e4k(0x10), e4k(0x20), e4k(0x30)])
    p.ops.defer = True
    p.vmgexit()
    assert len(p.ops.exits) == 1
    p.ops.resume_one()
    assert len(p.ops.exits) == 2 and p.hdr().cur_entry == 1
    p.ops.resume_one()
    p.ops.resume_one()
    assert p.ops.ranges() == [(0x10000, 1, ENC_4K), (0x20000, 1, ENC_4K), (0x30000, 1, ENC_4K)]
    assert p.status() == 0 and not p.ops.pending


@pytest.mark.parametrize("kvm", list(KvmVersion))
def test_header_grown_between_exits_is_ignored(kvm: KvmVersion) -> None:
    """end_entry moved out of bounds during an exit changes nothing: the indices were read once per
    VMGEXIT (sev.c snp_begin_psc; commit ce6ea7b33e00, in 7.1 too)."""
    p = Psc([e4k(0x10), e4k(0x20)], kvm=kvm)
    p.ops.vmm = lambda run: p.write_hdr(PscHdr(0, 300))
    p.vmgexit()
    assert p.ops.ranges() == [(0x10000, 1, ENC_4K), (0x20000, 1, ENC_4K)]
    assert p.status() == 0
    assert p.hdr() == PscHdr(2, 300)  # KVM writes cur_entry; end_entry is the guest's


@pytest.mark.parametrize("kvm", list(KvmVersion))
def test_header_shrunk_between_exits_is_ignored(kvm: KvmVersion) -> None:
    """A smaller end_entry written during an exit does not end the request early (sev.c, snp_begin_psc/snp_do_psc)."""
    p = Psc([e4k(0x10), e4k(0x20), e4k(0x30)], kvm=kvm)
    p.ops.vmm = lambda run: p.write_hdr(PscHdr(0, 0))
    p.vmgexit()
    assert p.ops.ranges() == [(0x10000, 1, ENC_4K), (0x20000, 1, ENC_4K), (0x30000, 1, ENC_4K)]
    assert p.status() == 0 and p.hdr() == PscHdr(3, 0)


def test_cur_entry_moved_forward_during_exit_is_ignored() -> None:
    """KVM scans from its own cur_idx, not the guest's cur_entry, after each exit (sev.c, snp_do_psc)."""
    p = Psc([e4k(0x10), e4k(0x20), e4k(0x30)])
    p.ops.vmm = lambda run: p.write_hdr(PscHdr(2, 2)) if run.args[0] == 0x10000 else None
    p.vmgexit()
    assert p.ops.ranges() == [(0x10000, 1, ENC_4K), (0x20000, 1, ENC_4K), (0x30000, 1, ENC_4K)]
    assert p.status() == 0 and p.hdr().cur_entry == 3


def test_cur_entry_rewound_during_exit_is_overwritten() -> None:
    """A cur_entry rewound during an exit is overwritten by the completion (sev.c, __snp_complete_one_psc)."""
    p = Psc([e4k(0x10), e4k(0x20)])

    def hostile(run: HypercallExit) -> None:
        if run.args[0] == 0x20000:
            p.write_hdr(PscHdr(0, 1))
            p.write_entry(0, e4k(0x10))

    p.ops.vmm = hostile
    p.vmgexit()
    assert p.ops.ranges() == [(0x10000, 1, ENC_4K), (0x20000, 1, ENC_4K)]
    assert p.status() == 0 and p.hdr() == PscHdr(2, 1)
    assert p.entry(0).cur_page == 0  # only the batch in flight is marked


def test_rewind_between_vmgexits_is_reprocessed() -> None:
    """A guest that rewinds its buffer and exits again has the range sent again: KVM keeps no history (sev.c)."""
    p = Psc([e4k(0x10)])
    p.vmgexit()
    p.write_hdr(PscHdr(0, 0))
    p.write_entry(0, e4k(0x10))
    p.vmgexit()
    assert p.ops.ranges() == [(0x10000, 1, ENC_4K)] * 2


def test_entry_changed_during_exit_is_marked_from_live_value() -> None:
    """Completion sets cur_page from each batched entry's current page size (sev.c, __snp_complete_one_psc)."""
    p = Psc([e4k(0x200)])
    p.ops.vmm = lambda run: p.write_entry(0, e2m(0x400, SHARED))
    p.vmgexit()
    assert p.entry(0) == e2m(0x400, SHARED, cur_page=512)
    assert p.ops.ranges() == [(0x200000, 1, ENC_4K)] and p.status() == 0


def test_many_synchronous_exits_do_not_recurse() -> None:
    """253 exits for one VMGEXIT, answered synchronously, run without growing the stack (sev.c, snp_begin_psc loop)."""
    p = Psc([e4k(2 * i, PRIVATE if i % 2 else SHARED) for i in range(253)])
    depth = 0
    frame = sys._getframe()
    while frame.f_back is not None:
        depth += 1
        frame = frame.f_back
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + 80)  # a recursive loop would need several frames per exit
    try:
        p.vmgexit()
    finally:
        sys.setrecursionlimit(limit)
    assert len(p.ops.exits) == 253 and p.status() == 0


def test_registers_written_back_after_psc() -> None:
    """After PSC, KVM writes RAX-RDX back and answers no-action (sev.c, sev_es_sync_to_ghcb)."""
    p = Psc([e4k(0x10)])
    p.ghcb.set(GhcbSave.rax, 0x1234)
    p.vmgexit()
    assert p.ghcb.get(GhcbSave.rax) == 0x1234
    assert p.ghcb.is_valid(GhcbSave.rdx)
