"""Hostile TD inputs, end to end: what a TD can put in its registers, answered as KVM answers it.

Small guests speak the protocol themselves with the prelude's TDCALL / TDVMCALL macros; the
answers are those of arch/x86/kvm/vmx/tdx.c (kvm-x86) for TDG.VP.VMCALL, of the TDX module model
(testbed/hw/tdx_module.py, the module's src/td_dispatcher) for the other TDCALL leaves. One TD
boot answers a whole table of calls (a boot accepts ~520 pages), each row checked by its own
test; the guest side of MapGPA's RETRY rules (Linux's arch/x86/coco/tdx/tdx.c tdx_map_gpa) is
checked against a KVM that lies about R11.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest

import testbed
from testbed.api import run_guest
from testbed.cli import main
from testbed.hw.exits import Vendor
from testbed.kvm import tdx as kvm_tdx
from testbed.layout import UCALL_GPA, Layout
from testbed.machine import VmOptions
from testbed.vmm.vmm import RunReport

MEM = 16 << 20
TIMEOUT = 20.0
FREE = Layout(MEM).free_gpa
GPAW = 48  # every TD here: the shared bit is GPA bit 47
SHARED = 1 << (GPAW - 1)
MAXPHYADDR = GPAW  # CPUID 0x80000008.EAX[7:0] of a TD is its GPAW (vmm/cpuid.py)
U64 = (1 << 64) - 1

SUCCESS = kvm_tdx.TDVMCALL_STATUS_SUCCESS
INVALID_OPERAND = kvm_tdx.TDVMCALL_STATUS_INVALID_OPERAND
ALIGN_ERROR = kvm_tdx.TDVMCALL_STATUS_ALIGN_ERROR
SUBFUNC_UNSUPPORTED = kvm_tdx.TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED
ENOSYS_RET = (-1000) & U64  # -KVM_ENOSYS
EIO_RET = (-errno.EIO) & U64
MAP_GPA = kvm_tdx.TDVMCALL_MAP_GPA

# The TDX module's statuses (testbed/hw/tdx_module.py, Linux's tdx_errno.h)
TDX_OPERAND_INVALID = 0xC000010000000000
TDX_NO_VALID_VE_INFO = 0xC000070400000000
TDX_PAGE_ALREADY_ACCEPTED = 0x00000B0A00000000
TDX_PAGE_SIZE_MISMATCH = 0xC0000B0B00000000


def td(text: str, name: str = "tdx_scenario.s", **kw: Any) -> RunReport:
    """Run guest `text` as a TD (Intel, GPAW 48, 16 MiB unless told)."""
    kw.setdefault("memory", MEM)
    kw.setdefault("gpaw", GPAW)
    return run_guest(name, VmOptions(vm_type="tdx", vendor=Vendor.INTEL, timeout=TIMEOUT, **kw), text=text)


def syncs(report: RunReport) -> list[list[int]]:
    """Every GUEST_SYNC's values, in order, after checking the guest finished."""
    assert report.outcome == "done", f"{report.outcome}: {report.detail}"
    return [list(u["args"]) for u in report.ucalls if u["cmd"] == "sync"]


# ------------------------------------------------------------- one TD, a table of TDVMCALLs

# (id, R10, R11, R12, R13, expected R10, expected R11, the kernel function that answers)
TDVMCALLS: list[tuple[str, int, int, int, int, int, int, str]] = [
    ("map_gpa_misaligned_gpa", 0, MAP_GPA, FREE + 0x800, 0x1000, ALIGN_ERROR, FREE + 0x800, "tdx_map_gpa"),
    ("map_gpa_misaligned_size", 0, MAP_GPA, FREE, 0x800, ALIGN_ERROR, FREE, "tdx_map_gpa"),
    ("map_gpa_misaligned_shared", 0, MAP_GPA, SHARED | FREE | 0x10, 0x1000, ALIGN_ERROR, SHARED | FREE | 0x10,
     "tdx_map_gpa"),
    ("map_gpa_size_zero", 0, MAP_GPA, FREE, 0, INVALID_OPERAND, FREE, "tdx_map_gpa"),
    ("map_gpa_wraps", 0, MAP_GPA, FREE, (1 << 64) - FREE + 0x1000, INVALID_OPERAND, FREE, "tdx_map_gpa"),
    ("map_gpa_wraps_at_the_top", 0, MAP_GPA, U64 & ~0xFFF, 0x2000, INVALID_OPERAND, U64 & ~0xFFF, "tdx_map_gpa"),
    ("map_gpa_mixed_sides", 0, MAP_GPA, SHARED - 0x1000, 0x2000, INVALID_OPERAND, SHARED - 0x1000, "tdx_map_gpa"),
    # INVALID_OPERAND is checked before the alignment: a misaligned mixed-side range is INVALID_OPERAND
    ("map_gpa_mixed_and_misaligned", 0, MAP_GPA, SHARED - 0x800, 0x1000, INVALID_OPERAND, SHARED - 0x800,
     "tdx_map_gpa"),
    ("map_gpa_beyond_maxphyaddr", 0, MAP_GPA, 1 << MAXPHYADDR, 0x1000, INVALID_OPERAND, 1 << MAXPHYADDR,
     "tdx_map_gpa"),
    ("map_gpa_shared_end_beyond_maxphyaddr", 0, MAP_GPA, (1 << MAXPHYADDR) - 0x1000, 0x2000, INVALID_OPERAND,
     (1 << MAXPHYADDR) - 0x1000, "tdx_map_gpa"),
    ("unknown_ghci_leaf", 0, 0x10005, 0, 0, SUBFUNC_UNSUPPORTED, 0x10005, "handle_tdvmcall"),
    ("unknown_ghci_leaf_high", 0, 0x20000, 0, 0, SUBFUNC_UNSUPPORTED, 0x20000, "handle_tdvmcall"),
    # VMCALL (18) is no instruction leaf KVM handles (tdcall_to_vmx_exit_reason): EXIT_REASON_TDCALL
    ("vmcall_as_instruction_leaf", 0, 18, 0, 0, SUBFUNC_UNSUPPORTED, 18, "tdcall_to_vmx_exit_reason"),
    # the leaf is R11 as a whole: CPUID (10) with bit 32 set is no CPUID
    ("cpuid_leaf_with_high_bits", 0, (1 << 32) | 10, 0, 0, SUBFUNC_UNSUPPORTED, (1 << 32) | 10,
     "tdcall_to_vmx_exit_reason"),
    ("get_td_vm_call_info_leaf_2", 0, kvm_tdx.TDVMCALL_GET_TD_VM_CALL_INFO, 2, 0, INVALID_OPERAND,
     kvm_tdx.TDVMCALL_GET_TD_VM_CALL_INFO, "tdx_get_td_vm_call_info"),
    ("get_quote_private_buffer", 0, kvm_tdx.TDVMCALL_GET_QUOTE, FREE, 0x1000, INVALID_OPERAND,
     kvm_tdx.TDVMCALL_GET_QUOTE, "tdx_get_quote"),
    ("event_notify_vector_31", 0, kvm_tdx.TDVMCALL_SETUP_EVENT_NOTIFY_INTERRUPT, 31, 0, INVALID_OPERAND,
     kvm_tdx.TDVMCALL_SETUP_EVENT_NOTIFY_INTERRUPT, "tdx_setup_event_notify_interrupt"),
    # R10 != 0 is a KVM hypercall, 64-bit: nr is not truncated, so (1 << 32) | 1 is unknown
    ("kvm_hypercall_unknown_nr", 0x999, 0, 0, 0, ENOSYS_RET, 0, "tdx_emulate_vmcall"),
    ("kvm_hypercall_nr_high_bits", (1 << 32) | 1, 0, 0, 0, ENOSYS_RET, 0, "tdx_emulate_vmcall"),
]

# (id, RAX = leaf, RCX, expected RAX: the TDX module's answer)
TDCALLS: list[tuple[str, int, int, int]] = [
    ("unknown_leaf", 0x99, 0, TDX_OPERAND_INVALID | 0),
    ("unknown_leaf_high_bits", (1 << 40) | 0x63, 0, TDX_OPERAND_INVALID | 0),
    ("vmcall_exposing_rax", 0, 1, TDX_OPERAND_INVALID | 1),  # RCX bits 0, 1, 4 must be clear
    ("vmcall_exposing_high_bits", 0, (1 << 32) | 0xFFCC, TDX_OPERAND_INVALID | 1),
    ("veinfo_get_without_ve", 3, 0, TDX_NO_VALID_VE_INFO),
    ("accept_already_accepted", 6, FREE, TDX_PAGE_ALREADY_ACCEPTED),
    ("accept_2m", 6, FREE | 1, TDX_PAGE_SIZE_MISMATCH | 1),  # the S-EPT maps 4K leaves only
    ("accept_1g", 6, FREE | 2, TDX_OPERAND_INVALID | 1),
    ("accept_misaligned", 6, (FREE + 0x800) & ~7, TDX_OPERAND_INVALID | 1),
    ("accept_shared_gpa", 6, SHARED | FREE, TDX_OPERAND_INVALID | 1),
]


def _table_guest() -> str:
    vmcalls = "".join(f"    .quad {r10:#x}, {r11:#x}, {r12:#x}, {r13:#x}\n" for _, r10, r11, r12, r13, *_ in TDVMCALLS)
    tdcalls = "".join(f"    .quad {rax:#x}, {rcx:#x}\n" for _, rax, rcx, _ in TDCALLS)
    return f"""
guest_main:
    push rbx
    push r12
    push r13
    push r14
    push r15
    lea rbx, [rip + vmcalls]
    mov r15, {len(TDVMCALLS)}
next_vmcall:
    mov r10, qword ptr [rbx]
    mov r11, qword ptr [rbx + 8]
    mov r12, qword ptr [rbx + 16]
    mov r13, qword ptr [rbx + 24]
    TDVMCALL
    GUEST_SYNC rax, r10, r11
    add rbx, 32
    dec r15
    jnz next_vmcall
    lea rbx, [rip + tdcalls]
    mov r15, {len(TDCALLS)}
next_tdcall:
    mov rax, qword ptr [rbx]
    mov rcx, qword ptr [rbx + 8]
    TDCALL
    GUEST_SYNC rax
    add rbx, 16
    dec r15
    jnz next_tdcall
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    ret
vmcalls:
{vmcalls}tdcalls:
{tdcalls}"""


@pytest.fixture(scope="module")
def table_report() -> RunReport:
    """One TD that makes every call of TDVMCALLS, then of TDCALLS, syncing each answer."""
    return td(_table_guest(), name="tdx_hostile_table.s")


def test_table_runs_to_the_end_and_converts_nothing(table_report: RunReport) -> None:
    """Every hostile call returns to the TD; none reaches the VMM as a conversion: the only
    hypercall exit is the boot's ucall page, the only shared page that page (tdx.c tdx_map_gpa
    answers before __tdx_map_gpa)."""
    assert len(syncs(table_report)) == len(TDVMCALLS) + len(TDCALLS)
    assert [e["args"][0] for e in table_report.user_exits if e["reason"] == "hypercall"] == [UCALL_GPA]
    assert table_report.shared_ranges == [[UCALL_GPA >> 12, 1]]


@pytest.mark.parametrize(("r10", "r11", "r12", "r13", "status", "ret", "function"),
                         [row[1:] for row in TDVMCALLS], ids=[row[0] for row in TDVMCALLS])
def test_hostile_tdvmcall_is_answered_as_kvm_answers(table_report: RunReport, r10: int, r11: int, r12: int,
                                                     r13: int, status: int, ret: int, function: str) -> None:
    """Each hostile TDG.VP.VMCALL gets KVM's status in R10 and R11 (the GPA on a MapGPA error,
    else untouched), TDCALL itself succeeding: kvm/vmx/tdx.c, the function named in the row
    (tdx_map_gpa: INVALID_OPERAND for size 0, a wrap, a GPA beyond MAXPHYADDR or ends on both
    sides of the shared bit, then ALIGN_ERROR; handle_tdvmcall: SUBFUNC_UNSUPPORTED)."""
    index = [row[1:5] for row in TDVMCALLS].index((r10, r11, r12, r13))
    assert syncs(table_report)[index] == [0, status, ret], f"{function}: {syncs(table_report)[index]}"


@pytest.mark.parametrize(("rax", "rcx", "status"), [row[1:] for row in TDCALLS], ids=[row[0] for row in TDCALLS])
def test_hostile_tdcall_is_answered_by_the_module(table_report: RunReport, rax: int, rcx: int, status: int) -> None:
    """TDCALL leaves and operands the module refuses come back in RAX without reaching KVM: an
    unknown leaf (any bits above the leaf number too) is TDX_OPERAND_INVALID(RAX), TDG.VP.VMCALL
    exposing RAX/RCX or bits 63:32 TDX_OPERAND_INVALID(RCX), TDG.VP.VEINFO.GET with nothing
    pending TDX_NO_VALID_VE_INFO, TDG.MEM.PAGE.ACCEPT its already-accepted, size-mismatch and
    operand answers (hw/tdx_module.py; the module's tdg_vp_vmcall.c, tdg_mem_page_accept.c)."""
    index = len(TDVMCALLS) + [row[1:3] for row in TDCALLS].index((rax, rcx))
    assert syncs(table_report)[index] == [status]


def test_map_gpa_without_the_user_exit_is_subfunc_unsupported() -> None:
    """Without KVM_CAP_EXIT_HYPERCALL's MAP_GPA_RANGE bit every MapGPA, good or bad, is
    SUBFUNC_UNSUPPORTED with R11 = the GPA, before any argument check (tdx.c tdx_map_gpa,
    user_exit_on_hypercall). The runtime's MapGPA of the ucall page fails the same way, so its
    first shared access is a KVM_EXIT_MEMORY_FAULT the VMM answers by converting."""
    report = td(_table_guest(), name="tdx_hostile_table.s", map_gpa_exit=False)
    answers = syncs(report)
    for index, (name, _, r11, r12, *_) in enumerate(TDVMCALLS):
        if r11 == MAP_GPA:
            assert answers[index] == [0, SUBFUNC_UNSUPPORTED, r12], name
    assert [e for e in report.user_exits if e["reason"] == "hypercall"] == []
    assert [e["gpa"] for e in report.user_exits if e["reason"] == "memory_fault"] == [UCALL_GPA]


# ---------------------------------------------------------------- ReportFatalError

FATAL_GUEST = """
guest_main:
    mov r10, 0
    mov r11, TDVMCALL_REPORT_FATAL_ERROR
    movabs r12, ERROR_CODE
    movabs r13, MSG_GPA
    movabs r14, 0x2165727567616c62    # "blagure!"
    movabs r15, 0x1b5b324a00ff6c6c    # "ll\\xff\\0J2[\\x1b": a NUL ends the message
    TDVMCALL
    GUEST_SYNC 0xbad
    ret
"""


@pytest.mark.parametrize("gpa", [FREE, 1 << 46, U64 & ~0xFFF], ids=["private", "outside_memory", "top_of_u64"])
def test_report_fatal_error_with_a_garbage_message_gpa(gpa: int) -> None:
    """ReportFatalError with R12 bit 63 (GPA valid) and a GPA the host must not or cannot read:
    KVM_EXIT_SYSTEM_EVENT type TDX_FATAL (tdx.c tdx_report_fatal_error reads no memory), the run
    ends terminated, the message comes from the exposed registers up to the first NUL (QEMU's
    tdx_handle_report_fatal_error) and the GPA is recorded, never read; the TD never resumes."""
    error_code = (1 << 63) | (0x1234 << 16)
    report = td(FATAL_GUEST, defines={"ERROR_CODE": error_code, "MSG_GPA": gpa})
    assert report.outcome == "terminated", report.detail
    assert report.syncs() == []
    info = report.extra["tdx_fatal"]
    assert info == {"error_code": error_code, "message": "blagure!ll\\xff", "gpa": gpa}
    assert "\\xff" in report.detail and "\x1b" not in report.detail


def test_report_fatal_error_without_a_valid_gpa_records_none() -> None:
    """R12 bit 63 clear: R13 is no GPA, the report records none; bits 15:0 set are an invalid
    error code, which the report names (QEMU's tdx_handle_report_fatal_error)."""
    report = td(FATAL_GUEST, defines={"ERROR_CODE": 0x5, "MSG_GPA": 0xDEAD000})
    assert report.outcome == "terminated", report.detail
    assert report.extra["tdx_fatal"]["gpa"] is None
    assert "invalid error code" in report.detail


# ------------------------------------------------------------- access before acceptance

EARLY_TOUCH = """
guest_main:
    mov rax, GUEST_ACCEPTED_END + 0x3000
    mov qword ptr [rax], 1
    GUEST_SYNC 0xbad
    ret
"""


def test_access_before_acceptance_kills_the_vm_for_good() -> None:
    """A private access to a page the TD has not accepted: "Guest access before accepting",
    kvm_vm_dead(); KVM_RUN fails with EIO now and at every later call (tdx.c
    tdx_handle_ept_violation; kvm_main.c kvm_vcpu_ioctl checks vm_dead)."""
    with testbed.Vm(vm_type="tdx", vendor="intel", gpaw=GPAW, memory="32M", timeout=TIMEOUT) as vm:
        vcpu = vm.load("early_touch.s", text=EARLY_TOUCH)
        with pytest.raises(testbed.KvmRunError) as first:
            vcpu.run_to_ucall()
        assert first.value.errno == errno.EIO and "before accepting" in first.value.detail
        with pytest.raises(testbed.KvmRunError) as again:
            vcpu.run()
        assert again.value.errno == errno.EIO


def test_access_before_acceptance_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`testbed run --vm-type tdx --vendor intel --json`: the same guest ends as kvm_run_error,
    errno 5 (EIO), status 1 (a guest failure), no ucall (tdx.c tdx_handle_ept_violation)."""
    path = tmp_path / "early_touch.s"
    path.write_text(EARLY_TOUCH)
    status = main(["run", str(path), "--vm-type", "tdx", "--vendor", "intel", "--memory", "32M", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert (status, out["outcome"], out["errno"]) == (1, "kvm_run_error", errno.EIO), out
    assert "before accepting" in out["detail"]
    assert out["ucalls"] == []


def test_accepting_first_makes_the_same_access_work() -> None:
    """The control for the two tests above: accept_memory first (tdx_accept_memory), then the
    same access succeeds."""
    text = EARLY_TOUCH.replace("guest_main:\n", "guest_main:\n    mov rdi, GUEST_ACCEPTED_END\n"
                               "    mov rsi, 4\n    call accept_memory\n    GUEST_SYNC rax\n")
    text = text.replace("GUEST_SYNC 0xbad", "mov rax, qword ptr [rax]\n    GUEST_SYNC rax")
    assert syncs(td(text, memory=32 << 20)) == [[0], [1]]


# ---------------------------------------------- a KVM that lies about R11 on RETRY

CONVERT = """
guest_main:
    mov rdi, GUEST_FREE_GPA
    mov rsi, PAGES
    call set_memory_shared
    GUEST_SYNC rax
    ret
"""


def _lying_kvm(monkeypatch: pytest.MonkeyPatch, r11: Any) -> list[int]:
    """Make KVM answer every MapGPA chunk the VMM refused with RETRY and R11 = r11(tdx vcpu);
    returns the list the R11 values are appended to."""
    seen: list[int] = []

    def propagate(self: kvm_tdx.TdxVcpu, status: int) -> None:
        value = r11(self) & U64
        seen.append(value)
        self._set_return_code(kvm_tdx.TDVMCALL_STATUS_RETRY)
        self._set_return_val(value)
        self._resume()

    monkeypatch.setattr(kvm_tdx.TdxVcpu, "_propagate", propagate)
    return seen


def _convert_refusing(pages: int) -> tuple[int, int]:
    """CONVERT through the host API, the VMM answering EAGAIN to every MapGPA of the guest's
    range: (set_memory_shared's rax, the refused exits)."""
    refused = 0
    with testbed.Vm(vm_type="tdx", vendor="intel", gpaw=GPAW, memory="16M", timeout=TIMEOUT) as vm:
        vcpu = vm.load("convert.s", text=CONVERT, defines={"PAGES": pages})
        while True:
            match vcpu.run():
                case testbed.HypercallExit() as exit if FREE <= exit.args[0] < FREE + pages * 0x1000:
                    refused += 1
                    exit.ret = errno.EAGAIN
                    continue
                case exit:
                    uc = vm.handle(exit)
            if uc is not None and uc.cmd == "sync":
                return uc.args[0], refused


@pytest.mark.parametrize("lie", ["start_without_shared_bit", "below_start"])
def test_retry_with_r11_below_the_range_fails_at_once(monkeypatch: pytest.MonkeyPatch, lie: str) -> None:
    """R11 below start on RETRY - the next GPA without the shared bit (the other address space)
    or one page below - is outside [start, end): set_memory_shared fails with -EIO after that one
    call (coco/tdx/tdx.c tdx_map_gpa: R11 comes from the untrusted VMM, sanity-checked)."""
    seen = _lying_kvm(monkeypatch, (lambda t: t.map_gpa_next & ~SHARED) if lie == "start_without_shared_bit"
                      else (lambda t: t.map_gpa_next - 0x1000))
    assert _convert_refusing(1) == (EIO_RET, 1)
    assert seen == [FREE if lie == "start_without_shared_bit" else (SHARED | FREE) - 0x1000]


def test_retry_with_progress_resets_the_count_until_r11_leaves_the_range(monkeypatch: pytest.MonkeyPatch) -> None:
    """R11 one page past start on every RETRY is progress (the count restarts) until R11 reaches
    end, which is outside [start, end): 4 pages take 4 calls, then -EIO (coco/tdx/tdx.c
    tdx_map_gpa: start = R11, retry_count = 0)."""
    seen = _lying_kvm(monkeypatch, lambda t: t.map_gpa_next + 0x1000)
    assert _convert_refusing(4) == (EIO_RET, 4)
    assert seen == [SHARED | (FREE + 0x1000 * i) for i in range(1, 5)]
