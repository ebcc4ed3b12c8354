"""The VMM's answers to KVM_EXIT_TDX (testbed/vmm/tdx.py), as QEMU master's target/i386/kvm/tdx.c
gives them: tdx_handle_get_tdvmcall_info, tdx_handle_setup_event_notify_interrupt and
tdx_handle_get_quote without a quote-generation service."""

from __future__ import annotations

import pytest

from testbed.api import run_guest
from testbed.hw.memory import BytesMemory
from testbed.kvm.tdx import (
    TDVMCALL_GET_QUOTE,
    TDVMCALL_GET_TD_VM_CALL_INFO,
    TDVMCALL_SETUP_EVENT_NOTIFY_INTERRUPT,
    TDVMCALL_STATUS_ALIGN_ERROR,
    TDVMCALL_STATUS_INVALID_OPERAND,
    TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED,
    TDVMCALL_STATUS_SUCCESS,
)
from testbed.kvm.uapi import TdxExit
from testbed.layout import Layout
from testbed.machine import VmOptions
from testbed.vmm.tdx import GET_QUOTE_HEADER, TDX_VP_GET_QUOTE_QGS_UNAVAILABLE, TdxUserspace

MEM = 1 << 20
BUF = 0x4000


def quote_vmm(version: int = 1, in_len: int = 0) -> TdxUserspace:
    """A VMM whose memory holds a GetQuote header at BUF."""
    memory = BytesMemory(MEM)
    memory.write(BUF, GET_QUOTE_HEADER.pack(version, 0, in_len, 0))
    return TdxUserspace(memory)


def quote(vmm: TdxUserspace, gpa: int = BUF, size: int = 0x1000) -> int:
    exit = TdxExit(nr=TDVMCALL_GET_QUOTE, gpa=gpa, size=size, ret=TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED)
    vmm.handle(exit)
    return exit.ret


@pytest.mark.parametrize(("vmm", "gpa", "size", "status"), [
    (quote_vmm(), BUF, 0, TDVMCALL_STATUS_INVALID_OPERAND),  # buf_len == 0
    (quote_vmm(), BUF + 8, 0x1000, TDVMCALL_STATUS_ALIGN_ERROR),
    (quote_vmm(), BUF, 0x1800, TDVMCALL_STATUS_ALIGN_ERROR),
    (quote_vmm(version=2), BUF, 0x1000, TDVMCALL_STATUS_INVALID_OPERAND),  # structure_version
    (quote_vmm(), BUF, 0x21000, TDVMCALL_STATUS_INVALID_OPERAND),  # above TDX_GET_QUOTE_MAX_BUF_LEN
    (quote_vmm(in_len=0x1000 - 23), BUF, 0x1000, TDVMCALL_STATUS_INVALID_OPERAND),  # in_len past the buffer
    (quote_vmm(), MEM, 0x1000, TDVMCALL_STATUS_INVALID_OPERAND),  # the header cannot be read
    (quote_vmm(in_len=0x1000 - 24), BUF, 0x1000, TDVMCALL_STATUS_SUCCESS),
], ids=["size-0", "gpa-unaligned", "size-unaligned", "version", "too-large", "in-len", "outside", "ok"])
def test_get_quote_checks_as_qemu(vmm: TdxUserspace, gpa: int, size: int, status: int) -> None:
    """tdx_handle_get_quote(): INVALID_OPERAND for size 0, a header that cannot be read, a wrong
    structure version, a buffer above 128 KiB or an in_len beyond it; ALIGN_ERROR for a GPA or
    size not 4 KiB aligned; with no quote-generation socket the header's error_code becomes
    QGS_UNAVAILABLE and the call SUCCESS."""
    assert quote(vmm, gpa, size) == status
    error_code = GET_QUOTE_HEADER.unpack(vmm.memory.read(BUF, GET_QUOTE_HEADER.size))[1]
    assert error_code == (TDX_VP_GET_QUOTE_QGS_UNAVAILABLE if status == TDVMCALL_STATUS_SUCCESS else 0)


def test_get_tdvmcall_info_and_event_notify_as_qemu() -> None:
    """tdx_handle_get_tdvmcall_info(): leaf 1 answers R11 = SetupEventNotifyInterrupt (bit 1, the
    optional leaf both KVM and QEMU support), R12..R14 = 0, SUCCESS; another leaf keeps KVM's
    preset. tdx_handle_setup_event_notify_interrupt(): a vector in 32..255 is recorded and
    SUCCESS, any other INVALID_OPERAND."""
    vmm = TdxUserspace(BytesMemory(MEM))
    info = TdxExit(nr=TDVMCALL_GET_TD_VM_CALL_INFO, leaf=1, ret=TDVMCALL_STATUS_SUCCESS, r12=7)
    vmm.handle(info)
    assert (info.ret, info.r11, info.r12, info.r13, info.r14) == (TDVMCALL_STATUS_SUCCESS, 2, 0, 0, 0)
    for vector, status in ((31, TDVMCALL_STATUS_INVALID_OPERAND), (256, TDVMCALL_STATUS_INVALID_OPERAND),
                           (32, TDVMCALL_STATUS_SUCCESS), (255, TDVMCALL_STATUS_SUCCESS)):
        notify = TdxExit(nr=TDVMCALL_SETUP_EVENT_NOTIFY_INTERRUPT, vector=vector,
                         ret=TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED)
        vmm.handle(notify)
        assert notify.ret == status, vector
    assert vmm.event_notify_vector == 255


SHARED = 1 << 47  # the shared bit of a TD with GPAW 48
TD_MEM = 16 << 20
FREE = Layout(TD_MEM).free_gpa
GET_QUOTE_GUEST = f"""
guest_main:
    push rbx
    mov rdi, {FREE:#x}
    mov rsi, 1
    call set_memory_shared
    GUEST_ASSERT_EQ rax, 0
    mov rbx, {FREE:#x}
    mov qword ptr [rbx], 1
    mov qword ptr [rbx + 8], 0
    mov qword ptr [rbx + 16], 0
    xor r10d, r10d
    mov r11, TDVMCALL_GET_QUOTE
    movabs r12, {SHARED | FREE:#x}
    mov r13, 0x1000
    TDVMCALL
    mov rcx, qword ptr [rbx + 8]
    GUEST_SYNC r10, rcx
    xor r10d, r10d
    mov r11, TDVMCALL_GET_TD_VM_CALL_INFO
    mov r12, 1
    TDVMCALL
    GUEST_SYNC r10, r11
    pop rbx
    ret
"""


def test_a_td_reads_qemus_answers() -> None:
    """End to end in a TD: GetQuote on a shared 4 KiB buffer returns SUCCESS with the header's
    error_code QGS_UNAVAILABLE; GetTdVmCallInfo leaf 1 returns R11 = 2."""
    report = run_guest("quote.s", VmOptions(vm_type="tdx", vendor="intel", memory=TD_MEM, gpaw=48, timeout=20),
                       text=GET_QUOTE_GUEST)
    assert report.outcome == "done", report.detail
    syncs = [list(u["args"]) for u in report.ucalls if u["cmd"] == "sync"]
    assert syncs == [[TDVMCALL_STATUS_SUCCESS, TDX_VP_GET_QUOTE_QGS_UNAVAILABLE], [TDVMCALL_STATUS_SUCCESS, 2]]
