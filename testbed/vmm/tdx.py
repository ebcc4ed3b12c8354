"""The VMM's answers to KVM_EXIT_TDX, as QEMU master gives them (target/i386/kvm/tdx.c, called
from kvm_arch_handle_exit for KVM_EXIT_TDX): the TDVMCALL leaves KVM leaves to userspace.

* GetTdVmCallInfo leaf 1 (tdx_handle_get_tdvmcall_info): R11 = the optional leaves both KVM
  and QEMU support - SetupEventNotifyInterrupt (bit 1), which KVM reports in
  user_tdvmcallinfo_1_r11 (kvm-x86 tdx.c init_kvm_tdx_caps) - R12..R14 = 0, SUCCESS.
* SetupEventNotifyInterrupt (tdx_handle_setup_event_notify_interrupt): a vector in 32..255 is
  recorded (QEMU injects it when a quote completes; the testbed has no interrupts) and
  answered SUCCESS, any other INVALID_OPERAND.
* GetQuote (tdx_handle_get_quote) with no quote-generation service configured - the testbed
  has none: INVALID_OPERAND for a size of 0, a bad header version, a buffer above 128 KiB or an
  in_len beyond it; ALIGN_ERROR for a GPA or size not 4 KiB aligned; else the header's
  error_code becomes QGS_UNAVAILABLE in the shared buffer and the status is SUCCESS.
"""

from __future__ import annotations

import struct

from testbed.errors import TestbedError
from testbed.hw.memory import HostMemory
from testbed.kvm.tdx import (
    TDVMCALL_GET_QUOTE,
    TDVMCALL_GET_TD_VM_CALL_INFO,
    TDVMCALL_SETUP_EVENT_NOTIFY_INTERRUPT,
    TDVMCALL_STATUS_ALIGN_ERROR,
    TDVMCALL_STATUS_INVALID_OPERAND,
    TDVMCALL_STATUS_SUCCESS,
)
from testbed.kvm.uapi import TdxExit

#: GetTdVmCallInfo leaf 1, R11: TDG_VP_VMCALL_SUBFUNC_SET_EVENT_NOTIFY_INTERRUPT
TDVMCALLINFO_SETUP_EVENT_NOTIFY_INTERRUPT = 1 << 1
#: struct tdx_get_quote_header: structure_version (u64), error_code (u64), in_len (u32), out_len (u32)
GET_QUOTE_HEADER = struct.Struct("<QQII")
TDX_GET_QUOTE_STRUCTURE_VERSION = 1
TDX_GET_QUOTE_MAX_BUF_LEN = 128 * 1024
TDX_VP_GET_QUOTE_QGS_UNAVAILABLE = 0x8000000000000001


class TdxUserspace:
    """QEMU's TdxGuest state the exits touch: the event-notify vector the guest set up."""

    def __init__(self, memory: HostMemory) -> None:
        self.memory = memory
        #: tdx_guest->event_notify_vector (-1: none)
        self.event_notify_vector = -1

    def handle(self, exit: TdxExit) -> None:
        """Answer one KVM_EXIT_TDX in its reply slots (KVM copies them back on the next KVM_RUN)."""
        if exit.nr == TDVMCALL_GET_TD_VM_CALL_INFO:
            if exit.leaf == 1:
                exit.r11, exit.r12, exit.r13, exit.r14 = TDVMCALLINFO_SETUP_EVENT_NOTIFY_INTERRUPT, 0, 0, 0
                exit.ret = TDVMCALL_STATUS_SUCCESS
        elif exit.nr == TDVMCALL_SETUP_EVENT_NOTIFY_INTERRUPT:
            if 32 <= exit.vector < 256:
                self.event_notify_vector = exit.vector
                exit.ret = TDVMCALL_STATUS_SUCCESS
            else:
                exit.ret = TDVMCALL_STATUS_INVALID_OPERAND
        elif exit.nr == TDVMCALL_GET_QUOTE:
            exit.ret = self._get_quote(exit.gpa, exit.size)

    def _get_quote(self, gpa: int, size: int) -> int:
        if size == 0:
            return TDVMCALL_STATUS_INVALID_OPERAND
        if gpa % 4096 or size % 4096:
            return TDVMCALL_STATUS_ALIGN_ERROR
        try:
            version, _, in_len, out_len = GET_QUOTE_HEADER.unpack(self.memory.read(gpa, GET_QUOTE_HEADER.size))
        except TestbedError:
            return TDVMCALL_STATUS_INVALID_OPERAND  # address_space_read failed: "failed to read"
        if version != TDX_GET_QUOTE_STRUCTURE_VERSION:
            return TDVMCALL_STATUS_INVALID_OPERAND
        if size > TDX_GET_QUOTE_MAX_BUF_LEN or in_len > size - GET_QUOTE_HEADER.size:
            return TDVMCALL_STATUS_INVALID_OPERAND
        header = GET_QUOTE_HEADER.pack(version, TDX_VP_GET_QUOTE_QGS_UNAVAILABLE, in_len, out_len)
        try:
            self.memory.write(gpa, header)
        except TestbedError:
            return TDVMCALL_STATUS_INVALID_OPERAND
        return TDVMCALL_STATUS_SUCCESS
