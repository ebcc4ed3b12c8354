"""Tests of the GHCB MSR protocol in testbed/kvm/sev.py (sev.c, sev_handle_vmgexit_msr_protocol).

1. RESET preloads the SEV-information response; the SEV-info request returns it.
2. CPUID requests return the selected register and keep the selector bits.
3. Hypervisor features, AP reset hold, termination and unknown requests.
4. SNP-only requests (preferred / registered GHCB GPA, page state change) answer an SNP guest and
   terminate an SEV-ES guest.
5. The PSC request becomes a one-page KVM_HC_MAP_GPA_RANGE exit whose completion sets the MSR,
   immediately or after the VMM resumes the vCPU; the reference tree accepts only 0, EINVAL and
   EAGAIN from the VMM, 7.1 any value (testbed/kvm/version.py).
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from testbed.errors import UsageError
from testbed.hw.memory import BytesMemory
from testbed.kvm.ghcb import (
    GHCB_HV_FT_SUPPORTED,
    GHCB_MSR_PREF_GPA_NONE,
    GHCB_MSR_PSC_RESP_ERROR,
    GhcbMsrCode,
    SevTermLinux,
    SevTermSet,
    SnpPageState,
    ghcb_cpuid_req,
    ghcb_msr_proto_max,
    ghcb_msr_proto_min,
    ghcb_msr_psc_req_gfn,
    ghcb_msr_reg_gpa_req_val,
    ghcb_sev_term_reason,
)
from testbed.kvm.sev import SevEsHandler, SevFatalError, SevState
from testbed.kvm.uapi import (
    KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_DECRYPTED,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_MAP_GPA_RANGE_PAGE_SZ_4K,
    KVM_SYSTEM_EVENT_SEV_TERM,
    ApResetHoldExit,
    HypercallExit,
    KvmExit,
    KvmExitReason,
    SystemEventExit,
    exit_name,
)
from testbed.kvm.version import KvmVersion

C_BIT = 47


class FakeOps:
    """SevVcpuOps for the MSR protocol: a CPUID table and a VMM that records exits and answers
    with `vmm_ret`, completing at once or (with `defer`) only when the test calls `resume()`."""

    def __init__(self) -> None:
        self.memory = BytesMemory(0x4000)
        self.exits: list[KvmExit] = []
        self.vmm_ret = 0
        self.defer = False
        self.pending: list[Callable[[], None]] = []
        self.cpuid_calls: list[tuple[int, int]] = []
        self.cpuid_table: dict[tuple[int, int], tuple[int, int, int, int]] = {}

    def cpuid(self, function: int, index: int) -> tuple[int, int, int, int]:
        self.cpuid_calls.append((function, index))
        return self.cpuid_table.get((function, index), (0, 0, 0, 0))

    def maxphyaddr(self) -> int:
        """cpuid_query_maxphyaddr(): the table's 0x80000008 leaf if the extended range has it, else 36."""
        top = self.cpuid_table.get((0x80000000, 0), (0, 0, 0, 0))[0]
        leaf = self.cpuid_table.get((0x80000008, 0))
        return leaf[0] & 0xFF if top >= 0x80000008 and leaf is not None else 36

    def hypercall(self, nr: int, a0: int, a1: int, a2: int, a3: int, cpl: int,
                  complete: Callable[[int], None]) -> None:
        raise AssertionError("the MSR protocol makes no hypercalls")

    def exit_to_userspace(self, run: KvmExit, complete: Callable[[], None] | None) -> None:
        self.exits.append(run)
        if isinstance(run, HypercallExit):
            run.ret = self.vmm_ret
        if complete is None:
            return
        if self.defer:
            self.pending.append(complete)
        else:
            complete()

    def pio(self, port: int, size: int, is_in: bool, value: int, complete: Callable[[int], None]) -> None:
        raise AssertionError("the MSR protocol does no port I/O")

    def msr(self, index: int, write: bool, value: int, complete: Callable[[bool, int], None]) -> None:
        raise AssertionError("the MSR protocol does no MSR access")

    def resume(self) -> None:
        done, self.pending = self.pending, []
        for complete in done:
            complete()


def make(snp: bool = False, exits: bool = True, version: int = 2,
         kvm: KvmVersion = KvmVersion.KVM_X86) -> tuple[SevEsHandler, SevState, FakeOps]:
    ops = FakeOps()
    state = SevState(snp=snp, ghcb_version=version, c_bit=C_BIT, hypercall_exit_enabled=exits, kvm_version=kvm)
    return SevEsHandler(state, ops), state, ops


def vmgexit(handler: SevEsHandler, msr: int) -> int:
    handler.state.ghcb_msr = msr
    handler.handle_vmgexit()
    return handler.state.ghcb_msr


# ---------------------------------------------------------------------------------- SEV info
def test_reset_preloads_sev_info() -> None:
    """RESET puts the SEV-info response (max = VM's GHCB version, min 1, C-bit) in the MSR (sev.c, sev_es_init_vmcb)."""
    handler, state, _ = make()
    handler.reset()
    assert state.ghcb_msr == (2 << 48) | (1 << 32) | (C_BIT << 24) | GhcbMsrCode.GHCB_MSR_SEV_INFO_RESP
    assert ghcb_msr_proto_max(state.ghcb_msr) == 2
    assert ghcb_msr_proto_min(state.ghcb_msr) == 1


def test_reset_reports_legacy_version_1() -> None:
    """A VM created with GHCB version 1 advertises max 1 (sev.c, __sev_guest_init / sev_es_init_vmcb)."""
    handler, state, _ = make(version=1)
    handler.reset()
    assert ghcb_msr_proto_max(state.ghcb_msr) == 1


def test_sev_info_request() -> None:
    """GHCB_MSR_SEV_INFO_REQ is answered with the SEV-info response (sev.c, sev_handle_vmgexit_msr_protocol)."""
    handler, _, ops = make(snp=True)
    assert vmgexit(handler, GhcbMsrCode.GHCB_MSR_SEV_INFO_REQ | 0xABC000) == (
        (2 << 48) | (1 << 32) | (C_BIT << 24) | 0x001)
    assert ops.exits == []


def test_sev_state_rejects_bad_versions() -> None:
    """SNP needs GHCB version 2 and versions outside 1..2 are refused (sev.c, __sev_guest_init)."""
    with pytest.raises(UsageError):
        SevState(snp=True, ghcb_version=1)
    with pytest.raises(UsageError):
        SevState(ghcb_version=3)


# -------------------------------------------------------------------------------------- CPUID
@pytest.mark.parametrize("reg", [0, 1, 2, 3])
def test_cpuid_request_returns_selected_register(reg: int) -> None:
    """A CPUID request returns the chosen register in [63:32], selector kept (sev.c, GHCB_MSR_CPUID_REQ)."""
    handler, _, ops = make()
    ops.cpuid_table[(0x8000001F, 0)] = (0x1111, 0x2222, 0x3333, 0x4444)
    got = vmgexit(handler, ghcb_cpuid_req(0x8000001F, reg))
    assert got & 0xFFF == GhcbMsrCode.GHCB_MSR_CPUID_RESP
    assert got >> 32 == (0x1111, 0x2222, 0x3333, 0x4444)[reg]
    assert (got >> 30) & 3 == reg  # set_ghcb_msr_bits() only touches [63:32] and [11:0]


def test_cpuid_request_uses_subleaf_zero_and_truncates() -> None:
    """The MSR CPUID request runs the CPUID exit with ECX = 0 and a 32-bit result (sev.c, GHCB_MSR_CPUID_REQ)."""
    handler, _, ops = make()
    ops.cpuid_table[(7, 0)] = (0x1_2345_6789, 0, 0, 0)
    got = vmgexit(handler, ghcb_cpuid_req(7, 0) | (0x3FFFF << 12))  # junk in [29:12] is kept too
    assert ops.cpuid_calls == [(7, 0)]
    assert got >> 32 == 0x2345_6789
    assert (got >> 12) & 0x3FFFF == 0x3FFFF


# ------------------------------------------------------------------- features, hold, term
@pytest.mark.parametrize("snp", [False, True])
def test_hv_features(snp: bool) -> None:
    """The hypervisor-features request answers 0x3 for SEV-ES and SNP (sev.c, GHCB_MSR_HV_FT_REQ)."""
    handler, _, _ = make(snp=snp)
    assert vmgexit(handler, GhcbMsrCode.GHCB_MSR_HV_FT_REQ) == (GHCB_HV_FT_SUPPORTED << 12) | 0x081 == 0x3081


@pytest.mark.parametrize("kvm", list(KvmVersion))
def test_ap_reset_hold_parks_with_result_zero(kvm: KvmVersion) -> None:
    """AP reset hold presets result 0 and exits KVM_EXIT_AP_RESET_HOLD (32), not HLT, without an
    in-kernel LAPIC (sev.c sev_handle_vmgexit_msr_protocol; x86.c kvm_emulate_ap_reset_hold)."""
    handler, _, ops = make(kvm=kvm)
    assert vmgexit(handler, 0xFFFF_F000 | GhcbMsrCode.GHCB_MSR_AP_RESET_HOLD_REQ) == 0x007
    assert ops.exits == [ApResetHoldExit()]
    assert ops.exits[0].exit_reason == KvmExitReason.KVM_EXIT_AP_RESET_HOLD == 32
    assert ops.exits[0].reason == exit_name(32) == "ap_reset_hold"


def test_termination_request() -> None:
    """A termination request exits with SEV_TERM and data[0] = the raw MSR, MSR unchanged (sev.c, GHCB_MSR_TERM_REQ)."""
    handler, _, ops = make()
    msr = GhcbMsrCode.GHCB_MSR_TERM_REQ | ghcb_sev_term_reason(SevTermSet.SEV_TERM_SET_LINUX,
                                                              SevTermLinux.GHCB_TERM_PSC)
    assert vmgexit(handler, msr) == msr
    assert ops.exits == [SystemEventExit(KVM_SYSTEM_EVENT_SEV_TERM, (msr,))]


@pytest.mark.parametrize("msr", [0x0FE, 0x001, 0x005, 0x016 | (2 << 32), 0x102, 0xFFF | (1 << 63)])
def test_unknown_request_leaves_msr_unchanged(msr: int) -> None:
    """An unknown MSR-protocol request leaves the MSR unchanged (sev.c, sev_handle_vmgexit_msr_protocol default)."""
    handler, _, ops = make(snp=True)
    assert vmgexit(handler, msr) == msr
    assert ops.exits == []


# ------------------------------------------------------------------------- SNP-only requests
@pytest.mark.parametrize("msr", [
    GhcbMsrCode.GHCB_MSR_PREF_GPA_REQ,
    ghcb_msr_reg_gpa_req_val(0x42),
    ghcb_msr_psc_req_gfn(0x10, SnpPageState.SNP_PAGE_STATE_SHARED),
])
def test_snp_only_requests_terminate_sev_es(msr: int) -> None:
    """Preferred/registered GHCB GPA and PSC requests from an SEV-ES guest terminate it (sev.c, out_terminate)."""
    handler, state, ops = make(snp=False)
    assert vmgexit(handler, msr) == msr
    assert ops.exits == [SystemEventExit(KVM_SYSTEM_EVENT_SEV_TERM, (msr,))]
    assert state.registered_ghcb_gpa is None


def test_preferred_gpa_is_no_preference() -> None:
    """An SNP guest asking for a preferred GHCB GPA hears "no preference" (sev.c, GHCB_MSR_PREF_GPA_REQ)."""
    handler, _, _ = make(snp=True)
    assert vmgexit(handler, GhcbMsrCode.GHCB_MSR_PREF_GPA_REQ) == (GHCB_MSR_PREF_GPA_NONE << 12) | 0x011


def test_register_gpa_records_and_echoes() -> None:
    """Registering a GHCB GPA records it and echoes the GFN with 0x013 (sev.c, GHCB_MSR_REG_GPA_REQ)."""
    handler, state, _ = make(snp=True)
    gfn = (1 << 52) - 1
    assert vmgexit(handler, ghcb_msr_reg_gpa_req_val(gfn)) == (gfn << 12) | 0x013
    assert state.registered_ghcb_gpa == gfn << 12
    assert vmgexit(handler, ghcb_msr_reg_gpa_req_val(3)) == 0x3013
    assert state.registered_ghcb_gpa == 0x3000


# ---------------------------------------------------------------------------- PSC request
@pytest.mark.parametrize(("op", "enc"), [(SnpPageState.SNP_PAGE_STATE_PRIVATE, KVM_MAP_GPA_RANGE_ENCRYPTED),
                                         (SnpPageState.SNP_PAGE_STATE_SHARED, KVM_MAP_GPA_RANGE_DECRYPTED)])
def test_psc_request_exits_one_page(op: int, enc: int) -> None:
    """A PSC request is one 4K KVM_HC_MAP_GPA_RANGE exit, success is exactly 0x015 (sev.c, snp_begin_psc_msr)."""
    handler, _, ops = make(snp=True)
    gfn = (1 << 40) - 1
    assert vmgexit(handler, ghcb_msr_psc_req_gfn(gfn, op)) == GhcbMsrCode.GHCB_MSR_PSC_RESP
    assert ops.exits == [HypercallExit(nr=KVM_HC_MAP_GPA_RANGE, args=(gfn << 12, 1, enc | KVM_MAP_GPA_RANGE_PAGE_SZ_4K,
                                                                     0, 0, 0), ret=0)]


@pytest.mark.parametrize("kvm", list(KvmVersion))
@pytest.mark.parametrize("ret", [errno.EINVAL, errno.EAGAIN])
def test_psc_request_vmm_error(kvm: KvmVersion, ret: int) -> None:
    """A VMM error (EINVAL, EAGAIN) answers bit 63 | 0x015 in both versions (sev.c, snp_complete_psc_msr)."""
    handler, _, ops = make(snp=True, kvm=kvm)
    ops.vmm_ret = ret
    assert vmgexit(handler, ghcb_msr_psc_req_gfn(5, 1)) == GHCB_MSR_PSC_RESP_ERROR == (1 << 63) | 0x015


@pytest.mark.parametrize("ret", [1, (-errno.EINVAL) & ((1 << 64) - 1), 1 << 32 | errno.EINVAL, errno.EIO])
def test_psc_request_other_vmm_ret_fails_kvm_run(ret: int) -> None:
    """Reference tree: a ret other than 0/EINVAL/EAGAIN fails KVM_RUN with -EINVAL, the MSR keeps the
    request (sev.c snp_complete_psc_msr, kvm_is_valid_map_gpa_range_ret; commit 5d40e5b49442)."""
    handler, state, ops = make(snp=True)
    ops.vmm_ret = ret
    req = ghcb_msr_psc_req_gfn(5, 1)
    state.ghcb_msr = req
    with pytest.raises(SevFatalError, match=r"hypercall\.ret") as err:
        handler.handle_vmgexit()
    assert err.value.errno == errno.EINVAL
    assert state.ghcb_msr == req
    assert len(ops.exits) == 1


@pytest.mark.parametrize("ret", [1, (-errno.EINVAL) & ((1 << 64) - 1), errno.EIO])
def test_psc_request_any_vmm_ret_is_an_error_in_7_1(ret: int) -> None:
    """7.1: any non-zero ret is answered GHCB_MSR_PSC_RESP_ERROR (sev.c @00b9744a, snp_complete_psc_msr)."""
    handler, _, ops = make(snp=True, kvm=KvmVersion.RELEASED)
    ops.vmm_ret = ret
    assert vmgexit(handler, ghcb_msr_psc_req_gfn(5, 1)) == GHCB_MSR_PSC_RESP_ERROR


@pytest.mark.parametrize("op", [0, 3, 4, 15])
def test_psc_request_bad_op(op: int) -> None:
    """A PSC request with an operation other than 1 or 2 is an error without an exit (sev.c, snp_begin_psc_msr)."""
    handler, _, ops = make(snp=True)
    assert vmgexit(handler, ghcb_msr_psc_req_gfn(5, op)) == GHCB_MSR_PSC_RESP_ERROR
    assert ops.exits == []


def test_psc_request_without_user_exit() -> None:
    """Without KVM_HC_MAP_GPA_RANGE user exits the PSC request fails without an exit (sev.c, snp_begin_psc_msr)."""
    handler, _, ops = make(snp=True, exits=False)
    assert vmgexit(handler, ghcb_msr_psc_req_gfn(5, 2)) == GHCB_MSR_PSC_RESP_ERROR
    assert ops.exits == []


def test_psc_request_reads_the_exit_gate_each_time() -> None:
    """The user-exit gate is a live query of KVM_CAP_EXIT_HYPERCALL (x86.c, user_exit_on_hypercall)."""
    enabled = [False]
    handler, state, ops = make(snp=True)
    state.hypercall_exit_enabled = lambda: enabled[0]
    assert vmgexit(handler, ghcb_msr_psc_req_gfn(5, 2)) == GHCB_MSR_PSC_RESP_ERROR
    enabled[0] = True
    assert vmgexit(handler, ghcb_msr_psc_req_gfn(5, 2)) == GhcbMsrCode.GHCB_MSR_PSC_RESP
    assert len(ops.exits) == 1


def test_psc_request_completes_when_vmm_resumes() -> None:
    """If the VMM stops, the MSR keeps the request until the completion runs (sev.c, snp_complete_psc_msr)."""
    handler, state, ops = make(snp=True)
    ops.defer = True
    req = ghcb_msr_psc_req_gfn(9, 1)
    assert vmgexit(handler, req) == req
    ops.resume()
    assert state.ghcb_msr == GhcbMsrCode.GHCB_MSR_PSC_RESP
