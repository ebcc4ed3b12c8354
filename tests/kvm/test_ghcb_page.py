"""Tests of the full-GHCB protocol in testbed/kvm/sev.py (sev.c, sev_handle_vmgexit).

1. Mapping: no GHCB, a GHCB outside memory, an unregistered GHCB on SNP (bad input in the
   reference tree, VM-fatal in 7.1).
2. The snapshot: the valid bitmap is copied then cleared, registers are read only when valid
   and RAX/RBX/RCX/RDX are written back unconditionally.
3. The front door: usage, missing SW_EXIT* fields, per-exit-code required fields, unknown codes.
4. Each exit code: VMMCALL, IOIO (plain and string, scratch-area rules), MSR, CPUID, AP jump
   table, HV features, termination, unsupported event, the no-op ones and the unmodelled ones.
5. Hostile input (Hypothesis): whatever the guest writes, KVM's front-door answer is the one a
   plain re-statement of sev_handle_vmgexit() predicts, and only KVM's own failures raise.

Where the reference tree (kvm-x86, sev.c @1a27afa0) and 7.1 (sev.c @00b9744a) differ, a test
runs both (testbed/kvm/version.py lists the differences and their commits).
"""

from __future__ import annotations

import errno
import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from testbed.hw.exits import GhcbMsrRegister
from testbed.hw.memory import BytesMemory
from testbed.kvm.ghcb import (
    GHCB_SHARED_BUFFER_OFFSET,
    SNP_ONLY_VMGEXITS,
    Ghcb,
    GhcbErr,
    GhcbHvResp,
    GhcbSave,
    SwExitCode,
    ghcb_bitmap_idx,
    svm_vmgexit_term_reason,
)
from testbed.kvm.sev import KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, SevEsHandler, SevFatalError, SevState
from testbed.kvm.uapi import (
    KVM_EXIT_IO_IN,
    KVM_INTERNAL_ERROR_EMULATION,
    KVM_SYSTEM_EVENT_SEV_TERM,
    ApResetHoldExit,
    InternalErrorExit,
    IoExit,
    IoOutExit,
    KvmExit,
    SystemEventExit,
)
from testbed.kvm.version import KvmVersion
from testbed.trace import Tracer

MEM_SIZE = 0x20000
GHCB_GPA = 0x3000
SHARED = GHCB_GPA + GHCB_SHARED_BUFFER_OFFSET
IOIO_IN = 1 << 0
IOIO_STR = 1 << 2
SZ8, SZ16, SZ32 = 1 << 4, 2 << 4, 4 << 4
GP_EVENT = (1 << 31) | (3 << 8) | 13


class FakeOps:
    """SevVcpuOps over BytesMemory: records every call; the VMM's answers are attributes, and
    with `defer` completions wait for `resume()` (the VMM stopped the vCPU)."""

    def __init__(self) -> None:
        self.memory = BytesMemory(MEM_SIZE)
        self.exits: list[KvmExit] = []
        self.calls: list[tuple[Any, ...]] = []
        self.defer = False
        self.pending: list[Callable[[], None]] = []
        self.hypercall_ret = 0
        self.pio_in_value = 0
        self.msr_ok = True
        self.msr_value = 0
        self.in_fill = b""
        self.cpuid_table: dict[tuple[int, int], tuple[int, int, int, int]] = {}

    def _complete(self, fn: Callable[[], None]) -> None:
        if self.defer:
            self.pending.append(fn)
        else:
            fn()

    def resume(self) -> None:
        while self.pending:
            self.pending.pop(0)()

    def cpuid(self, function: int, index: int) -> tuple[int, int, int, int]:
        self.calls.append(("cpuid", function, index))
        return self.cpuid_table.get((function, index), (0, 0, 0, 0))

    def maxphyaddr(self) -> int:
        """cpuid_query_maxphyaddr(): the table's 0x80000008 leaf if the extended range has it, else 36."""
        top = self.cpuid_table.get((0x80000000, 0), (0, 0, 0, 0))[0]
        leaf = self.cpuid_table.get((0x80000008, 0))
        return leaf[0] & 0xFF if top >= 0x80000008 and leaf is not None else 36

    def hypercall(self, nr: int, a0: int, a1: int, a2: int, a3: int, cpl: int,
                  complete: Callable[[int], None]) -> None:
        self.calls.append(("hypercall", nr, a0, a1, a2, a3, cpl))
        self._complete(lambda: complete(self.hypercall_ret))

    def exit_to_userspace(self, run: KvmExit, complete: Callable[[], None] | None) -> None:
        self.exits.append(run)
        if isinstance(run, IoExit) and run.direction == KVM_EXIT_IO_IN:
            run.data[: len(self.in_fill)] = self.in_fill[: len(run.data)]
        if complete is not None:
            self._complete(complete)

    def pio(self, port: int, size: int, is_in: bool, value: int, complete: Callable[[int], None]) -> None:
        self.calls.append(("pio", port, size, is_in, value))
        self._complete(lambda: complete(self.pio_in_value if is_in else 0))

    def msr(self, index: int, write: bool, value: int, complete: Callable[[bool, int], None]) -> None:
        self.calls.append(("msr", index, write, value))
        self._complete(lambda: complete(self.msr_ok, self.msr_value))


KVM = list(KvmVersion)
REF, V7_1 = KvmVersion.KVM_X86, KvmVersion.RELEASED


def make(snp: bool = False, version: int = 2, register: bool = True,
         kvm: KvmVersion = REF) -> tuple[SevEsHandler, FakeOps, Ghcb]:
    ops = FakeOps()
    state = SevState(snp=snp, ghcb_version=version, hypercall_exit_enabled=True, msr=GhcbMsrRegister(GHCB_GPA),
                     registered_ghcb_gpa=GHCB_GPA if (snp and register) else None, kvm_version=kvm)
    return SevEsHandler(state, ops), ops, Ghcb(ops.memory, GHCB_GPA)


def request(ghcb: Ghcb, code: int, info1: int = 0, info2: int = 0, **fields: int) -> None:
    """What the guest's #VC handler does: fill in the fields (marking them valid)."""
    ghcb.set(GhcbSave.sw_exit_code, code)
    ghcb.set(GhcbSave.sw_exit_info_1, info1)
    ghcb.set(GhcbSave.sw_exit_info_2, info2)
    for name, value in fields.items():
        ghcb.set(GhcbSave[name], value)


def answer(ghcb: Ghcb) -> tuple[int, int]:
    return ghcb.get(GhcbSave.sw_exit_info_1), ghcb.get(GhcbSave.sw_exit_info_2)


def bad_input(reason: GhcbErr) -> tuple[int, int]:
    return GhcbHvResp.GHCB_HV_RESP_MALFORMED_INPUT, reason


OK = (0, 0)


# ------------------------------------------------------------------------------- mapping
def test_no_ghcb_returns_to_guest() -> None:
    """A VMGEXIT with a zero GHCB MSR resumes the guest without doing anything (sev.c, sev_handle_vmgexit)."""
    handler, ops, _ = make()
    handler.state.ghcb_msr = 0
    handler.handle_vmgexit()
    assert ops.exits == [] and ops.calls == []
    assert not any(ops.memory.data)


def test_ghcb_outside_memory_returns_to_guest() -> None:
    """A GHCB that cannot be mapped resumes the guest untouched (sev.c, sev_handle_vmgexit kvm_vcpu_map failure)."""
    handler, ops, _ = make()
    for gpa in (MEM_SIZE, MEM_SIZE + 0x5000, 1 << 63):
        handler.state.ghcb_msr = gpa
        handler.handle_vmgexit()
    assert ops.exits == [] and ops.calls == []


@pytest.mark.parametrize("registered", [None, GHCB_GPA + 0x1000])
def test_unregistered_ghcb_is_bad_input_on_snp(registered: int | None) -> None:
    """Reference tree: an SNP VMGEXIT from a GPA that is not the registered GHCB is answered
    NOT_REGISTERED (2, 1) in that page and the guest runs on (sev.c sev_handle_vmgexit,
    ghcb_gpa_is_registered -> svm_vmgexit_bad_input; commit 1797e00bf802)."""
    handler, ops, ghcb = make(snp=True, register=False)
    handler.state.registered_ghcb_gpa = registered
    request(ghcb, SwExitCode.SVM_EXIT_VMMCALL, rax=12, cpl=0)  # would be a user exit if handled
    handler.handle_vmgexit()
    assert answer(ghcb) == bad_input(GhcbErr.GHCB_ERR_NOT_REGISTERED) == (2, 1)
    assert ops.calls == [] and ops.exits == []
    # sev_es_unmap_ghcb() -> sev_es_sync_to_ghcb(): RAX-RDX written back from the snapshot.
    assert ghcb.get(GhcbSave.rax) == 12 and ghcb.is_valid(GhcbSave.rdx)


@pytest.mark.parametrize("registered", [None, GHCB_GPA + 0x1000])
def test_unregistered_ghcb_is_fatal_on_snp_in_7_1(registered: int | None) -> None:
    """7.1: an SNP VMGEXIT from an unregistered GHCB GPA fails KVM_RUN with -EINVAL
    (sev.c @00b9744a, sev_handle_vmgexit ghcb_gpa_is_registered)."""
    handler, ops, ghcb = make(snp=True, register=False, kvm=V7_1)
    handler.state.registered_ghcb_gpa = registered
    request(ghcb, SwExitCode.SVM_VMGEXIT_HV_FEATURES)
    with pytest.raises(SevFatalError, match="0x3000") as err:
        handler.handle_vmgexit()
    assert err.value.gpa == GHCB_GPA and err.value.errno == errno.EINVAL
    assert ghcb.valid_bitmap == 0  # the snapshot (which clears the bitmap) came first
    assert answer(ghcb) == (0, 0) and ops.exits == []


def test_registered_ghcb_works_on_snp() -> None:
    """An SNP VMGEXIT from the registered GHCB is handled (sev.c, sev_handle_vmgexit)."""
    handler, _, ghcb = make(snp=True)
    request(ghcb, SwExitCode.SVM_VMGEXIT_HV_FEATURES)
    handler.handle_vmgexit()
    assert answer(ghcb) == (0, 0x3)


def test_sev_es_needs_no_registration() -> None:
    """An SEV-ES guest may use any GHCB GPA (sev.c, sev_handle_vmgexit: the check is SNP-only)."""
    handler, _, ghcb = make(snp=False)
    request(ghcb, SwExitCode.SVM_VMGEXIT_HV_FEATURES)
    handler.handle_vmgexit()
    assert answer(ghcb) == (0, 0x3)


# ------------------------------------------------------------------------------- snapshot
def test_valid_bitmap_cleared_and_answer_marked_valid() -> None:
    """The valid bitmap is cleared; the answer marks EXITINFO1/2 and RAX-RDX valid (sev.c, sev_es_sync_from_ghcb)."""
    handler, _, ghcb = make()
    request(ghcb, SwExitCode.SVM_VMGEXIT_HV_FEATURES, r8=1, rsi=2, xcr0=1)
    handler.handle_vmgexit()
    expected = {GhcbSave.sw_exit_info_1, GhcbSave.sw_exit_info_2, GhcbSave.rax, GhcbSave.rbx, GhcbSave.rcx,
                GhcbSave.rdx}
    assert ghcb.valid_bitmap == sum(1 << ghcb_bitmap_idx(f) for f in expected)


def test_registers_read_only_when_valid_and_written_back() -> None:
    """Invalid GPRs read as 0 and RAX-RDX are written back unconditionally (sev.c, sev_es_sync_from_ghcb/_to_ghcb)."""
    handler, _, ghcb = make()
    request(ghcb, SwExitCode.SVM_VMGEXIT_HV_FEATURES, rcx=0x77)
    ghcb.memory.write(GHCB_GPA + GhcbSave.rbx, (0x55).to_bytes(8, "little"))  # present but not valid
    handler.handle_vmgexit()
    assert ghcb.get(GhcbSave.rbx) == 0
    assert ghcb.get(GhcbSave.rcx) == 0x77


def test_snapshot_is_taken_at_vmgexit() -> None:
    """A field changed after the VMGEXIT does not change the request being handled (sev.c, sev_es_sync_from_ghcb)."""
    handler, ops, ghcb = make()
    ops.defer = True
    request(ghcb, SwExitCode.SVM_EXIT_VMMCALL, rax=12, rbx=0x1000, cpl=0)
    handler.handle_vmgexit()
    ghcb.set(GhcbSave.rbx, 0xBAD)  # too late
    ops.resume()
    assert ops.calls == [("hypercall", 12, 0x1000, 0, 0, 0, 0)]


# ----------------------------------------------------------------------------- front door
@pytest.mark.parametrize("kvm", KVM)
def test_usage_nonzero_is_invalid_usage(kvm: KvmVersion) -> None:
    """A GHCB usage other than 0 is INVALID_USAGE, checked before any other input (sev.c sev_handle_vmgexit;
    7.1: sev_es_validate_vmgexit)."""
    handler, _, ghcb = make(kvm=kvm)
    ghcb.ghcb_usage = 1  # and nothing valid at all
    handler.handle_vmgexit()
    assert answer(ghcb) == bad_input(GhcbErr.GHCB_ERR_INVALID_USAGE)


@pytest.mark.parametrize("kvm", KVM)
@pytest.mark.parametrize("missing", [GhcbSave.sw_exit_code, GhcbSave.sw_exit_info_1, GhcbSave.sw_exit_info_2])
def test_sw_exit_fields_must_be_valid(missing: GhcbSave, kvm: KvmVersion) -> None:
    """SW_EXITCODE and SW_EXITINFO1/2 must all be valid, else MISSING_INPUT (sev.c,
    sev_es_are_required_ghcb_fields_valid; 7.1: sev_es_validate_vmgexit)."""
    handler, _, ghcb = make(kvm=kvm)
    request(ghcb, SwExitCode.SVM_VMGEXIT_HV_FEATURES)
    ghcb.valid_bitmap &= ~(1 << ghcb_bitmap_idx(missing))
    handler.handle_vmgexit()
    assert answer(ghcb) == bad_input(GhcbErr.GHCB_ERR_MISSING_INPUT)


@pytest.mark.parametrize("code", [0x078, 0x7F, SwExitCode.SVM_VMGEXIT_SNP_RUN_VMPL, SwExitCode.SVM_VMGEXIT_SAVIC,
                                  (1 << 32) | SwExitCode.SVM_EXIT_CPUID, 1 << 63])
@pytest.mark.parametrize("kvm", KVM)
def test_unknown_exit_code_is_invalid_event(code: int, kvm: KvmVersion) -> None:
    """An exit code KVM does not list is INVALID_EVENT (sev.c, sev_handle_vmgexit default; 7.1:
    sev_es_validate_vmgexit default)."""
    handler, ops, ghcb = make(snp=True, kvm=kvm)
    request(ghcb, code, rax=1, rcx=1, rdx=1, cpl=0, sw_scratch=SHARED)
    handler.handle_vmgexit()
    assert answer(ghcb) == bad_input(GhcbErr.GHCB_ERR_INVALID_EVENT)
    assert ops.calls == [] and ops.exits == []


MISSING_CASES: list[tuple[str, bool, int, int, int, dict[str, int]]] = [
    # (id, snp, code, info1, info2, valid fields)
    ("write_dr7", False, SwExitCode.SVM_EXIT_WRITE_DR7, 0, 0, {}),
    ("rdpmc", False, SwExitCode.SVM_EXIT_RDPMC, 0, 0, {"rax": 0}),
    ("cpuid_no_rcx", False, SwExitCode.SVM_EXIT_CPUID, 0, 0, {"rax": 1}),
    ("cpuid_no_rax", False, SwExitCode.SVM_EXIT_CPUID, 0, 0, {"rcx": 0}),
    ("cpuid_0xd_no_xcr0", False, SwExitCode.SVM_EXIT_CPUID, 0, 0, {"rax": 0xD, "rcx": 0}),
    ("out_no_rax", False, SwExitCode.SVM_EXIT_IOIO, SZ8, 0, {}),
    ("string_no_scratch", False, SwExitCode.SVM_EXIT_IOIO, SZ8 | IOIO_STR | IOIO_IN, 1, {"rax": 0}),
    ("msr_no_rcx", False, SwExitCode.SVM_EXIT_MSR, 0, 0, {"rax": 0, "rdx": 0}),
    ("wrmsr_no_rdx", False, SwExitCode.SVM_EXIT_MSR, 1, 0, {"rax": 0, "rcx": 0}),
    ("wrmsr_no_rax", False, SwExitCode.SVM_EXIT_MSR, 7, 0, {"rdx": 0, "rcx": 0}),
    ("vmmcall_no_cpl", False, SwExitCode.SVM_EXIT_VMMCALL, 0, 0, {"rax": 0}),
    ("vmmcall_no_rax", False, SwExitCode.SVM_EXIT_VMMCALL, 0, 0, {"cpl": 0}),
    ("monitor_no_rdx", False, SwExitCode.SVM_EXIT_MONITOR, 0, 0, {"rax": 0, "rcx": 0}),
    ("mwait_no_rcx", False, SwExitCode.SVM_EXIT_MWAIT, 0, 0, {"rax": 0}),
    ("mmio_no_scratch", False, SwExitCode.SVM_VMGEXIT_MMIO_READ, 0, 8, {}),
    ("psc_no_scratch", True, SwExitCode.SVM_VMGEXIT_PSC, 0, 0, {}),
    ("ap_create_no_rax", True, SwExitCode.SVM_VMGEXIT_AP_CREATION, 1, 0x5000, {}),
]


@pytest.mark.parametrize("kvm", KVM)
@pytest.mark.parametrize(("snp", "code", "info1", "info2", "fields"), [c[1:] for c in MISSING_CASES],
                         ids=[c[0] for c in MISSING_CASES])
def test_per_exit_required_fields(snp: bool, code: int, info1: int, info2: int, fields: dict[str, int],
                                  kvm: KvmVersion) -> None:
    """Missing per-exit inputs are MISSING_INPUT in both versions (sev.c, sev_es_are_required_ghcb_fields_valid;
    7.1: sev_es_validate_vmgexit)."""
    handler, ops, ghcb = make(snp=snp, kvm=kvm)
    request(ghcb, code, info1, info2, **fields)
    handler.handle_vmgexit()
    assert answer(ghcb) == bad_input(GhcbErr.GHCB_ERR_MISSING_INPUT)
    assert ops.calls == [] and ops.exits == []


INVALID_EVENT, INVALID_INPUT, MISSING_INPUT = (GhcbErr.GHCB_ERR_INVALID_EVENT, GhcbErr.GHCB_ERR_INVALID_INPUT,
                                               GhcbErr.GHCB_ERR_MISSING_INPUT)
VERSION_CASES: list[tuple[str, bool, int, int, int, dict[str, int], GhcbErr, GhcbErr]] = [
    # (id, snp, code, info1, info2, valid fields, reference answer, 7.1 answer)
    ("psc_on_sev_es", False, SwExitCode.SVM_VMGEXIT_PSC, 0, 0, {"sw_scratch": SHARED}, INVALID_EVENT, MISSING_INPUT),
    ("ap_creation_on_sev_es", False, SwExitCode.SVM_VMGEXIT_AP_CREATION, 2, 0, {}, INVALID_EVENT, MISSING_INPUT),
    ("guest_req_on_sev_es", False, SwExitCode.SVM_VMGEXIT_GUEST_REQUEST, 0x5000, 0x6000, {}, INVALID_EVENT,
     MISSING_INPUT),
    ("ext_guest_req_on_sev_es", False, SwExitCode.SVM_VMGEXIT_EXT_GUEST_REQUEST, 0x5000, 0x6000,
     {"rax": 0x7000, "rbx": 1}, INVALID_EVENT, MISSING_INPUT),
    ("guest_req_unaligned_req", True, SwExitCode.SVM_VMGEXIT_GUEST_REQUEST, 0x5008, 0x6000, {}, INVALID_INPUT,
     MISSING_INPUT),
    ("guest_req_unaligned_resp", True, SwExitCode.SVM_VMGEXIT_GUEST_REQUEST, 0x5000, 0x6FFF, {}, INVALID_INPUT,
     MISSING_INPUT),
    ("ext_guest_req_same_page", True, SwExitCode.SVM_VMGEXIT_EXT_GUEST_REQUEST, 0x5000, 0x5000, {}, INVALID_INPUT,
     MISSING_INPUT),
]


@pytest.mark.parametrize("kvm", KVM)
@pytest.mark.parametrize(("snp", "code", "info1", "info2", "fields", "reference", "older"),
                         [c[1:] for c in VERSION_CASES], ids=[c[0] for c in VERSION_CASES])
def test_snp_only_events_and_guest_request_gpas(snp: bool, code: int, info1: int, info2: int, fields: dict[str, int],
                                                reference: GhcbErr, older: GhcbErr, kvm: KvmVersion) -> None:
    """SNP-only events from SEV-ES are INVALID_EVENT and bad guest-request GPAs INVALID_INPUT in the reference
    tree (sev.c is_snp_only_vmgexit, sev_handle_vmgexit GUEST_REQUEST case; commits 95d8c59cdf6d,
    5eb5d5d123a8); 7.1 answers MISSING_INPUT for both (sev_es_validate_vmgexit). The guest runs on."""
    handler, ops, ghcb = make(snp=snp, kvm=kvm)
    request(ghcb, code, info1, info2, **fields)
    handler.handle_vmgexit()
    assert answer(ghcb) == bad_input(reference if kvm is REF else older)
    assert ops.calls == [] and ops.exits == []


@pytest.mark.parametrize("kvm", KVM)
@pytest.mark.parametrize("code", sorted(SNP_ONLY_VMGEXITS))
def test_snp_only_check_precedes_required_fields(code: int, kvm: KvmVersion) -> None:
    """An SNP-only exit code from SEV-ES with no field marked valid: INVALID_EVENT in the reference tree, which
    reads the exit code before the required-field check (sev.c sev_handle_vmgexit, is_snp_only_vmgexit);
    MISSING_INPUT in 7.1 (sev_es_validate_vmgexit)."""
    handler, ops, ghcb = make(kvm=kvm)
    ghcb.memory.write(GHCB_GPA + GhcbSave.sw_exit_code, code.to_bytes(8, "little"))  # value present, not valid
    handler.handle_vmgexit()
    assert answer(ghcb) == bad_input(INVALID_EVENT if kvm is REF else MISSING_INPUT)
    assert ops.exits == []


# ------------------------------------------------------------------------- AP creation
AP_REJECTED: list[tuple[str, int, int, dict[str, int]]] = [
    # (id, info1 = apic_id << 32 | request, info2 = VMSA GPA, valid fields)
    ("unknown_apic_id", (1 << 32) | 1, 0x5000, {"rax": 1}),
    ("unknown_apic_id_destroy", (0xFF << 32) | 2, 0, {}),
    ("bad_request_type", 3, 0x5000, {"rax": 1}),
    ("bad_request_type_high", 0xFFFF_FFFF, 0x5000, {"rax": 1}),
    ("sev_features_mismatch", 1, 0x5000, {"rax": 0}),
    ("vmsa_unaligned", 0, 0x5008, {"rax": 1}),
    ("vmsa_beyond_maxphyaddr", 1, 1 << 40, {"rax": 1}),
    ("vmsa_2m_aligned", 1, 0x20_0000, {"rax": 1}),
]


@pytest.mark.parametrize("kvm", KVM)
@pytest.mark.parametrize(("info1", "info2", "fields"), [c[1:] for c in AP_REJECTED], ids=[c[0] for c in AP_REJECTED])
def test_ap_creation_rejected_is_invalid_input(info1: int, info2: int, fields: dict[str, int], kvm: KvmVersion) -> None:
    """An AP creation request sev_snp_ap_creation() rejects with -EINVAL (unknown APIC ID: the VM has only vCPU 0;
    bad request type; RAX != vmsa_features; bad or 2M-aligned VMSA) is INVALID_INPUT and the guest runs on
    (sev.c, sev_handle_vmgexit SVM_VMGEXIT_AP_CREATION)."""
    handler, ops, ghcb = make(snp=True, kvm=kvm)
    request(ghcb, SwExitCode.SVM_VMGEXIT_AP_CREATION, info1, info2, **fields)
    handler.handle_vmgexit()
    assert answer(ghcb) == bad_input(INVALID_INPUT) == (2, 5)
    assert ops.exits == []


@pytest.mark.parametrize(("info1", "info2", "fields"), [(1, 0x5000, {"rax": 1}), (0, 0x20_1000, {"rax": 1}),
                                                         (2, 0, {})])
def test_ap_creation_kvm_accepts_is_not_modelled(info1: int, info2: int, fields: dict[str, int]) -> None:
    """A request KVM accepts (vCPU 0, SNP_ACTIVE in RAX, a usable VMSA; or DESTROY) would replace a VMSA: not
    modelled, an internal error naming it (sev.c, sev_snp_ap_creation)."""
    handler, ops, ghcb = make(snp=True)
    request(ghcb, SwExitCode.SVM_VMGEXIT_AP_CREATION, info1, info2, **fields)
    handler.handle_vmgexit()
    assert len(ops.exits) == 1
    exit_ = ops.exits[0]
    assert isinstance(exit_, InternalErrorExit) and "SVM_VMGEXIT_AP_CREATION" in exit_.detail


# ------------------------------------------------------------------------------- VMMCALL
def test_vmmcall_passes_registers_and_cpl() -> None:
    """VMMCALL dispatches RAX/RBX/RCX/RDX/RSI with the GHCB's CPL, result in RAX (sev.c, sev_es_sync_from_ghcb)."""
    handler, ops, ghcb = make()
    ops.hypercall_ret = (-1000) & ((1 << 64) - 1)
    request(ghcb, SwExitCode.SVM_EXIT_VMMCALL, rax=12, rbx=0x2000, rcx=3, rdx=0x10, rsi=9, cpl=3)
    handler.handle_vmgexit()
    assert ops.calls == [("hypercall", 12, 0x2000, 3, 0x10, 9, 3)]
    assert ghcb.get(GhcbSave.rax) == ops.hypercall_ret
    assert (ghcb.get(GhcbSave.rbx), ghcb.get(GhcbSave.rcx), ghcb.get(GhcbSave.rdx)) == (0x2000, 3, 0x10)
    assert answer(ghcb) == OK


def test_vmmcall_invalid_args_read_as_zero() -> None:
    """Arguments whose valid bit is clear reach the hypercall as 0 (sev.c, kvm_ghcb_get_*_if_valid)."""
    handler, ops, ghcb = make()
    request(ghcb, SwExitCode.SVM_EXIT_VMMCALL, rax=1, cpl=0)
    ghcb.memory.write(GHCB_GPA + GhcbSave.rsi, (0x99).to_bytes(8, "little"))
    handler.handle_vmgexit()
    assert ops.calls == [("hypercall", 1, 0, 0, 0, 0, 0)]


def test_vmmcall_result_arrives_with_completion() -> None:
    """A hypercall the VMM answers later writes RAX only when the vCPU resumes (sev.c, sev_es_unmap_ghcb)."""
    handler, ops, ghcb = make()
    ops.defer = True
    ops.hypercall_ret = 0
    request(ghcb, SwExitCode.SVM_EXIT_VMMCALL, rax=12, cpl=0)
    handler.handle_vmgexit()
    assert ghcb.get(GhcbSave.rax) == 12
    ops.resume()
    assert ghcb.get(GhcbSave.rax) == 0


# ---------------------------------------------------------------------------------- IOIO
def test_ioio_out() -> None:
    """OUT sends RAX truncated to the access size to the port (svm.c, io_interception; x86.c, kvm_fast_pio_out)."""
    handler, ops, ghcb = make()
    request(ghcb, SwExitCode.SVM_EXIT_IOIO, (0x3F8 << 16) | SZ16, 0, rax=0x1234_5678)
    handler.handle_vmgexit()
    assert ops.calls == [("pio", 0x3F8, 2, False, 0x5678)]
    assert answer(ghcb) == OK


@pytest.mark.parametrize(("size_bits", "size", "expected"), [(SZ8, 1, 0xAAAA_AAAA_AAAA_AA42),
                                                          (SZ16, 2, 0xAAAA_AAAA_AAAA_3342),
                                                          (SZ32, 4, 0x1133_3342)])
def test_ioio_in_merges_or_zero_extends(size_bits: int, size: int, expected: int) -> None:
    """IN merges into RAX below 4 bytes and zero-extends at 4 (x86.c, complete_fast_pio_in)."""
    handler, ops, ghcb = make()
    ops.pio_in_value = 0x1133_3342
    request(ghcb, SwExitCode.SVM_EXIT_IOIO, (0x60 << 16) | size_bits | IOIO_IN, 0, rax=0xAAAA_AAAA_AAAA_AAAA)
    handler.handle_vmgexit()
    assert ops.calls == [("pio", 0x60, size, True, 0)]
    assert ghcb.get(GhcbSave.rax) == expected


def test_ioio_in_without_rax_valid() -> None:
    """IN needs no RAX; the merge starts from 0 (sev.c, sev_es_validate_vmgexit)."""
    handler, ops, ghcb = make()
    ops.pio_in_value = 0xFF
    request(ghcb, SwExitCode.SVM_EXIT_IOIO, (0x60 << 16) | SZ8 | IOIO_IN, 0)
    handler.handle_vmgexit()
    assert ghcb.get(GhcbSave.rax) == 0xFF


def test_ioio_size_zero_does_nothing() -> None:
    """IOIO with no size bit resumes the guest with no port access (sev.c, sev_handle_vmgexit SVM_EXIT_IOIO)."""
    handler, ops, ghcb = make()
    request(ghcb, SwExitCode.SVM_EXIT_IOIO, 0x60 << 16, 0, rax=1)
    handler.handle_vmgexit()
    assert ops.calls == [] and answer(ghcb) == OK


def test_ioio_malformed_size_is_used_as_number() -> None:
    """A malformed one-hot size (3) is used as a 3-byte access, as KVM does (svm.c, io_interception)."""
    handler, ops, ghcb = make()
    request(ghcb, SwExitCode.SVM_EXIT_IOIO, (0x80 << 16) | (3 << 4), 0, rax=0xFFFF_FFFF)
    handler.handle_vmgexit()
    assert ops.calls == [("pio", 0x80, 3, False, 0xFF_FFFF)]


def test_string_out_from_shared_buffer() -> None:
    """String OUT sends count x size scratch bytes in one exit (sev.c, sev_es_string_io; x86.c, kvm_sev_es_outs)."""
    handler, ops, ghcb = make()
    ops.memory.write(SHARED + 0x10, bytes(range(1, 9)))
    request(ghcb, SwExitCode.SVM_EXIT_IOIO, (0x3F8 << 16) | SZ16 | IOIO_STR, 4, sw_scratch=SHARED + 0x10)
    handler.handle_vmgexit()
    assert ops.exits == [IoOutExit(2, 0x3F8, 4, bytes(range(1, 9)))]
    assert answer(ghcb) == OK


def test_string_in_into_shared_buffer() -> None:
    """String IN lands in the scratch area in the GHCB (x86.c, complete_sev_es_emulated_ins)."""
    handler, ops, ghcb = make()
    ops.in_fill = b"abcdef"
    request(ghcb, SwExitCode.SVM_EXIT_IOIO, (0x60 << 16) | SZ8 | IOIO_STR | IOIO_IN, 6, sw_scratch=SHARED)
    handler.handle_vmgexit()
    assert len(ops.exits) == 1
    exit_ = ops.exits[0]
    assert isinstance(exit_, IoExit) and (exit_.direction, exit_.count) == (KVM_EXIT_IO_IN, 6)
    assert ops.memory.read(SHARED, 6) == b"abcdef"


def test_string_io_count_zero_does_nothing() -> None:
    """A zero-count string I/O resumes without an exit (sev.c, sev_es_string_io)."""
    handler, ops, ghcb = make()
    request(ghcb, SwExitCode.SVM_EXIT_IOIO, (0x60 << 16) | SZ8 | IOIO_STR, 0, sw_scratch=SHARED)
    handler.handle_vmgexit()
    assert ops.exits == [] and answer(ghcb) == OK


@pytest.mark.parametrize(("scratch", "count"), [
    (0, 1),  # no scratch GPA
    (GHCB_GPA + 0x10, 1),  # in the GHCB but before the shared buffer
    (GHCB_GPA + 0xFF0 - 4, 8),  # runs past the shared buffer
    (GHCB_GPA + 0x2000, 1),  # outside the GHCB with GHCB v2
    ((1 << 64) - 4, 8),  # wraps
])
def test_scratch_area_rules(scratch: int, count: int) -> None:
    """The scratch area must be set and, for v2, lie in the GHCB shared buffer (sev.c, setup_vmgexit_scratch)."""
    handler, ops, ghcb = make()
    request(ghcb, SwExitCode.SVM_EXIT_IOIO, (0x60 << 16) | SZ8 | IOIO_STR, count, sw_scratch=scratch)
    handler.handle_vmgexit()
    assert answer(ghcb) == bad_input(GhcbErr.GHCB_ERR_INVALID_SCRATCH_AREA)
    assert ops.exits == []


def test_scratch_may_end_exactly_at_buffer_end() -> None:
    """A scratch area ending at offset 0xFF0 is accepted (sev.c, setup_vmgexit_scratch)."""
    handler, ops, ghcb = make()
    request(ghcb, SwExitCode.SVM_EXIT_IOIO, (0x60 << 16) | SZ8 | IOIO_STR, 4, sw_scratch=GHCB_GPA + 0xFF0 - 4)
    handler.handle_vmgexit()
    assert len(ops.exits) == 1 and answer(ghcb) == OK


def test_v1_scratch_outside_ghcb_is_copied_and_split() -> None:
    """A v1 scratch area outside the GHCB moves a page per exit and is written back (x86.c, kvm_sev_es_ins)."""
    handler, ops, ghcb = make(version=1)
    ops.in_fill = b"\x5a" * 4096
    request(ghcb, SwExitCode.SVM_EXIT_IOIO, (0x60 << 16) | SZ8 | IOIO_STR | IOIO_IN, 5000, sw_scratch=0x8000)
    handler.handle_vmgexit()
    assert [(e.count, len(e.data)) for e in ops.exits if isinstance(e, IoExit)] == [(4096, 4096), (904, 904)]
    assert ops.memory.read(0x8000, 5000) == b"\x5a" * 5000


def test_v1_scratch_out_reads_guest_memory() -> None:
    """String OUT with a v1 scratch area outside the GHCB reads guest memory (sev.c, setup_vmgexit_scratch)."""
    handler, ops, ghcb = make(version=1)
    ops.memory.write(0x9000, b"hello")
    request(ghcb, SwExitCode.SVM_EXIT_IOIO, (0x3F8 << 16) | SZ8 | IOIO_STR, 5, sw_scratch=0x9000)
    handler.handle_vmgexit()
    assert ops.exits == [IoOutExit(1, 0x3F8, 5, b"hello")]


def test_v1_scratch_limit() -> None:
    """A v1 scratch area outside the GHCB is limited to 16 pages (sev.c, GHCB_SCRATCH_AREA_LIMIT)."""
    handler, _, ghcb = make(version=1)
    request(ghcb, SwExitCode.SVM_EXIT_IOIO, (0x60 << 16) | SZ8 | IOIO_STR, 16 * 4096 + 1, sw_scratch=0x4000)
    handler.handle_vmgexit()
    assert answer(ghcb) == bad_input(GhcbErr.GHCB_ERR_INVALID_SCRATCH_AREA)


def test_v1_scratch_outside_memory_is_fatal() -> None:
    """A v1 scratch area KVM cannot read fails KVM_RUN with -EFAULT (sev.c, setup_vmgexit_scratch)."""
    handler, _, ghcb = make(version=1)
    request(ghcb, SwExitCode.SVM_EXIT_IOIO, (0x60 << 16) | SZ8 | IOIO_STR, 16, sw_scratch=MEM_SIZE - 8)
    with pytest.raises(SevFatalError) as err:
        handler.handle_vmgexit()
    assert err.value.errno == errno.EFAULT


def test_string_io_huge_count_is_fatal() -> None:
    """A string I/O count above INT_MAX fails KVM_RUN (sev.c, sev_es_string_io)."""
    handler, _, ghcb = make()
    request(ghcb, SwExitCode.SVM_EXIT_IOIO, (0x60 << 16) | SZ8 | IOIO_STR, 1 << 31, sw_scratch=SHARED)
    with pytest.raises(SevFatalError):
        handler.handle_vmgexit()
    request(ghcb, SwExitCode.SVM_EXIT_IOIO, (0x60 << 16) | SZ32 | IOIO_STR, 1 << 30, sw_scratch=SHARED)
    with pytest.raises(SevFatalError) as err:
        handler.handle_vmgexit()
    assert err.value.errno == errno.EINVAL


# ----------------------------------------------------------------------------------- MSR
def test_rdmsr() -> None:
    """RDMSR returns the value split into EAX/EDX (svm.c, msr_interception; x86.c, kvm_emulate_rdmsr)."""
    handler, ops, ghcb = make()
    ops.msr_value = 0x1122_3344_5566_7788
    request(ghcb, SwExitCode.SVM_EXIT_MSR, 0, 0, rcx=(1 << 32) | 0xC000_0080)
    handler.handle_vmgexit()
    assert ops.calls == [("msr", 0xC000_0080, False, 0)]
    assert (ghcb.get(GhcbSave.rax), ghcb.get(GhcbSave.rdx)) == (0x5566_7788, 0x1122_3344)
    assert answer(ghcb) == OK


def test_wrmsr() -> None:
    """WRMSR combines EDX:EAX (any non-zero EXITINFO1 is a write) (svm.c, msr_interception)."""
    handler, ops, ghcb = make()
    request(ghcb, SwExitCode.SVM_EXIT_MSR, 5, 0, rcx=0x10, rax=0xFFFF_FFFF_0000_0001, rdx=0xFFFF_FFFF_0000_0002)
    handler.handle_vmgexit()
    assert ops.calls == [("msr", 0x10, True, 0x2_0000_0001)]
    assert answer(ghcb) == OK


def test_msr_refused_issues_gp() -> None:
    """A refused MSR access answers "issue exception" #GP in the GHCB (svm.c, svm_complete_emulated_msr)."""
    handler, ops, ghcb = make()
    ops.msr_ok = False
    request(ghcb, SwExitCode.SVM_EXIT_MSR, 0, 0, rcx=0x1234)
    handler.handle_vmgexit()
    assert answer(ghcb) == (GhcbHvResp.GHCB_HV_RESP_ISSUE_EXCEPTION, GP_EVENT)


# --------------------------------------------------------------------------------- CPUID
def test_cpuid() -> None:
    """CPUID takes EAX/ECX (32-bit) and returns four 32-bit registers (x86.c, kvm_emulate_cpuid)."""
    handler, ops, ghcb = make()
    ops.cpuid_table[(0x8000001F, 2)] = (1, 2, 3, 4)
    request(ghcb, SwExitCode.SVM_EXIT_CPUID, rax=(7 << 32) | 0x8000001F, rcx=2)
    handler.handle_vmgexit()
    assert ops.calls == [("cpuid", 0x8000001F, 2)]
    assert [ghcb.get(f) for f in (GhcbSave.rax, GhcbSave.rbx, GhcbSave.rcx, GhcbSave.rdx)] == [1, 2, 3, 4]


def test_cpuid_leaf_0xd_records_xcr0() -> None:
    """CPUID leaf 0xD needs XCR0, which KVM loads from the GHCB (sev.c, sev_es_sync_from_ghcb)."""
    handler, ops, ghcb = make()
    request(ghcb, SwExitCode.SVM_EXIT_CPUID, rax=0xD, rcx=1, xcr0=7, xss=0x100)
    handler.handle_vmgexit()
    assert ops.calls == [("cpuid", 0xD, 1)]
    assert (handler.state.xcr0, handler.state.xss) == (7, 0x100)


# ------------------------------------------------------------------ software-defined events
def test_ap_jump_table_set_and_get() -> None:
    """AP_JUMP_TABLE 0 stores the address and 1 returns it in EXITINFO2 (sev.c, SVM_VMGEXIT_AP_JUMP_TABLE)."""
    handler, _, ghcb = make()
    request(ghcb, SwExitCode.SVM_VMGEXIT_AP_JUMP_TABLE, 0, 0xF000)
    handler.handle_vmgexit()
    assert answer(ghcb) == OK and handler.state.ap_jump_table == 0xF000
    request(ghcb, SwExitCode.SVM_VMGEXIT_AP_JUMP_TABLE, 1, 0)
    handler.handle_vmgexit()
    assert answer(ghcb) == (0, 0xF000)


def test_ap_jump_table_bad_request() -> None:
    """Any other AP_JUMP_TABLE request is INVALID_INPUT (sev.c, SVM_VMGEXIT_AP_JUMP_TABLE)."""
    handler, _, ghcb = make()
    request(ghcb, SwExitCode.SVM_VMGEXIT_AP_JUMP_TABLE, 2, 0)
    handler.handle_vmgexit()
    assert answer(ghcb) == bad_input(GhcbErr.GHCB_ERR_INVALID_INPUT)


def test_hv_features() -> None:
    """HV_FEATURES returns GHCB_HV_FT_SUPPORTED in EXITINFO2 (sev.c, SVM_VMGEXIT_HV_FEATURES)."""
    handler, _, ghcb = make()
    request(ghcb, SwExitCode.SVM_VMGEXIT_HV_FEATURES)
    handler.handle_vmgexit()
    assert answer(ghcb) == (0, 0x3)


def test_term_request() -> None:
    """TERM_REQUEST exits SEV_TERM with data[0] = the GHCB GPA (sev.c, SVM_VMGEXIT_TERM_REQUEST)."""
    handler, ops, ghcb = make()
    request(ghcb, SwExitCode.SVM_VMGEXIT_TERM_REQUEST, svm_vmgexit_term_reason(1, 4), 0)
    handler.handle_vmgexit()
    assert ops.exits == [SystemEventExit(KVM_SYSTEM_EVENT_SEV_TERM, (GHCB_GPA,))]


@pytest.mark.parametrize("kvm", KVM)
def test_unsupported_event_is_fatal(kvm: KvmVersion) -> None:
    """UNSUPPORTED_EVENT fails KVM_RUN with -EINVAL (sev.c, sev_handle_vmgexit SVM_VMGEXIT_UNSUPPORTED_EVENT)."""
    handler, ops, ghcb = make(kvm=kvm)
    request(ghcb, SwExitCode.SVM_VMGEXIT_UNSUPPORTED_EVENT, 0x41, 0)
    with pytest.raises(SevFatalError, match="unsupported event") as err:
        handler.handle_vmgexit()
    assert err.value.errno == errno.EINVAL and ops.exits == []


@pytest.mark.parametrize(("code", "fields"), [
    (SwExitCode.SVM_EXIT_READ_DR7, {}), (SwExitCode.SVM_EXIT_WRITE_DR7, {"rax": 0x400}),
    (SwExitCode.SVM_EXIT_INVD, {}), (SwExitCode.SVM_EXIT_WBINVD, {}),
    (SwExitCode.SVM_EXIT_MONITOR, {"rax": 0, "rcx": 0, "rdx": 0}), (SwExitCode.SVM_EXIT_MWAIT, {"rax": 0, "rcx": 0}),
    (SwExitCode.SVM_VMGEXIT_NMI_COMPLETE, {}),
])
def test_no_op_exits(code: int, fields: dict[str, int]) -> None:
    """DR7, INVD, WBINVD, MONITOR/MWAIT and NMI_COMPLETE succeed with no user exit (svm.c, dr_interception; x86.c)."""
    handler, ops, ghcb = make()
    request(ghcb, code, **fields)
    handler.handle_vmgexit()
    assert answer(ghcb) == OK and ops.exits == [] and ops.calls == []


def test_rdtsc_is_unexpected_exit() -> None:
    """RDTSC has no SVM exit handler: an internal error, unexpected exit reason, with the exit code
    and the last vCPU entry's CPU as its data (svm.c, svm_handle_invalid_exit)."""
    handler, ops, ghcb = make()
    request(ghcb, SwExitCode.SVM_EXIT_RDTSC)
    handler.handle_vmgexit()
    assert len(ops.exits) == 1
    exit_ = ops.exits[0]
    assert isinstance(exit_, InternalErrorExit) and exit_.suberror == KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON
    # run->internal.ndata = 2: the exit code and last_vmentry_cpu (one pCPU here: 0)
    assert exit_.data == (SwExitCode.SVM_EXIT_RDTSC, 0)


@pytest.mark.parametrize(("snp", "code", "info1", "info2", "fields"), [
    (False, SwExitCode.SVM_EXIT_RDPMC, 0, 0, {"rcx": 0}),
    (False, SwExitCode.SVM_EXIT_RDTSCP, 0, 0, {}),
    (True, SwExitCode.SVM_VMGEXIT_GUEST_REQUEST, 0x5000, 0x6000, {}),
    (True, SwExitCode.SVM_VMGEXIT_AP_CREATION, 2, 0, {}),
    (False, SwExitCode.SVM_VMGEXIT_MMIO_WRITE, 0xFED0_0000, 4, {"sw_scratch": SHARED}),
])
def test_unmodelled_exits_report_internal_error(snp: bool, code: int, info1: int, info2: int,
                                                fields: dict[str, int]) -> None:
    """Valid requests the testbed does not model end in an internal error naming them (sev.c, sev_handle_vmgexit)."""
    handler, ops, ghcb = make(snp=snp)
    request(ghcb, code, info1, info2, **fields)
    handler.handle_vmgexit()
    assert len(ops.exits) == 1
    exit_ = ops.exits[0]
    assert isinstance(exit_, InternalErrorExit) and exit_.suberror == KVM_INTERNAL_ERROR_EMULATION
    assert SwExitCode(code).name in exit_.detail


def test_mmio_checks_before_the_exit() -> None:
    """MMIO: length 0 does nothing, v2 length > 8 is INVALID_INPUT (sev.c, SVM_VMGEXIT_MMIO_READ)."""
    handler, ops, ghcb = make()
    request(ghcb, SwExitCode.SVM_VMGEXIT_MMIO_READ, 0xFED0_0000, 0, sw_scratch=SHARED)
    handler.handle_vmgexit()
    assert answer(ghcb) == OK
    request(ghcb, SwExitCode.SVM_VMGEXIT_MMIO_READ, 0xFED0_0000, 9, sw_scratch=SHARED)
    handler.handle_vmgexit()
    assert answer(ghcb) == bad_input(GhcbErr.GHCB_ERR_INVALID_INPUT)
    assert ops.exits == []


@pytest.mark.parametrize("kvm", KVM)
def test_ap_hlt_loop_exits_ap_reset_hold(kvm: KvmVersion) -> None:
    """AP_HLT_LOOP parks the vCPU: KVM_EXIT_AP_RESET_HOLD (32), not HLT, without an in-kernel LAPIC
    (sev.c sev_handle_vmgexit; x86.c kvm_emulate_ap_reset_hold)."""
    handler, ops, ghcb = make(kvm=kvm)
    request(ghcb, SwExitCode.SVM_VMGEXIT_AP_HLT_LOOP)
    handler.handle_vmgexit()
    assert ops.exits == [ApResetHoldExit()]
    assert answer(ghcb) == OK


def test_tracer_records_vmgexit() -> None:
    """With tracing on, the VMGEXIT and its answer are traced as kvm events (testbed/trace.py)."""
    events: list[dict[str, Any]] = []
    ops = FakeOps()
    handler = SevEsHandler(SevState(msr=GhcbMsrRegister(GHCB_GPA)), ops, Tracer(sink=events.append))
    request(Ghcb(ops.memory, GHCB_GPA), SwExitCode.SVM_VMGEXIT_HV_FEATURES)
    handler.handle_vmgexit()
    assert [e["event"] for e in events] == ["vmgexit", "vmgexit_done"]
    assert events[1]["info2"] == 3


def _guest_value(rng: random.Random) -> int:
    """A value a hostile guest might write: small, huge, or pointing into the GHCB or memory."""
    return rng.choice([rng.randrange(16), rng.getrandbits(64), rng.randrange(SHARED, GHCB_GPA + 0x1000),
                       rng.randrange(MEM_SIZE)])


SW_BITS = sum(1 << ghcb_bitmap_idx(f) for f in (GhcbSave.sw_exit_code, GhcbSave.sw_exit_info_1,
                                                 GhcbSave.sw_exit_info_2))
#: The exit codes sev_handle_vmgexit()'s switch handles (the same set 7.1's sev_es_validate_vmgexit lists).
KNOWN_CODES = frozenset(SwExitCode) - {SwExitCode.SVM_EXIT_NPF, SwExitCode.SVM_EXIT_VMGEXIT,
                                       SwExitCode.SVM_VMGEXIT_SNP_RUN_VMPL, SwExitCode.SVM_VMGEXIT_SAVIC}
#: The exit codes whose handler can return -errno (KVM_RUN fails): sev_handle_vmgexit's UNSUPPORTED_EVENT,
#: sev_es_string_io (count > INT_MAX, v1 scratch unreadable), MMIO's v1 scratch read.
FATAL_CODES = frozenset({SwExitCode.SVM_VMGEXIT_UNSUPPORTED_EVENT, SwExitCode.SVM_EXIT_IOIO,
                         SwExitCode.SVM_VMGEXIT_MMIO_READ, SwExitCode.SVM_VMGEXIT_MMIO_WRITE})


def front_door(snp: bool, registered: bool, kvm: KvmVersion, usage: int, bitmap: int,
               code: int) -> tuple[int, int] | None:
    """KVM's answer before the exit code's own handler runs, re-stated from sev.c sev_handle_vmgexit (reference)
    and sev_es_validate_vmgexit (7.1): (SW_EXITINFO1, SW_EXITINFO2), or None when the handler runs."""
    if snp and not registered:
        return (2, GhcbErr.GHCB_ERR_NOT_REGISTERED)  # 7.1 raises instead (checked by the caller)
    if usage:
        return (2, GhcbErr.GHCB_ERR_INVALID_USAGE)
    if kvm is REF and code in SNP_ONLY_VMGEXITS and not snp:
        return (2, GhcbErr.GHCB_ERR_INVALID_EVENT)
    if bitmap & SW_BITS != SW_BITS:
        return (2, GhcbErr.GHCB_ERR_MISSING_INPUT)
    if code not in KNOWN_CODES:
        return (2, GhcbErr.GHCB_ERR_INVALID_EVENT)
    return None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snp=st.booleans(), v1=st.booleans(), defer=st.booleans(), seed=st.integers(0, 2**32),
       code=st.one_of(*[st.sampled_from(list(SwExitCode))] * 4, st.integers(0, (1 << 64) - 1)),
       bitmap=st.integers(0, (1 << 128) - 1), sw_valid=st.sampled_from([True, True, False]),
       usage=st.sampled_from([0] * 8 + [1, 0xFFFF]),
       msr=st.one_of(*[st.just(GHCB_GPA)] * 3, st.integers(0, (1 << 64) - 1)),
       registered=st.sampled_from([True] * 5 + [False]), kvm=st.sampled_from(KVM))
# The MSR naming a page other than the registered GHCB (found by Hypothesis): (2, 1) on SNP, or 7.1's EINVAL.
@example(snp=True, v1=False, defer=False, seed=0, code=0x27, bitmap=0, sw_valid=True, usage=0, msr=0x1000,
         registered=True, kvm=REF)
@example(snp=True, v1=False, defer=False, seed=0, code=0x27, bitmap=0, sw_valid=True, usage=0, msr=0x1000,
         registered=True, kvm=V7_1)
@example(snp=False, v1=False, defer=False, seed=0, code=0x27, bitmap=0, sw_valid=True, usage=0, msr=0x1000,
         registered=True, kvm=REF)
def test_hostile_ghcb_is_answered_as_kvm_answers(snp: bool, v1: bool, defer: bool, seed: int, code: int,
                                                 bitmap: int, sw_valid: bool, usage: int, msr: int,
                                                 registered: bool, kvm: KvmVersion) -> None:
    """Whatever the guest writes in the GHCB or MSR, KVM's front-door answer is as sev_handle_vmgexit() gives it,
    any other answer is a well-formed return status, and only KVM's own failures raise (sev.c)."""
    rng = random.Random(seed)
    handler, ops, ghcb = make(snp=snp, version=1 if v1 and not snp else 2, register=registered, kvm=kvm)
    ops.defer = defer
    ops.hypercall_ret, ops.pio_in_value, ops.msr_value = (rng.getrandbits(64) for _ in range(3))
    ops.msr_ok = rng.random() < 0.5
    ops.in_fill = rng.randbytes(rng.randrange(64))
    for f in GhcbSave:
        ghcb.set(f, _guest_value(rng))
    ghcb.set(GhcbSave.sw_exit_code, code)
    ghcb.valid_bitmap = bitmap | (SW_BITS if sw_valid else 0)
    ghcb.ghcb_usage = usage
    ops.memory.write(SHARED, rng.randbytes(rng.randrange(256)))  # e.g. a PSC buffer
    handler.state.ghcb_msr = msr
    before = bytes(ops.memory.data)
    page_protocol = not msr & 0xFFF and msr and msr + 0x1000 <= MEM_SIZE
    # The GHCB KVM reads is the page the MSR names, which may not be the one set up above: then its
    # fields are whatever that page holds, and on SNP it is not the registered GHCB.
    target = Ghcb(ops.memory, msr) if page_protocol else ghcb
    code = target.get(GhcbSave.sw_exit_code)
    unregistered = snp and (not registered or msr != GHCB_GPA)
    expected = (front_door(snp, not unregistered, kvm, target.ghcb_usage, target.valid_bitmap, code)
                if page_protocol else None)
    try:
        handler.handle_vmgexit()
        ops.resume()
    except SevFatalError as err:
        # KVM_RUN fails only where sev.c returns -errno.
        assert page_protocol, f"MSR protocol 0x{msr:x} must not fail KVM_RUN"
        if unregistered:
            assert kvm is V7_1 and err.errno == errno.EINVAL
        else:
            assert expected is None and code in FATAL_CODES, f"code 0x{code:x}: {err}"
        return
    if not page_protocol:  # the MSR protocol, no GHCB, or one KVM cannot map: no memory is touched
        assert bytes(ops.memory.data) == before
        return
    assert not (unregistered and kvm is V7_1), "7.1 fails KVM_RUN for an unregistered GHCB"
    info1, info2 = answer(target)
    if expected is not None:
        assert (info1, info2) == expected
        assert ops.exits == [] and ops.calls == []
    else:
        assert info1 in (0, 1, 2), f"code 0x{code:x}: SW_EXITINFO1 0x{info1:x}"
        if info1 == 2:
            assert info2 in {int(e) for e in GhcbErr}, f"code 0x{code:x}: SW_EXITINFO2 0x{info2:x}"
