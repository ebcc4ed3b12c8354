"""SEV-ES and SEV-SNP end to end: #VC, the GHCB protocols, PSC, the RMP and PVALIDATE.

Guests run with the real runtime (guests/lib/sev.s): CPUID, port I/O, MSRs and VMMCALL go
through #VC and the GHCB; SNP guests validate their memory and convert pages with Page State
Change requests that KVM turns into KVM_HC_MAP_GPA_RANGE user exits.
"""

from __future__ import annotations

import errno

import pytest

from testbed.api import Vm
from testbed.errors import GuestMemoryError, UsageError
from testbed.kvm.msr import KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_INVAL
from testbed.kvm.uapi import RdmsrExit, WrmsrExit
from testbed.layout import RT_GHCB, UCALL_GPA, Layout
from testbed.machine import GUESTS_DIR, Machine, VmOptions, build_program
from testbed.vmm.vmm import RunReport

MEM = 8 << 20  # an SNP guest validates all of it at boot: a small one boots faster
FREE = Layout(MEM).free_gpa
ES_TYPES = ["sev-es", "sev-snp"]


def run_file(name: str, vm_type: str, **kw: object) -> RunReport:
    options = VmOptions(vm_type=vm_type, memory=MEM, seed=5, **kw)  # type: ignore[arg-type]
    return Machine(build_program(GUESTS_DIR / name, options), options).run()


def run_text(text: str, vm_type: str, **kw: object) -> tuple[Machine, RunReport]:
    kw.setdefault("memory", MEM)
    options = VmOptions(vm_type=vm_type, seed=5, **kw)  # type: ignore[arg-type]
    machine = Machine(build_program("<test>", options, text=text), options)
    return machine, machine.run()


DETECT = """
guest_main:
    mov eax, 0x8000001f
    cpuid
    GUEST_SYNC rax
    GUEST_SYNC rbx
    mov ecx, 0xc0010131
    rdmsr
    GUEST_SYNC rax
    ret
"""


@pytest.mark.parametrize(
    ("vm_type", "eax_bits", "status"),
    [("sev", 0b00010, 0b001), ("sev-es", 0b01010, 0b011), ("sev-snp", 0b11010, 0b111)],
)
def test_cpuid_and_sev_status_report_the_vm_type(vm_type: str, eax_bits: int, status: int) -> None:
    """CPUID 0x8000001F (via #VC on SEV-ES/SNP) and SEV_STATUS show SEV, SEV-ES, SNP as the hardware does."""
    _, report = run_text(DETECT, vm_type)
    assert report.outcome == "done", report.detail
    eax, ebx, sev_status = report.syncs()
    assert eax & 0b11010 == eax_bits, hex(eax)
    assert ebx & 0x3F == 51
    assert sev_status == status


@pytest.mark.parametrize("vm_type", ES_TYPES)
@pytest.mark.parametrize(("insn", "outcome"), [(0, "unhandled_exception"), (1, "done"), (2, "done")])
def test_hypercall_guests_pass_through_vc_and_the_ghcb(vm_type: str, insn: int, outcome: str) -> None:
    """VMMCALL and KVM_HYPERCALL work through #VC + GHCB; VMCALL is #UD on AMD, as under plain SEV."""
    report = run_file("hypercall_insn.s", vm_type, defines={"INSN": insn})
    assert report.outcome == outcome, report.detail
    if outcome == "done":
        assert report.syncs() == [0]
    else:
        assert report.exception is not None and report.exception["vector"] == 6


@pytest.mark.parametrize("vm_type", ES_TYPES)
def test_termination_request_ends_the_run(vm_type: str) -> None:
    """sev_smoke_test's pattern: GHCB_MSR_TERM_REQ -> KVM_SYSTEM_EVENT_SEV_TERM -> outcome terminated."""
    report = run_file("sev_terminate.s", vm_type, defines={"SET": 1, "CODE": 5})
    assert report.outcome == "terminated"
    assert report.termination == {"reason_set": 1, "reason_code": 5}
    assert report.syncs() == []  # nothing after the request ran
    events = [e for e in report.user_exits if e["reason"] == "system_event"]
    assert events == [{"reason": "system_event", "type": 6, "data": [0x51100]}]


def test_ghcb_msr_is_preloaded_with_sev_information_at_reset() -> None:
    """sev_es_init_vmcb(): GHCB MSR = SEV info response (max 2, min 1, C-bit 51, code 0x001)."""
    options = VmOptions(vm_type="sev-es", memory=MEM)
    machine = Machine(build_program(GUESTS_DIR / "hypercall_insn.s", options), options)
    assert machine.cpu.ghcb_msr == (2 << 48) | (1 << 32) | (51 << 24) | 0x001


def test_snp_registers_and_shares_its_ghcb() -> None:
    """The SNP runtime registers its GHCB and converts it (and the ucall page) to shared by PSC."""
    report = run_file("hypercall_insn.s", "sev-snp")
    assert report.outcome == "done", report.detail
    assert report.shared_ranges == [[UCALL_GPA >> 12, 1], [RT_GHCB >> 12, 1]]
    psc = [e for e in report.user_exits if e["reason"] == "hypercall"]
    assert [e["args"][:3] for e in psc] == [[RT_GHCB, 1, 0], [UCALL_GPA, 1, 0]]


@pytest.mark.parametrize(
    ("scenario", "info1", "info2"),
    [
        (0, 2, 2),  # usage != 0 -> INVALID_USAGE
        (1, 2, 4),  # missing RAX/RCX -> MISSING_INPUT
        (2, 2, 6),  # unknown exit code -> INVALID_EVENT
        (3, 0, 0x1_0000_0001),  # PSC end_entry >= max -> INVALID_HDR
        (4, 0, 0x1_0000_0002),  # PSC misaligned 2M GFN -> INVALID_ENTRY
        (5, 0, 0),  # cur_entry > end_entry: nothing to do
        (6, 2, 3),  # scratch outside the shared buffer -> INVALID_SCRATCH_AREA
        (7, 0x600D, 0x600D),  # GHCB outside memory: KVM resumes the guest untouched
        (10, 0, 0x100_0000_0000),  # PSC to private beyond guest memory: the VMM refuses -> GENERIC
    ],
)
def test_hostile_ghcb_requests_are_answered_as_kvm_does(scenario: int, info1: int, info2: int) -> None:
    """Malformed GHCB requests get KVM's malformed-input or PSC error answers, never a host crash."""
    report = run_file("ghcb_hostile.s", "sev-snp", defines={"SCENARIO": scenario})
    assert report.outcome == "done", report.detail
    assert report.syncs() == [info1, info2]


@pytest.mark.parametrize(("op", "direction", "private_access"), [(2, False, False), (1, True, True)])
def test_guest_checking_only_exitinfo1_is_caught(op: int, direction: bool, private_access: bool) -> None:
    """A refused PSC reported in SW_EXITINFO2 only: the buggy guest is caught at its next access or PVALIDATE."""
    report = run_file("psc_exitinfo1_only.s", "sev-snp", defines={"OP": op},
                      refuse_conversions=[(FREE, 1, direction)])
    assert report.outcome == "memory_fault", report.detail
    assert report.syncs() == [0x100_0000_0000]  # VMGEXIT_PSC_ERROR_GENERIC, which it ignored
    fault = report.user_exits[-1]
    assert fault["reason"] == "memory_fault" and fault["gpa"] == FREE
    assert bool(fault["flags"] & 8) is private_access


def test_correct_runtime_reports_a_refused_psc() -> None:
    """set_memory_shared checks SW_EXITINFO2 and returns -EINVAL when the VMM refuses."""
    text = """
guest_main:
    mov rdi, GUEST_FREE_GPA
    mov rsi, 1
    call set_memory_shared
    GUEST_SYNC rax
    ret
"""
    _, report = run_text(text, "sev-snp", refuse_conversions=[(FREE, 1, None)])
    assert report.outcome == "done", report.detail
    assert report.syncs() == [(-22) & (2**64 - 1)]


PVALIDATE = """
.macro PVALIDATE_AT gpa, size, validate
    mov rax, \\gpa
    mov ecx, \\size
    mov edx, \\validate
    .byte 0xf2, 0x0f, 0x01, 0xff
    setc bl
    movzx rbx, bl
    GUEST_SYNC rax
    GUEST_SYNC rbx
.endm
guest_main:
    PVALIDATE_AT GUEST_FREE_GPA, 0, 1          # already validated at boot: EAX 0, CF 1
    PVALIDATE_AT GUEST_FREE_GPA, 0, 0          # rescind: EAX 0, CF 0
    PVALIDATE_AT GUEST_FREE_GPA, 0, 0          # again: EAX 0, CF 1
    PVALIDATE_AT GUEST_FREE_GPA, 1, 1          # 2M against 4K RMP entries: FAIL_SIZEMISMATCH
    PVALIDATE_AT GUEST_FREE_GPA + 0x1000, 1, 1 # 2M on a misaligned address: FAIL_INPUT
    mov rdi, GUEST_FREE_GPA
    mov rax, qword ptr [rdi]                   # private access to an unvalidated page: #VC 0x404
    ret
"""


def test_pvalidate_results_and_vc_404() -> None:
    """PVALIDATE's EAX/CF per APM (RAX/RCX/RDX as the exit saved them); a private access to an
    unvalidated page raises #VC 0x404."""
    machine, report = run_text(PVALIDATE, "sev-snp")
    assert machine.cpu.rmp is not None and not machine.cpu.rmp.validated[FREE >> 12]
    assert report.syncs() == [0, 1, 0, 0, 0, 1, 6, 0, 1, 0]
    assert report.outcome == "unhandled_exception"
    assert report.exception is not None
    assert (report.exception["vector"], report.exception["error_code"]) == (29, 0x404)


def test_host_cannot_write_a_guest_private_page() -> None:
    """SNP private memory is guest_memfd: a host write is refused (not mappable), KVM's write
    through the memslot's userspace mapping (kvm_write_guest) lands in the VMM's own page,
    and the guest's data is intact either way."""
    text = """
guest_main:
    mov rdi, GUEST_FREE_GPA
    mov qword ptr [rdi], 0x1234
    ret
"""
    machine, report = run_text(text, "sev-snp")
    assert report.outcome == "done", report.detail
    before = machine.memory.cpu_read(FREE, 8, private=True)
    with pytest.raises(GuestMemoryError, match="not mappable by the host"):
        machine.memory.host_write(FREE, b"\xff" * 8)
    machine.memory.userspace_view().write(FREE, b"\xee" * 8)
    assert machine.memory.userspace_view().read(FREE, 8) == b"\xee" * 8
    assert machine.memory.cpu_read(FREE, 8, private=True) == before == (0x1234).to_bytes(8, "little")
    # A shared page (the ucall page) is the host's to write.
    machine.memory.host_write(UCALL_GPA, b"\x00" * 8)


def test_unknown_msr_through_ghcb_is_gp() -> None:
    """RDMSR of an MSR KVM does not know: #VC, GHCB MSR exit, KVM answers #GP(0) (svm.c
    svm_complete_emulated_msr), which the guest reports at the RDMSR."""
    _, report = run_text("guest_main:\n    mov ecx, 0x12345\n    rdmsr\n    ret\n", "sev-es")
    assert report.outcome == "unhandled_exception", report.detail
    assert report.exception is not None
    # #GP(0) at the RDMSR itself (line 3), not after it: svm_complete_emulated_msr() injects it.
    assert ({k: report.exception[k] for k in ("vector", "error_code", "line")}) == {"vector": 13, "error_code": 0,
                                                                                   "line": 3}


AP_CREATE = """
guest_main:
    call rt_ghcb_clear
    mov rbx, 1                      # RAX = SVM_SEV_FEAT_SNP_ACTIVE: the VM's vmsa_features
    GHCB_SET GHCB_RAX, rbx
    mov rdi, 0x80000013             # SVM_VMGEXIT_AP_CREATION
    mov rsi, 1                      # APIC ID 0 (this vCPU), request AP_CREATE
    mov rdx, 0x5000                 # VMSA GPA: page aligned, not 2M aligned, below 2^36
    call rt_ghcb_exit
    ret
"""


@pytest.mark.parametrize("leaf", [True, False], ids=["leaf", "no-leaf"])
def test_ap_creation_checks_the_vmsa_gpa_against_maxphyaddr(leaf: bool) -> None:
    """page_address_valid() checks the VMSA GPA against the guest's MAXPHYADDR: CPUID
    0x80000008.EAX[7:0] (48, as the VMM sets it) or, when the VMM's table has no such leaf, 36
    (cpuid.c cpuid_query_maxphyaddr) - not the absent leaf's 0. KVM accepts this request either
    way, which the testbed does not model (an internal error naming it), not INVALID_INPUT
    (sev.c sev_snp_ap_creation)."""
    options = VmOptions(vm_type="sev-snp", seed=5, memory=MEM)
    machine = Machine(build_program("<test>", options, text=AP_CREATE), options)
    if not leaf:
        table = machine.kvm_vm.cpuid
        del table.entries[(0x80000008, 0)]
        machine.kvm_vm.set_cpuid(table)  # KVM_SET_CPUID2 again before the first KVM_RUN
    assert machine.kvm_vm.maxphyaddr == (48 if leaf else 36)
    report = machine.run()
    assert report.outcome == "internal_error" and "SVM_VMGEXIT_AP_CREATION" in report.detail, report.detail


def ghcb_msr_guest(index: int, write: bool) -> str:
    """A guest asking for one MSR access through the GHCB itself (no #VC), then syncing the
    GHCB's SW_EXITINFO1 and 2."""
    return f"""
guest_main:
    call rt_ghcb_clear
    mov rbx, {index}
    GHCB_SET GHCB_RCX, rbx
    xor ebx, ebx
    GHCB_SET GHCB_RAX, rbx
    GHCB_SET GHCB_RDX, rbx
    mov rdi, SVM_EXIT_MSR
    mov rsi, {int(write)}
    xor edx, edx
    call rt_ghcb_exit
    mov rax, RT_GHCB
    mov r12, qword ptr [rax + GHCB_SW_EXITINFO1]
    mov r13, qword ptr [rax + GHCB_SW_EXITINFO2]
    GUEST_SYNC r12
    GUEST_SYNC r13
    ret
"""


UNINTERCEPTED = [0xC0000080, 0x277, 0xC0000082, 0xC0000100, 0x174, 0xC0010130]


@pytest.mark.parametrize("vm_type", ES_TYPES)
@pytest.mark.parametrize("index", UNINTERCEPTED, ids=[f"{i:#x}" for i in UNINTERCEPTED])
def test_ghcb_wrmsr_of_an_msr_kvm_does_not_intercept_fails_kvm_run(vm_type: str, index: int) -> None:
    """EFER, PAT, LSTAR, FS_BASE, SYSENTER_CS and the GHCB MSR are not intercepted for SEV-ES
    (svm_recalc_msr_intercepts, sev_es_recalc_msr_intercepts): a WRMSR of one through the GHCB
    is refused by svm_set_msr() with -EINVAL (sev_es_prevent_msr_access, has_protected_state),
    which __kvm_emulate_wrmsr() hands to userspace as KVM_RUN's error; a RDMSR is #GP."""
    _, report = run_text(ghcb_msr_guest(index, True), vm_type)
    assert (report.outcome, report.errno) == ("kvm_run_error", errno.EINVAL), report.detail
    _, report = run_text(ghcb_msr_guest(index, False), vm_type)
    assert report.outcome == "done" and report.syncs() == [1, SVM_EVTINJ_GP], report.detail


def test_ghcb_msr_refusal_is_a_user_exit_of_reason_inval_when_enabled() -> None:
    """With KVM_MSR_EXIT_REASON_INVAL user exits enabled, the -EINVAL becomes KVM_EXIT_X86_WRMSR
    / RDMSR of reason INVAL (x86.c kvm_msr_user_space, kvm_msr_reason)."""
    for write, kind in ((True, WrmsrExit), (False, RdmsrExit)):
        with Vm(VmOptions(vm_type="sev-es", memory=MEM, seed=5)) as vm:
            vcpu = vm.load("<msr>", text=ghcb_msr_guest(0xC0000080, write))
            vm.machine.kvm_vm.enable_cap(KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_INVAL)
            exit_ = vcpu.run()
            while not isinstance(exit_, kind):
                vm.handle(exit_)
                exit_ = vcpu.run()
            assert (exit_.index, exit_.msr_reason) == (0xC0000080, KVM_MSR_EXIT_REASON_INVAL)


#: the GHCB's "issue exception" answer for #GP: SVM_EVTINJ_VALID | SVM_EVTINJ_TYPE_EXEPT | 13
SVM_EVTINJ_GP = 0x8000030D

PSC_OVER_A_PRIVATE_PAGE = """
guest_main:
    push rbx
    mov rdi, GUEST_FREE_GPA
    mov qword ptr [rdi], 0x1234            # page A: private, validated at boot, holds data
    mov rdi, GUEST_FREE_GPA + 0x1000       # page B: made shared
    mov rsi, 1
    call set_memory_shared
    mov rdi, GUEST_FREE_GPA                # one PSC to private over [A, B]: A is private already
    mov rsi, 2
    mov rdx, 1
    call rt_snp_psc
    mov rax, GUEST_FREE_GPA
    mov rax, qword ptr [rax]               # A is still validated: its data reads back
    GUEST_SYNC rax
    mov rax, GUEST_FREE_GPA                # PVALIDATE A: no RMP update happened, CF = 1
    xor ecx, ecx
    mov edx, 1
    .byte 0xf2, 0x0f, 0x01, 0xff
    setc bl
    movzx rbx, bl
    GUEST_SYNC rax
    GUEST_SYNC rbx
    pop rbx
    ret
"""


def test_a_psc_over_a_page_already_private_leaves_its_rmp_entry() -> None:
    """A Page State Change to private over [A, B] where A is private already changes only B's
    attribute: KVM prepares (RMPUPDATEs) only what changed (sev_gmem_prepare/invalidate), so A
    stays validated - its data reads back and PVALIDATE of it reports no update (CF = 1), which
    Linux's pval_pages treats as a double validation."""
    _, report = run_text(PSC_OVER_A_PRIVATE_PAGE, "sev-snp")
    assert report.outcome == "done", report.detail
    assert report.syncs() == [0x1234, 0, 1]


@pytest.mark.parametrize("rax", [0x0000_8000_0000_3000, 0xFFFF_7FFF_FFFF_F000])
def test_pvalidate_of_a_non_canonical_address_is_gp(rax: int) -> None:
    """A non-canonical RAX is never translated: PVALIDATE raises #GP(0) and touches no RMP entry
    (a non-canonical address is a #GP, never a #PF), instead of validating through the
    alias its low 48 bits would walk to."""
    text = (f"guest_main:\n    movabs rax, {rax:#x}\n    xor ecx, ecx\n    xor edx, edx\n"
            "    .byte 0xf2, 0x0f, 0x01, 0xff\n    ret\n")
    _, report = run_text(text, "sev-snp")
    assert report.outcome == "unhandled_exception", report.detail
    assert report.exception is not None
    assert (report.exception["vector"], report.exception["error_code"]) == (13, 0)


def map_high(gpa: str) -> str:
    """Guest code mapping 0xffff800000000000 to a 2 MiB page at `gpa` through a new PDPT and PD
    (GUEST_FREE_GPA + 0x1000 and + 0x2000, private: with the C-bit) in PML4[256]."""
    return f"""
    mov rdi, RT_DATA
    mov r10, qword ptr [rdi + 0x800]       # C-bit mask
    mov rdi, GUEST_FREE_GPA + 0x1000       # zero the PDPT and PD pages
    xor eax, eax
    mov rcx, 1024
    rep stosq
    mov rdi, GUEST_FREE_GPA + 0x2000
    mov rax, {gpa}
    or rax, 0x87                           # PD[0]: a 2 MiB page
    or rax, r10
    mov qword ptr [rdi], rax
    mov rdi, GUEST_FREE_GPA + 0x1000
    mov rax, GUEST_FREE_GPA + 0x2000
    or rax, 7
    or rax, r10
    mov qword ptr [rdi], rax
    mov rdi, RT_PML4
    mov rax, GUEST_FREE_GPA + 0x1000
    or rax, 7
    or rax, r10
    mov qword ptr [rdi + 256*8], rax
"""


#: PVALIDATE 0xffff800000000000 mapped to GPA 0x40000000, beyond guest RAM (8 MiB).
PVALIDATE_BEYOND_RAM = ("guest_main:" + map_high("0x40000000") + """    mov rax, cr3
    mov cr3, rax
    mov rax, 0xffff800000000000
    xor ecx, ecx
    mov edx, 1
    .byte 0xf2, 0x0f, 0x01, 0xff
    GUEST_SYNC rax
    ret
""")


def test_pvalidate_of_a_mapping_beyond_guest_memory_is_a_nested_fault() -> None:
    """The guest's walk succeeds (the PDE is present), so PVALIDATE of a GPA beyond guest RAM is a
    nested page fault on that GPA, not a #PF in the guest; PVALIDATE is a private access, and a
    private access without a memslot is KVM_EXIT_MEMORY_FAULT (kvm_handle_noslot_fault:
    fault->is_private), which the VMM cannot convert (QEMU's kvm_convert_memory: no region)."""
    _, report = run_text(PVALIDATE_BEYOND_RAM, "sev-snp")
    assert report.outcome == "memory_fault", report.detail
    assert report.detail == ("guest made a private access to gpa 0x40000000, outside guest memory (no memslot): "
                             "there is no memory to convert")


#: Map 0xffff800000000000 through new tables in guest memory, read it, then rescind the PDPT's
#: page (PVALIDATE, validate = 0) and read again.
PAGE_TABLE_NOT_VALIDATED = "guest_main:" + map_high("0x600000") + """    mov rdi, GUEST_FREE_GPA
    mov qword ptr [rdi], 0x55
    mov rbx, 0xffff800000000000
    mov rax, qword ptr [rbx]               # through the new tables: works
    GUEST_SYNC rax
    mov rax, GUEST_FREE_GPA + 0x1000       # rescind the PDPT page (a page-table page)
    xor ecx, ecx
    xor edx, edx
    .byte 0xf2, 0x0f, 0x01, 0xff
    setc cl
    GUEST_SYNC rax, rcx
    mov rax, cr3
    mov cr3, rax                           # flush the TLB
    mov rbx, 0xffff800000000000
    mov rax, qword ptr [rbx]               # the walk reads an unvalidated private page: #VC 0x404 on hardware
    GUEST_SYNC rax
    ret
"""


def ends_with_vc_404(text: str, fill: str, monkeypatch: pytest.MonkeyPatch) -> RunReport:
    """Run `text` on SNP with the C fill or the Python one (TESTBED_NO_NATIVE_MMU); its report,
    after checking the run ended in #VC PAGE_NOT_VALIDATED."""
    if fill == "python":
        monkeypatch.setenv("TESTBED_NO_NATIVE_MMU", "1")
    _, report = run_text(text, "sev-snp")
    assert report.outcome == "unhandled_exception", report.detail
    assert report.exception is not None
    assert (report.exception["vector"], report.exception["error_code"]) == (29, 0x404)
    return report


@pytest.mark.parametrize("fill", ["c", "python"])
def test_a_walk_through_a_page_table_not_validated_is_vc_404(fill: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The walk's own accesses are private on SNP and RMP-checked like data: a page table in a
    page the guest rescinded makes the next access through it #VC PAGE_NOT_VALIDATED (APM vol. 2
    15.36.10, table "RMP Memory Access Checks": page-table accesses, Validated -> #VC)."""
    report = ends_with_vc_404(PAGE_TABLE_NOT_VALIDATED, fill, monkeypatch)
    assert report.syncs()[0] == 0x55  # the first read, through validated tables, worked


PAGE_TABLE_SHARED = "guest_main:" + map_high("0x600000") + """    mov rdi, GUEST_FREE_GPA + 0x1000
    mov rsi, 1
    call set_memory_shared                 # the PDPT page: PSC to shared, its mapping C=0
    GUEST_SYNC rax
    mov rdi, GUEST_FREE_GPA + 0x1000       # its entry again (A set: the walk only reads it)
    mov rax, GUEST_FREE_GPA + 0x2000
    or rax, 0x27
    mov qword ptr [rdi], rax
    mov rax, cr3
    mov cr3, rax
    mov rbx, 0xffff800000000000
    mov rax, qword ptr [rbx]               # the walk reads the (shared) PDPT as private
    GUEST_SYNC rax
    ret
"""


@pytest.mark.parametrize("fill", ["c", "python"])
def test_a_walk_through_a_shared_page_table_is_a_nested_fault(fill: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A page table in a page the guest made shared fails the walk's private RMP check with a
    nested page fault on the table's GPA, not #VC: KVM sees a private access to a shared GFN
    (npf_interception -> PFERR_PRIVATE_ACCESS, kvm_mmu_faultin_pfn) and exits
    KVM_EXIT_MEMORY_FAULT; the VMM converts the page, and the retried walk finds it assigned
    but not validated: #VC PAGE_NOT_VALIDATED."""
    report = ends_with_vc_404(PAGE_TABLE_SHARED, fill, monkeypatch)
    faults = [e for e in report.user_exits if e["reason"] == "memory_fault"]
    assert faults == [{"reason": "memory_fault", "flags": 8, "gpa": FREE + 0x1000, "size": 4096}]


RMPADJUST = """
guest_main:
    mov rax, GUEST_FREE_GPA
    xor ecx, ecx
    mov edx, 1
    .byte 0xf3, 0x0f, 0x01, 0xfe           # rmpadjust
    ret
"""


@pytest.mark.parametrize("vm_type", ["sev-snp", "sev-es"])
def test_rmpadjust_is_not_modelled_on_snp_and_ud_elsewhere(vm_type: str) -> None:
    """RMPADJUST exists only with SNP (elsewhere #UD, as Unicorn raises); on SNP at CPL 0 it
    would set a lower VMPL's permissions, which the testbed does not model: the run ends naming
    it rather than with a #UD the real CPU never raises there."""
    _, report = run_text(RMPADJUST, vm_type)
    if vm_type == "sev-snp":
        assert report.outcome == "internal_error", report.detail
        assert "RMPADJUST is not modelled" in report.detail
    else:
        assert report.outcome == "unhandled_exception" and report.exception is not None
        assert report.exception["vector"] == 6


def guest_request(code: int, req: str, *, rax: str | None = None, rbx: str | None = None) -> str:
    """A guest sending an SNP (extended) guest request from two shared pages at GUEST_FREE_GPA
    (msg_type SNP_MSG_REPORT_REQ), with RAX/RBX set valid in the GHCB when given, then syncing
    SW_EXITINFO1/2."""
    regs = "".join(f"    mov rbx, {value}\n    GHCB_SET GHCB_{name}, rbx\n"
                   for name, value in (("RAX", rax), ("RBX", rbx)) if value is not None)
    return f"""
guest_main:
    push rbx
    mov rdi, GUEST_FREE_GPA
    mov rsi, 3
    call set_memory_shared
    GUEST_ASSERT_EQ rax, 0
    mov rdi, GUEST_FREE_GPA
    mov byte ptr [rdi + 52], 5
    mov rdi, GUEST_FREE_GPA + 0x2000
    mov qword ptr [rdi], -1
    call rt_ghcb_clear
{regs}    mov rdi, {code:#x}
    mov rsi, {req}
    mov rdx, GUEST_FREE_GPA + 0x1000
    call rt_ghcb_exit
    mov rax, RT_GHCB
    mov r12, qword ptr [rax + GHCB_SW_EXITINFO1]
    mov r13, qword ptr [rax + GHCB_SW_EXITINFO2]
    GUEST_SYNC r12, r13
    pop rbx
    ret
"""


SNP_GUEST_REQUEST, SNP_EXT_GUEST_REQUEST = 0x80000011, 0x80000012


@pytest.mark.parametrize(("text", "outcome", "detail"), [
    (guest_request(SNP_EXT_GUEST_REQUEST, "GUEST_FREE_GPA"), "done", [2, 5]),  # RAX/RBX not valid
    (guest_request(SNP_EXT_GUEST_REQUEST, "GUEST_FREE_GPA", rax="GUEST_FREE_GPA + 0x2008", rbx=1), "done", [2, 5]),
    (guest_request(SNP_GUEST_REQUEST, "0x4000000"), "kvm_run_error", "kvm_read_guest of the request page"),
    (guest_request(SNP_EXT_GUEST_REQUEST, "0x4000000"), "kvm_run_error", "kvm_read_guest of msg_type"),
    (guest_request(SNP_EXT_GUEST_REQUEST, "GUEST_FREE_GPA", rax="GUEST_FREE_GPA + 0x2000", rbx=1), "internal_error",
     "SVM_VMGEXIT_EXT_GUEST_REQUEST"),
], ids=["ext-report-regs-invalid", "ext-report-unaligned", "req-unreadable", "ext-unreadable", "ext-to-firmware"])
def test_guest_requests_get_kvms_checks_before_the_firmware(text: str, outcome: str, detail: object) -> None:
    """snp_handle_ext_guest_req() / snp_handle_guest_req() (sev.c): a report request without valid
    RAX/RBX or with an unaligned RAX is INVALID_INPUT (2, 5) and the guest runs on; a message
    type or request page KVM cannot read fails KVM_RUN with EIO; a request passing the checks
    reaches the firmware (not modelled) after KVM zeroed the certificate table's terminator."""
    machine, report = run_text(text, "sev-snp")
    assert report.outcome == outcome, report.detail
    if outcome == "done":
        assert [list(u["args"]) for u in report.ucalls if u["cmd"] == "sync"] == [detail]
    else:
        assert str(detail) in report.detail
    if outcome == "internal_error":
        assert machine.memory.userspace_view().read(FREE + 0x2000, 24) == bytes(24)


IN32_AND_CPUID_D = """
guest_main:
    mov rax, 0xAAAAAAAABBBBBBBB
    mov dx, 0x80
    in eax, dx
    GUEST_SYNC rax
    mov rax, 0xAAAAAAAABBBBBBBB
    in ax, dx
    GUEST_SYNC rax
    mov eax, 0xd
    xor ecx, ecx
    cpuid
    GUEST_SYNC rax
    ret
"""


@pytest.mark.parametrize("vm_type", ["default", *ES_TYPES])
def test_in_and_cpuid_through_the_vc_handler_answer_as_the_cpu(vm_type: str) -> None:
    """Through the runtime's #VC handler a 32-bit IN writes EAX, zero-extended into RAX (a 16-bit
    one merges AX), as the CPU and Linux's vc_handle_ioio do; CPUID leaf 0xD sends XCR0 (1 without
    CR4.OSXSAVE), which KVM requires for it (vc_handle_cpuid, sev_es_validate_vmgexit): the same
    answers as a plain VM."""
    _, report = run_text(IN32_AND_CPUID_D, vm_type)
    assert report.outcome == "done", report.detail
    assert report.syncs() == [0xFFFFFFFF, 0xAAAAAAAABBBBFFFF, 0]


ENOSYS = (-1000) & (2**64 - 1)
EPERM = (-1) & (2**64 - 1)


@pytest.mark.parametrize("vm_type", ES_TYPES)
@pytest.mark.parametrize(("nr", "user", "expected"), [(1, 0, 0), (0x999, 0, ENOSYS), (1, 1, EPERM), (0x999, 1, EPERM)])
def test_hypercall_abi_through_the_ghcb(vm_type: str, nr: int, user: int, expected: int) -> None:
    """The foundation's hypercall ABI holds through #VC + GHCB, the CPL rule included (CPL from the GHCB)."""
    report = run_file("hypercall_abi_call.s", vm_type, defines={"HC_NR": nr, "USER": user})
    assert report.outcome == "done", report.detail
    assert report.syncs() == [expected]


@pytest.mark.parametrize("vm_type", ES_TYPES)
def test_hypercall_through_the_ghcb_clobbers_only_rax(vm_type: str) -> None:
    """The #VC handler copies only RAX back: every other GPR survives the hypercall, RAX holds its result
    (Documentation/virt/kvm/x86/hypercalls.rst; sev.c sev_es_sync_to_ghcb)."""
    report = run_file("hypercall_abi_gprs.s", vm_type, defines={"HC_NR": 1})
    assert report.outcome == "done", report.detail  # every GUEST_ASSERT_EQ on the other GPRs held
    assert report.syncs() == [0]  # RAX = KVM_HC_VAPIC_POLL_IRQ's 0 (x86.c kvm_emulate_hypercall)


def test_ghcb_on_a_private_page() -> None:
    """A GHCB GPA on a private page: on SNP it is not the registered GHCB, answered NOT_REGISTERED in the
    page KVM maps (the VMM's shared side, which the guest does not see) and the guest runs on, or, with
    --kvm-version 7.1, KVM_RUN fails with -EINVAL (sev.c sev_handle_vmgexit); on SEV-ES KVM reads
    ciphertext and the guest survives - the host is never the one that crashes."""
    snp = run_file("ghcb_hostile.s", "sev-snp", defines={"SCENARIO": 8})
    assert snp.outcome == "done", snp.detail
    assert snp.syncs() == [0x8888]
    old = run_file("ghcb_hostile.s", "sev-snp", defines={"SCENARIO": 8}, kvm_version="7.1")
    assert (old.outcome, old.errno) == ("kvm_run_error", 22), old.detail
    es = run_file("ghcb_hostile.s", "sev-es", defines={"SCENARIO": 8})
    assert es.outcome == "done", es.detail
    assert es.syncs() == [0x8888]


def test_unregistered_ghcb_runs_on_snp() -> None:
    """SNP: a full-GHCB VMGEXIT from a GPA other than the registered GHCB is answered as bad input and the
    guest runs on (sev.c sev_handle_vmgexit; commit 1797e00bf802); 7.1 fails KVM_RUN with -EINVAL."""
    report = run_file("ghcb_hostile.s", "sev-snp", defines={"SCENARIO": 9})
    assert report.outcome == "done", report.detail
    assert report.syncs() == [0xBAD]
    old = run_file("ghcb_hostile.s", "sev-snp", defines={"SCENARIO": 9}, kvm_version="7.1")
    assert (old.outcome, old.errno) == ("kvm_run_error", 22)
    assert "not registered" in old.detail
    assert old.syncs() == []


RUNTIME_CODE = """
.equ CODE_PAGE, GUEST_FREE_GPA + 0x3000
guest_main:
    # write `mov ecx, 0xc0010130; rdmsr; shl rdx, 32; or rax, rdx; ret` at run time, call it
    mov rdi, CODE_PAGE
    mov byte ptr [rdi], 0xb9
    mov dword ptr [rdi + 1], 0xc0010130
    mov word ptr [rdi + 5], 0x320f
    mov dword ptr [rdi + 7], 0x20e2c148
    mov word ptr [rdi + 11], 0x0948
    mov byte ptr [rdi + 13], 0xd0
    mov byte ptr [rdi + 14], 0xc3
    call rdi
    GUEST_SYNC rax
    # rewrite the same, already executed page: rdmsr -> a harmless `xor eax, eax` + nop
    mov rdi, CODE_PAGE
    mov word ptr [rdi + 5], 0xc031
    call rdi
    GUEST_SYNC rax
    ret
"""


@pytest.mark.parametrize("vm_type", ES_TYPES)
def test_ghcb_msr_read_by_code_written_at_run_time(vm_type: str) -> None:
    """RDMSR of the GHCB MSR in code the guest wrote at run time is intercepted; rewriting it is seen."""
    _, report = run_text(RUNTIME_CODE, vm_type)
    assert report.outcome == "done", report.detail
    first, second = report.syncs()
    assert first == RT_GHCB  # the runtime wrote its GHCB's GPA before its last VMGEXIT
    assert second == 0


def test_runtime_negotiates_the_ghcb_protocol() -> None:
    """KVM offering only GHCB v1: the runtime speaks v1 (GHCB_PROTOCOL_MIN is 1, ghcb_version =
    min(max, 2) in Linux's sev_es_negotiate_protocol()) and the guest runs, every GHCB it hands
    over saying version 1; SNP with v1 is refused by KVM itself."""
    options = VmOptions(vm_type="sev-es", memory=MEM, seed=5, ghcb_version=1, defines={"INSN": 1})
    with Machine(build_program(GUESTS_DIR / "hypercall_insn.s", options), options) as machine:
        report = machine.run()
        assert report.outcome == "done", report.detail
        # the GHCB's protocol_version field (offset 0xffa) as the guest last filled it
        assert machine.memory.host_read(RT_GHCB + 0xFFA, 2) == (1).to_bytes(2, "little")
    with pytest.raises(UsageError):
        run_file("hypercall_insn.s", "sev-snp", ghcb_version=1)
